"""GPT-NeoX (the Pythia architecture) in Flax NNX, with named hook points on the residual stream.

Shapes: B batch, T tokens per context, D d_model, H heads, V vocabulary.

The module tree mirrors the Hugging Face checkpoint layout one to one (`hf_param_names` lists the pairs), so a
checkpoint loads tensor by tensor and a model trained here saves back in the format transformers reads.
Numerics follow transformers' GPTNeoXForCausalLM: pre-LayerNorm blocks with parallel or sequential residual,
rotate-half rotary embeddings on the first `num_rotary_dims` of every head, exact GELU, a separate unembedding.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from crossjax.errors import CrossjaxError
from crossjax.models.neox_config import NeoXConfig, parse_hook, validate_context_len, validate_hook


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

    def __call__(self, resid, cos, sin, mask, attn_out=None, mlp_out=None):
        """resid [B,T,D] -> (resid_post, attn_out, mlp_out), each [B,T,D] float32. A given attn_out or mlp_out
        [B,T,D] replaces that sublayer's output (what comes after it sees the replacement)."""
        if attn_out is None:
            attn_out = self.attention(self.input_layernorm(resid), cos, sin, mask)
        if self.use_parallel_residual:
            if mlp_out is None:
                mlp_out = self.mlp(self.post_attention_layernorm(resid))
            return resid + attn_out + mlp_out, attn_out, mlp_out
        mid = resid + attn_out
        if mlp_out is None:
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

    def _blocks(self, resid, start, stop, ctx, want=None, replace=None):
        """Runs blocks start..stop-1 on resid [B,T,D]; `want` collects {hook: [B,T,D]} on the way; `replace`
        (hook, value [B,T,D]) puts value in place of that hook's activation."""
        cos, sin, mask = ctx
        out = {}
        at, value = replace if replace is not None else (None, None)
        for i in range(start, stop):
            if at == f"blocks.{i}.hook_resid_pre":
                resid = value
            if want is not None and f"blocks.{i}.hook_resid_pre" in want:
                out[f"blocks.{i}.hook_resid_pre"] = resid
            resid, attn_out, mlp_out = self.layers[i](
                resid, cos, sin, mask, attn_out=value if at == f"blocks.{i}.hook_attn_out" else None,
                mlp_out=value if at == f"blocks.{i}.hook_mlp_out" else None)
            if at == f"blocks.{i}.hook_resid_post":
                resid = value
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

    def forward_replacing(self, input_ids: jax.Array, hook: str, value: jax.Array,
                          attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids [B,T] with the activation at `hook` replaced by value [B,T,D] -> logits [B,T,V] float32.

        Any hook kind: a residual replaces the whole stream there (what came before no longer matters and is
        compiled away under jit); an attention or MLP output replaces only that sublayer's output, so the residual
        that bypasses it still comes from input_ids.
        """
        parse_hook(self.cfg, hook)
        self._check_inputs(input_ids, attention_mask)
        if tuple(value.shape) != tuple(input_ids.shape) + (self.cfg.hidden_size,):
            raise CrossjaxError(f"the replacement at {hook} must be [batch, tokens, {self.cfg.hidden_size}] = "
                                f"{tuple(input_ids.shape) + (self.cfg.hidden_size,)}, got {tuple(value.shape)}.")
        ctx = self._context(*input_ids.shape, attention_mask)
        resid, _ = self._blocks(self.embed_in(input_ids), 0, self.cfg.num_layers, ctx,
                                replace=(hook, value.astype(jnp.float32)))
        return self.unembed(resid)


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

