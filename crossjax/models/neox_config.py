"""The GPT-NeoX architecture as data (NeoXConfig, read from a transformers config.json) and the hook names.

Hook names follow TransformerLens: ``blocks.{i}.hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from crossjax.errors import CrossjaxError

HOOK_KINDS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out)$")


# --------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class NeoXConfig:
    """Architecture of a GPT-NeoX model; field names follow transformers' GPTNeoXConfig."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    hidden_act: str = "gelu"
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CrossjaxError(f"NeoXConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_heads:
            raise CrossjaxError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "pick a head count that divides the width.")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise CrossjaxError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}.")
        if self.num_rotary_dims % 2:
            raise CrossjaxError(
                f"rotary dims per head ({self.head_dim} * {self.rotary_pct} -> {self.num_rotary_dims}) must be even "
                "for rotate-half rotary embeddings; choose rotary_pct so head_dim * rotary_pct is even.")
        if self.hidden_act != "gelu":
            raise CrossjaxError(
                f"hidden_act {self.hidden_act!r} is not supported; GPT-NeoX/Pythia use exact 'gelu'.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_rotary_dims(self) -> int:
        # transformers truncates the same way: int(head_dim * partial_rotary_factor).
        return int(self.head_dim * self.rotary_pct)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> NeoXConfig:
        """Reads a config.json dict written by any transformers version (old `rotary_pct` or v5 `rope_parameters`)."""
        if d.get("model_type", "gpt_neox") != "gpt_neox":
            raise CrossjaxError(
                f"config model_type is {d.get('model_type')!r}; only 'gpt_neox' (Pythia) checkpoints are supported.")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in d]
        if missing:
            raise CrossjaxError(f"config.json lacks {missing}; it is not a complete GPT-NeoX config.")
        rope = d.get("rope_parameters") or {}
        if d.get("rope_scaling"):
            rope = {**d["rope_scaling"], **rope}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise CrossjaxError(
                f"rope type {rope_type!r} is not supported; only plain rotary embeddings (rope_type 'default').")
        if "head_dim" in d and d["head_dim"] not in (None, d["hidden_size"] // d["num_attention_heads"]):
            raise CrossjaxError(f"head_dim {d['head_dim']} differs from hidden_size / num_attention_heads; "
                                "such GPT-NeoX variants are not supported.")
        rotary_pct = rope.get("partial_rotary_factor", d.get("rotary_pct", 0.25))
        rotary_base = rope.get("rope_theta", d.get("rotary_emb_base", 10000.0))
        eos = d.get("eos_token_id", 0)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            intermediate_size=int(d["intermediate_size"]),
            rotary_pct=float(rotary_pct),
            rotary_base=float(rotary_base),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
            use_parallel_residual=bool(d.get("use_parallel_residual", True)),
            hidden_act=str(d.get("hidden_act", "gelu")),
            attention_bias=bool(d.get("attention_bias", True)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id", 0),
            eos_token_id=eos,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict that transformers 5 loads as GPTNeoXConfig (old rotary keys kept for older readers)."""
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "rope_parameters": {"partial_rotary_factor": self.rotary_pct, "rope_theta": self.rotary_base,
                                "rope_type": "default"},
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rotary_base,
            "max_position_embeddings": self.max_position_embeddings,
            "layer_norm_eps": self.layer_norm_eps,
            "use_parallel_residual": self.use_parallel_residual,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
        }

    def architecture(self) -> dict[str, Any]:
        """The fields that decide the computation (token ids excluded); equal for snapshots of one run."""
        d = dataclasses.asdict(self)
        d.pop("bos_token_id")
        d.pop("eos_token_id")
        return d


# ---------------------------------------------------------------------------------------------------- hooks
def parse_hook(cfg: NeoXConfig, hook: str) -> tuple[int, str]:
    """'blocks.{i}.hook_X' -> (i, 'hook_X'); unknown names and layers past the model's depth raise CrossjaxError."""
    m = _HOOK_RE.match(hook) if isinstance(hook, str) else None
    if m is None:
        raise CrossjaxError(
            f"unknown hook {hook!r}; hooks are 'blocks.{{i}}.{{kind}}' with kind one of {', '.join(HOOK_KINDS)} "
            f"and i in 0..{cfg.num_layers - 1}.")
    layer = int(m.group(1))
    if layer >= cfg.num_layers:
        raise CrossjaxError(
            f"hook {hook!r} asks for layer {layer} but the model has {cfg.num_layers} layers (0..{cfg.num_layers - 1});"
            f" pick a layer below {cfg.num_layers}.")
    return layer, m.group(2)


def validate_hook(cfg: NeoXConfig, hook: str) -> int:
    """Checks a hook name against the model depth; returns the number of blocks needed to compute it."""
    layer, kind = parse_hook(cfg, hook)
    return layer if kind == "hook_resid_pre" else layer + 1


def validate_context_len(cfg: NeoXConfig, context_len: int) -> None:
    """Raises CrossjaxError when contexts are longer than the model's learned position range."""
    if context_len > cfg.max_position_embeddings:
        raise CrossjaxError(
            f"context length {context_len} exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}; use contexts of at most {cfg.max_position_embeddings} tokens.")
    if context_len < 1:
        raise CrossjaxError(f"context length must be at least 1, got {context_len}.")
