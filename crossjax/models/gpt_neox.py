"""GPT-NeoX (the Pythia architecture) in Flax NNX, with named hook points on the residual stream.

Shapes: B batch, T tokens per context, D d_model, H heads, V vocabulary.

The module tree mirrors the Hugging Face checkpoint layout one to one (`hf_param_names` lists the pairs), so a
checkpoint loads tensor by tensor and a model trained here saves back in the format transformers reads.
Numerics follow transformers' GPTNeoXForCausalLM: pre-LayerNorm blocks with parallel or sequential residual,
rotate-half rotary embeddings on the first `num_rotary_dims` of every head, exact GELU, a separate unembedding.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

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


# ---------------------------------------------------------------------------------------------------- layers
def _rotary_tables(cfg: NeoXConfig, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, R] for positions 0..T-1 (R = num_rotary_dims), float32 as in transformers."""
    rd = cfg.num_rotary_dims
    inv_freq = 1.0 / (cfg.rotary_base ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd))
    freqs = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B,T,H,hd]: rotate-half on the first R dims of each head, the rest passes through."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    x_rot = (x_rot.astype(jnp.float32) * c + rotated.astype(jnp.float32) * s).astype(x.dtype)
    return jnp.concatenate([x_rot, x_pass], axis=-1)


def _linear(in_f, out_f, *, use_bias, dtype, param_dtype, rngs):
    # Low-precision inputs accumulate in float32: faster on CPU (see JAX notes) and keeps the residual exact.
    pet = jnp.float32 if jnp.dtype(dtype) != jnp.float32 else None
    return nnx.Linear(in_f, out_f, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.initializers.normal(0.02), bias_init=nnx.initializers.zeros_init(),
                      preferred_element_type=pet, rngs=rngs)


def _layer_norm(cfg, param_dtype, rngs):
    # Exact (two-pass) variance like torch: Pythia's residual norms are large enough for E[x^2]-E[x]^2 to lose bits.
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=param_dtype,
                         use_fast_variance=False, rngs=rngs)


