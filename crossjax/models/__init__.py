"""GPT-NeoX (Pythia) in Flax NNX and loading of Hugging Face snapshots."""
from crossjax.models.gpt_neox import (
    GPTNeoX,
    NeoXConfig,
    abstract_model,
    count_params,
    hf_param_names,
    jit_forward,
    jit_run_hooks,
    lm_loss,
    parse_hook,
    validate_context_len,
    validate_hook,
)
from crossjax.models.load import (
    LoadedSnapshot,
    check_snapshots_consistent,
    load_snapshot,
    resolve_snapshot,
    save_hf_snapshot,
)

__all__ = [
    "GPTNeoX", "NeoXConfig", "abstract_model", "count_params", "hf_param_names", "jit_forward", "jit_run_hooks",
    "lm_loss", "parse_hook", "validate_context_len", "validate_hook",
    "LoadedSnapshot", "check_snapshots_consistent", "load_snapshot", "resolve_snapshot", "save_hf_snapshot",
]
