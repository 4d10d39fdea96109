"""GPT-NeoX (Pythia) in Flax NNX, loading and saving of Hugging Face snapshots, and the jitted runner."""
from crossjax.models.gpt_neox import GPTNeoX, abstract_model, count_params, hf_param_names, lm_loss
from crossjax.models.neox_config import NeoXConfig, parse_hook, validate_context_len, validate_hook
from crossjax.models.load import (
    LoadedSnapshot,
    check_snapshots_consistent,
    inspect_snapshot,
    load_snapshot,
    save_hf_snapshot,
)
from crossjax.models.snapshot_files import resolve_snapshot, weights_hash
from crossjax.models.runner import Runner

__all__ = [
    "GPTNeoX", "NeoXConfig", "abstract_model", "count_params", "hf_param_names",
    "lm_loss", "parse_hook", "validate_context_len", "validate_hook",
    "LoadedSnapshot", "check_snapshots_consistent", "inspect_snapshot", "load_snapshot", "resolve_snapshot",
    "save_hf_snapshot", "weights_hash",
    "Runner",
]