class NeoXAttention(nnx.Module):
    """Causal multi-head self-attention with a fused QKV projection laid out per head as [H, 3, hd]."""

    def __init__(self, cfg: NeoXConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.dtype = dtype
        kw = dict(use_bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query_key_value = _linear(cfg.hidden_size, 3 * cfg.hidden_size, **kw)
        self.dense = _linear(cfg.hidden_size, cfg.hidden_size, **kw)

    def __call__(self, x, cos, sin, mask):
        """x [B,T,D] float32, mask [B,1,T,T] bool (True = may attend) -> [B,T,D] float32."""
        b, t, _ = x.shape
        qkv = self.query_key_value(x).astype(self.dtype).reshape(b, t, self.num_heads, 3, self.head_dim)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores * (self.head_dim ** -0.5)
        # A finite floor rather than -inf keeps fully padded rows finite (they are ignored downstream).
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32)
        return self.dense(out.reshape(b, t, -1).astype(self.dtype)).astype(jnp.float32)


class NeoXMLP(nnx.Module):
    def __init__(self, cfg: NeoXConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dense_h_to_4h = _linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.dense_4h_to_h = _linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x):
        """x [B,T,D] -> [B,T,D] float32; exact (erf) GELU as torch's nn.GELU()."""
        h = jax.nn.gelu(self.dense_h_to_4h(x).astype(jnp.float32), approximate=False)
        return self.dense_4h_to_h(h.astype(self.dtype)).astype(jnp.float32)


class NeoXLayer(nnx.Module):
    def __init__(self, cfg: NeoXConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.use_parallel_residual = cfg.use_parallel_residual
        self.input_layernorm = _layer_norm(cfg, param_dtype, rngs)
        self.post_attention_layernorm = _layer_norm(cfg, param_dtype, rngs)
        self.attention = NeoXAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = NeoXMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, resid, cos, sin, mask):
        """resid [B,T,D] -> (resid_post, attn_out, mlp_out), each [B,T,D] float32."""
        attn_out = self.attention(self.input_layernorm(resid), cos, sin, mask)
        if self.use_parallel_residual:
            mlp_out = self.mlp(self.post_attention_layernorm(resid))
            return resid + attn_out + mlp_out, attn_out, mlp_out
        mid = resid + attn_out
        mlp_out = self.mlp(self.post_attention_layernorm(mid))
        return mid + mlp_out, attn_out, mlp_out


# ----------------------------------------------------------------------------------------------------- model
class GPTNeoX(nnx.Module):
    """GPT-NeoX language model. Parameters: embed_in, layers[i].{input_layernorm, post_attention_layernorm,
    attention.{query_key_value, dense}, mlp.{dense_h_to_4h, dense_4h_to_h}}, final_layer_norm, embed_out.

    `dtype` is the matmul input dtype; the residual stream, LayerNorms, softmax and hooks stay float32.
    """

    def __init__(self, cfg: NeoXConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.embed_in = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.float32, param_dtype=param_dtype,
                                  embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([NeoXLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.final_layer_norm = _layer_norm(cfg, param_dtype, rngs)
        self.embed_out = None if cfg.tie_word_embeddings else _linear(
            cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    # -- pieces
    def _check_inputs(self, input_ids, attention_mask):
        if input_ids.ndim != 2:
            raise CrossjaxError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}.")
        validate_context_len(self.cfg, input_ids.shape[1])
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise CrossjaxError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                                f"{tuple(input_ids.shape)}.")

    def _context(self, batch: int, seq_len: int, attention_mask):
        """Rotary tables and the [B,1,T,T] causal-and-padding mask. Positions are 0..T-1 (right padding)."""
        validate_context_len(self.cfg, seq_len)
        cos, sin = _rotary_tables(self.cfg, seq_len)
        causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None, None]
        if attention_mask is None:
            mask = jnp.broadcast_to(causal, (batch, 1, seq_len, seq_len))
        else:
            mask = causal & attention_mask.astype(bool)[:, None, None, :]
        return cos, sin, mask

    def _blocks(self, resid, start, stop, ctx, want=None):
        """Runs blocks start..stop-1 on resid [B,T,D]; `want` collects {hook: [B,T,D]} on the way."""
        cos, sin, mask = ctx
        out = {}
        for i in range(start, stop):
            if want is not None and f"blocks.{i}.hook_resid_pre" in want:
                out[f"blocks.{i}.hook_resid_pre"] = resid
            resid, attn_out, mlp_out = self.layers[i](resid, cos, sin, mask)
            if want is not None:
                for name, val in (("hook_attn_out", attn_out), ("hook_mlp_out", mlp_out),
                                  ("hook_resid_post", resid)):
                    if f"blocks.{i}.{name}" in want:
                        out[f"blocks.{i}.{name}"] = val
        return resid, out

    def unembed(self, resid: jax.Array) -> jax.Array:
        """resid [B,T,D] (the last block's output) -> logits [B,T,V] float32, through final_layer_norm."""
        x = self.final_layer_norm(resid)
        if self.embed_out is None:
            return self.embed_in.attend(x.astype(self.dtype)).astype(jnp.float32)
        return self.embed_out(x).astype(jnp.float32)

    # -- public API
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids [B,T] int, attention_mask [B,T] (1 = token, 0 = right padding) -> logits [B,T,V] float32."""
        self._check_inputs(input_ids, attention_mask)
        ctx = self._context(*input_ids.shape, attention_mask)
        resid, _ = self._blocks(self.embed_in(input_ids), 0, self.cfg.num_layers, ctx)
        return self.unembed(resid)

    def run_hooks(self, input_ids: jax.Array, hooks: Sequence[str],
                  attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """input_ids [B,T] -> {hook: [B,T,D] float32}, running blocks only up to the deepest hook asked for."""
        if isinstance(hooks, str):
            hooks = [hooks]
        if not hooks:
            raise CrossjaxError("run_hooks needs at least one hook name, e.g. 'blocks.0.hook_resid_post'.")
        stop = max(validate_hook(self.cfg, h) for h in hooks)
        self._check_inputs(input_ids, attention_mask)
        ctx = self._context(*input_ids.shape, attention_mask)
        want = set(hooks)
        resid, out = self._blocks(self.embed_in(input_ids), 0, stop, ctx, want)
        if f"blocks.{stop}.hook_resid_pre" in want:  # the deepest hook is the input of block `stop`
            out[f"blocks.{stop}.hook_resid_pre"] = resid
        return {h: out[h] for h in hooks}

    def forward_from(self, hook: str, resid: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Resumes after a resid_pre/resid_post hook with a replaced residual resid [B,T,D] -> logits [B,T,V]."""
        layer, kind = parse_hook(self.cfg, hook)
        if kind not in ("hook_resid_pre", "hook_resid_post"):
            raise CrossjaxError(f"forward_from resumes only at residual hooks (hook_resid_pre / hook_resid_post), "
                                f"not {hook!r}: an attention or MLP output alone does not determine the residual.")
        if resid.ndim != 3 or resid.shape[-1] != self.cfg.hidden_size:
            raise CrossjaxError(f"resid must be [batch, tokens, {self.cfg.hidden_size}], got {tuple(resid.shape)}.")
        start = layer if kind == "hook_resid_pre" else layer + 1
        b, t, _ = resid.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (b, t):
            raise CrossjaxError(f"attention_mask shape {tuple(attention_mask.shape)} must be {(b, t)}.")
        ctx = self._context(b, t, attention_mask)
        out, _ = self._blocks(resid.astype(jnp.float32), start, self.cfg.num_layers, ctx)
        return self.unembed(out)


# ------------------------------------------------------------------------------------------------ functions
def lm_loss(logits: jax.Array, input_ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy: logits [B,T,V] at t predict input_ids [B,T] at t+1.

    mask [B,T] (1 = real token): a pair (t, t+1) counts only when both tokens are real. Returns a float32 scalar.
    """
    if logits.ndim != 3 or logits.shape[:2] != input_ids.shape or input_ids.shape[1] < 2:
        raise CrossjaxError(f"lm_loss needs logits [B,T,V] and input_ids [B,T] with T >= 2, got "
                            f"{tuple(logits.shape)} and {tuple(input_ids.shape)}.")
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = input_ids[:, 1:]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if mask is None:
        return nll.mean()
    m = (mask[:, 1:].astype(bool) & mask[:, :-1].astype(bool)).astype(jnp.float32)
    return (nll * m).sum() / jnp.maximum(m.sum(), 1.0)


def hf_param_names(cfg: NeoXConfig) -> list[tuple[tuple, str, bool]]:
    """The 1:1 map (flax state path, HF tensor name, transpose?) for every parameter of GPTNeoX(cfg).

    HF Linear weights are [out, in]; flax kernels are [in, out], hence the transpose. The fused QKV keeps HF's
    per-head [H, 3, hd] ordering of its output features, so it needs nothing beyond the transpose.
    """
    names: list[tuple[tuple, str, bool]] = [(("embed_in", "embedding"), "gpt_neox.embed_in.weight", False)]
    linears = [("attention", "query_key_value", cfg.attention_bias), ("attention", "dense", cfg.attention_bias),
               ("mlp", "dense_h_to_4h", True), ("mlp", "dense_4h_to_h", True)]
    for i in range(cfg.num_layers):
        hf = f"gpt_neox.layers.{i}"
        for ln in ("input_layernorm", "post_attention_layernorm"):
            names.append((("layers", i, ln, "scale"), f"{hf}.{ln}.weight", False))
            names.append((("layers", i, ln, "bias"), f"{hf}.{ln}.bias", False))
        for block, lin, bias in linears:
            names.append((("layers", i, block, lin, "kernel"), f"{hf}.{block}.{lin}.weight", True))
            if bias:
                names.append((("layers", i, block, lin, "bias"), f"{hf}.{block}.{lin}.bias", False))
    names.append((("final_layer_norm", "scale"), "gpt_neox.final_layer_norm.weight", False))
    names.append((("final_layer_norm", "bias"), "gpt_neox.final_layer_norm.bias", False))
    if not cfg.tie_word_embeddings:
        names.append((("embed_out", "kernel"), "embed_out.weight", True))
    return names


def abstract_model(cfg: NeoXConfig, *, dtype=jnp.float32, param_dtype=jnp.float32) -> GPTNeoX:
    """GPTNeoX(cfg) with jax.ShapeDtypeStruct leaves: shapes and parameter counts without allocating memory."""
    return nnx.eval_shape(lambda: GPTNeoX(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def count_params(model: GPTNeoX) -> int:
    """Total number of parameter elements (works on abstract models too)."""
    return sum(int(v.size) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))

