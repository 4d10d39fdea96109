"""The crosscoder math (PAPER.md): parameters, encoder, activations, decoder and loss (the files: crosscoder_export.py).

Pure functions over a params dict; everything is jit-able and takes sharded arrays. Shapes: B batch rows (tokens),
S snapshots, D d_model, F dictionary features.

    params = {W_enc [S,D,F], b_enc [F], W_dec [S,F,D], b_dec [S,D], log_threshold [F]}   (float32)
    h[b,i]       = sum_s x[b,s] @ W_enc[s] + b_enc                     one pre-activation per token and feature
    n[s,i]       = ||W_dec[s,i,:]||                                     decoder norms
    jumprelu:    f[b,s,i] = h[b,i] * 1[h[b,i] n[s,i] > theta_i]         gated per snapshot, theta = exp(log_threshold)
    relu/topk/batchtopk: f[b,i], shared by every snapshot
    xhat[b,s]    = f[b,(s)] @ W_dec[s] + b_dec[s]

JumpReLU gradients (the authors' straight-through estimator, rectangle kernel of width eps = jump_bandwidth).
With z = h n and J(z) = z 1[z > theta] (so f = J / n and the tanh-quad penalty sees f n = J):
    dJ/dz     = 1[z > theta]                                   the gate passes gradient as if it were constant
    dJ/dtheta = -(theta / eps) 1[|z - theta| < eps/2] 1[z > 0]  (the rectangle-kernel estimate, positive z only)
Hence df/dh = 1[z > theta], df/dtheta = (dJ/dtheta) / n, and the gate sends *no* gradient to the decoder norms
(d(J(hn)/n)/dn = 0): n learns only through the reconstruction and the penalty tanh(k f n), whose n-gradient is
k h 1[z > theta] sech^2(k J). log_threshold receives theta * dL/dtheta.

Mixed precision: matmuls take `compute_dtype` operands (bfloat16 for speed) and accumulate in float32; their
backward passes cast the incoming cotangent to `compute_dtype` too (plain autodiff would run them in float32), so
all five matmuls of a training step (the encoder's input gradient is never computed) ask for `compute_dtype`.
Parameters, activations f, penalties and parameter gradients stay float32. (XLA:CPU itself upcasts the two
backward decoder matmuls to float32: it has no bf16 kernel for those batched layouts.)
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from crossjax import metrics
from crossjax.crosscoder_config import ACTIVATIONS, CrosscoderConfig  # noqa: F401 (public here too)
from crossjax.errors import CrossjaxError

PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "log_threshold")
Params = dict  # name -> float32 array, see the module docstring


# ----------------------------------------------------------------------------------------------------------------
# Parameters

def param_shapes(cfg: CrosscoderConfig) -> dict[str, tuple[int, ...]]:
    s, d, f = cfg.num_snapshots, cfg.d_model, cfg.num_features
    return {"W_enc": (s, d, f), "b_enc": (f,), "W_dec": (s, f, d), "b_dec": (s, d), "log_threshold": (f,)}


def check_params(params: Mapping[str, Any], cfg: CrosscoderConfig) -> None:
    """Raise CrossjaxError naming the params that are missing or do not have the shapes cfg gives them."""
    shapes = param_shapes(cfg)
    missing = [k for k in shapes if k not in params]
    if missing:
        raise CrossjaxError(f"crosscoder params lack {missing}; build them with crosscoder.init_params")
    wrong = {k: (tuple(params[k].shape), shapes[k]) for k in shapes if tuple(params[k].shape) != shapes[k]}
    if wrong:
        raise CrossjaxError(f"crosscoder param shapes (got, expected) {wrong} do not match the config "
                            f"(S={cfg.num_snapshots}, D={cfg.d_model}, F={cfg.num_features}); "
                            "use the config the params were made with")


def _check_batch(x, cfg: CrosscoderConfig) -> None:
    if x.ndim != 3 or tuple(x.shape[1:]) != (cfg.num_snapshots, cfg.d_model):
        raise CrossjaxError(f"x has shape {tuple(x.shape)}; the crosscoder expects [B, S={cfg.num_snapshots}, "
                            f"D={cfg.d_model}] (rows, snapshots, d_model)")


# ----------------------------------------------------------------------------------------------------------------
# Initialisation

def init_params(key: jax.Array, cfg: CrosscoderConfig, init_norm: float) -> Params:
    """Paper initialisation: one uniform decoder [F,D] with rows of norm `init_norm`, copied to every snapshot;
    W_enc[s] = W_dec[s].T; biases 0; log_threshold = log(threshold_init). Returns float32 params (shapes above)."""
    if isinstance(init_norm, (int, float)) and not (math.isfinite(init_norm) and init_norm > 0):
        raise CrossjaxError(f"init_norm={init_norm} must be a finite number > 0 (or use grid_search_init_norm)")
    s, d, f = cfg.num_snapshots, cfg.d_model, cfg.num_features
    w = jax.random.uniform(key, (f, d), jnp.float32, minval=-1.0, maxval=1.0)
    w = w * (jnp.asarray(init_norm, jnp.float32) / jnp.linalg.norm(w, axis=-1, keepdims=True))
    return {
        "W_enc": jnp.broadcast_to(w.T[None], (s, d, f)),
        "b_enc": jnp.zeros((f,), jnp.float32),
        "W_dec": jnp.broadcast_to(w[None], (s, f, d)),
        "b_dec": jnp.zeros((s, d), jnp.float32),
        "log_threshold": jnp.full((f,), math.log(cfg.threshold_init), jnp.float32),
    }


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype"))
def _init_mse(key, x, init_norm, cfg, compute_dtype):
    params = init_params(key, cfg, init_norm)
    xhat = forward(params, x, cfg, compute_dtype=compute_dtype)["xhat"]
    return jnp.mean(jnp.sum(jnp.square(x.astype(jnp.float32) - xhat), axis=-1))


def grid_search_init_norm(key: jax.Array, cfg: CrosscoderConfig, x: jax.Array, *,
                          compute_dtype=jnp.float32) -> float:
    """The initial decoder row norm minimising the reconstruction MSE of `x` [B,S,D] at initialisation (`key` as
    for init_params): coarse grid linspace(0.1, 1, 10), then steps of 0.01 within 0.1 of the coarse minimum."""
    _check_batch(x, cfg)
    cd = jnp.dtype(compute_dtype)

    def best(norms):
        losses = [float(_init_mse(key, x, jnp.float32(v), cfg, cd)) for v in norms]
        if not all(math.isfinite(v) for v in losses):
            raise CrossjaxError("the init-norm grid search met a non-finite MSE; check the batch for inf/nan")
        return float(norms[int(np.argmin(losses))])

    coarse = best(np.linspace(0.1, 1.0, 10))
    fine = np.round(coarse + np.linspace(-0.1, 0.1, 21), 6)
    return best(fine[fine > 0])


# ----------------------------------------------------------------------------------------------------------------
# Mixed-precision einsum: compute_dtype operands, float32 accumulation, same policy in the backward pass

def _mm(spec: str, a, b, cd):
    return jnp.einsum(spec, a.astype(cd), b.astype(cd), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def mixed_einsum(spec: str, a: jax.Array, b: jax.Array, compute_dtype) -> jax.Array:
    """einsum(spec, a, b) with operands cast to compute_dtype and a float32 result. Every index of `a` must appear
    in `b` or the output (and likewise for `b`), which holds for all uses here."""
    return _mm(spec, a, b, compute_dtype)


def _mixed_einsum_fwd(spec, a, b, cd):
    return _mm(spec, a, b, cd), (a, b)


def _mixed_einsum_bwd(spec, cd, res, g):
    a, b = res
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    g = g.astype(cd)
    da = _mm(f"{out},{sb}->{sa}", g, b, cd).astype(a.dtype)
    db = _mm(f"{sa},{out}->{sb}", a, g, cd).astype(b.dtype)
    return da, db


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


# ----------------------------------------------------------------------------------------------------------------
# Encoder, activations, decoder

def encode(params: Params, x: jax.Array, *, compute_dtype=jnp.float32) -> jax.Array:
    """h [B,F] float32 = sum_s x[:,s] @ W_enc[s] + b_enc: one matmul contracting (snapshot, d_model) together."""
    return mixed_einsum("bsd,sdf->bf", x, params["W_enc"], jnp.dtype(compute_dtype)) + params["b_enc"]


def decoder_norms(params: Params) -> jax.Array:
    """n [S,F] = ||W_dec[s,i,:]||; a zero row gets norm 1e-15 (not 0) so that its gradient stays finite."""
    return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(params["W_dec"]), axis=-1), 1e-30))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def jumprelu_gate(h, n, theta, eps, tanh_k, tanh_c, compute_dtype):
    """Per-snapshot JumpReLU and its tanh-quad penalty.

    h [B,F], n [S,F], theta [F] -> (f [S,B,F] float32, penalty scalar) with
    f[s,b,i] = h[b,i] 1[h[b,i] n[s,i] > theta_i], penalty = sum_i p_i (1 + p_i / c), p_i = mean_{b,s} tanh(k f n).
    f is snapshot-major so that the per-snapshot decoder is a batched matmul with a leading batch axis (XLA:CPU
    has no bf16 x bf16 -> f32 kernel for a batch axis in the middle). The tanh values are rounded to compute_dtype
    before their float32 mean (halves the memory traffic of the largest elementwise tensor; the rounding is
    unbiased and averages out over B*S terms). The backward pass is the straight-through estimator of the module
    docstring; it keeps only h, n, theta and p, never an [S,B,F] tensor.
    """
    return _jumprelu_fwd(h, n, theta, eps, tanh_k, tanh_c, compute_dtype)[0]


def _jumprelu_tanh(z, gate, tanh_k, cd):
    return jnp.tanh(tanh_k * jnp.where(gate, z, 0.0)).astype(cd).astype(jnp.float32)


def _jumprelu_fwd(h, n, theta, eps, tanh_k, tanh_c, cd):
    z = h[None] * n[:, None, :]                                        # [S,B,F]
    gate = z > theta
    f = jnp.where(gate, h[None], 0.0)
    p = jnp.mean(_jumprelu_tanh(z, gate, tanh_k, cd), axis=(0, 1))     # [F]
    penalty = jnp.sum(p * (1.0 + p / tanh_c))
    return (f, penalty), (h, n, theta, p)


def _jumprelu_bwd(eps, tanh_k, tanh_c, cd, res, cts):
    h, n, theta, p = res
    df, dpen = cts
    bsz, s = h.shape[0], n.shape[0]
    n3 = n[:, None, :]
    z = h[None] * n3                                                   # [S,B,F]
    gate = z > theta
    t = _jumprelu_tanh(z, gate, tanh_k, cd)                            # the forward's values (XLA reuses them)
    w = dpen * (1.0 + 2.0 * p / tanh_c) * (tanh_k / (bsz * s))          # [F]
    dj = w * (1.0 - t * t)                                              # dL/dJ through the penalty, [S,B,F]
    df = df.astype(jnp.float32)
    # dh = sum_s (...): a contraction with ones rather than a reduce. XLA:CPU reduces a leading axis ~5x slower
    # than it multiplies, and a contraction over a sharded snapshot axis still becomes one all-reduce.
    dh = jnp.einsum("s,sbf->bf", jnp.ones((s,), jnp.float32), jnp.where(gate, df + n3 * dj, 0.0),
                    precision=jax.lax.Precision.HIGHEST)
    dn = jnp.sum(jnp.where(gate, h[None] * dj, 0.0), axis=1)
    window = (jnp.abs(z - theta) < 0.5 * eps) & (z > 0)
    safe_n = jnp.where(n3 > 0, n3, 1.0)
    dtheta = (-theta / eps) * jnp.sum(jnp.where(window, df / safe_n + dj, 0.0), axis=(0, 1))
    # the barrier keeps XLA:CPU from fusing the dh computation into the encoder-gradient matmul (slower there)
    return jax.lax.optimization_barrier(dh), dn, dtheta


jumprelu_gate.defvjp(_jumprelu_fwd, _jumprelu_bwd)


def _scatter_rows(shape, idx, vals):
    """Dense [B,F] with vals [B,k] at columns idx [B,k] of each row."""
    rows = jnp.arange(shape[0])[:, None]
    return jnp.zeros(shape, vals.dtype).at[rows, idx].set(vals)


def _activate(params, h, n, cfg: CrosscoderConfig, cd):
    """(acts, penalty): acts [S,B,F] (jumprelu) or [B,F] (shared), float32; penalty before coef."""
    if cfg.activation == "jumprelu":
        theta = jnp.exp(params["log_threshold"])
        return jumprelu_gate(h, n, theta, cfg.jump_bandwidth, cfg.tanh_k, cfg.tanh_c, cd)
    if cfg.activation == "relu":
        f = jax.nn.relu(h)
        return f, jnp.sum(jnp.mean(f, axis=0) * jnp.sum(n, axis=0))   # L1 weighted by sum_s n[s,i]
    if cfg.activation == "topk":
        vals, idx = jax.lax.top_k(h, cfg.k)
        return _scatter_rows(h.shape, idx, jax.nn.relu(vals)), jnp.zeros((), jnp.float32)
    # batchtopk: the k*B largest pre-activations over the whole batch
    vals, idx = jax.lax.top_k(h.reshape(-1), cfg.k * h.shape[0])
    f = jnp.zeros((h.size,), h.dtype).at[idx].set(jax.nn.relu(vals)).reshape(h.shape)
    return f, jnp.zeros((), jnp.float32)


def activate(params: Params, h: jax.Array, cfg: CrosscoderConfig, *, compute_dtype=jnp.float32) -> jax.Array:
    """Feature activations from h [B,F] (float32): [B,S,F] for jumprelu, else [B,F] (shared by all snapshots)."""
    acts = _activate(params, h, decoder_norms(params), cfg, jnp.dtype(compute_dtype))[0]
    return jnp.swapaxes(acts, 0, 1) if acts.ndim == 3 else acts


def _decode(params, acts, cd):
    """xhat [B,S,D] float32 from acts [S,B,F] (per-snapshot, snapshot-major) or [B,F] (shared)."""
    if acts.ndim == 3:
        return jnp.swapaxes(mixed_einsum("sbf,sfd->sbd", acts, params["W_dec"], cd), 0, 1) + params["b_dec"]
    return mixed_einsum("bf,sfd->bsd", acts, params["W_dec"], cd) + params["b_dec"]


def decode(params: Params, acts: jax.Array, *, compute_dtype=jnp.float32) -> jax.Array:
    """xhat [B,S,D] float32 from acts [B,S,F] (per-snapshot) or [B,F] (shared by all snapshots)."""
    cd = jnp.dtype(compute_dtype)
    return _decode(params, jnp.swapaxes(acts, 0, 1) if acts.ndim == 3 else acts, cd)


def forward(params: Params, x: jax.Array, cfg: CrosscoderConfig, *, compute_dtype=jnp.float32) -> dict:
    """x [B,S,D] (normalised) -> dict(h [B,F], acts [B,S,F] or [B,F], xhat [B,S,D] float32)."""
    check_params(params, cfg)
    _check_batch(x, cfg)
    cd = jnp.dtype(compute_dtype)
    h = encode(params, x, compute_dtype=cd)
    acts, _ = _activate(params, h, decoder_norms(params), cfg, cd)
    xhat = _decode(params, acts, cd)
    return {"h": h, "acts": jnp.swapaxes(acts, 0, 1) if acts.ndim == 3 else acts, "xhat": xhat}


def normalize(x: jax.Array, scales, *, dtype=None) -> jax.Array:
    """x [B,S,D] * scales[None,:,None] (the store's per-snapshot scales, [S]); float32 unless `dtype` is given."""
    scales = jnp.asarray(scales, jnp.float32)
    if scales.ndim != 1 or x.ndim != 3 or scales.shape[0] != x.shape[1]:
        raise CrossjaxError(f"normalize needs x [B,S,D] and scales [S]; got {tuple(x.shape)} and "
                            f"{tuple(scales.shape)}: use the scales of the store the batch came from")
    out = x.astype(jnp.float32) * scales[None, :, None]
    return out if dtype is None else out.astype(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Loss

def _auxk_loss(params, h, err, dead_mask, cfg: CrosscoderConfig, cd):
    """Gao et al. 2024: reconstruct the (frozen) residual err [B,S,D] from the top aux_k dead features' relu
    pre-activations; normalised MSE sum ||err - ehat||^2 / sum ||err||^2, and 0 when no feature is dead."""
    e = jax.lax.stop_gradient(err)
    kaux = min(cfg.aux_k, cfg.num_features)
    vals, idx = jax.lax.top_k(jnp.where(dead_mask[None, :], h, -jnp.inf), kaux)
    vals = jnp.where(vals > 0, vals, 0.0)                                 # relu; also drops the -inf fillers
    ehat = mixed_einsum("bf,sfd->bsd", _scatter_rows(h.shape, idx, vals), params["W_dec"], cd)
    ratio = jnp.sum(jnp.square(e - ehat)) / jnp.maximum(jnp.sum(jnp.square(e)), 1e-30)
    return jnp.where(jnp.any(dead_mask), ratio, 0.0)


def loss_fn(params: Params, x: jax.Array, cfg: CrosscoderConfig, *, sparsity_coef, dead_mask=None,
            compute_dtype=jnp.float32):
    """Training loss of one batch x [B,S,D] (already normalised) and its statistics.

    loss = mse + sparsity_coef * sparsity + aux_coef * aux_loss, with
      mse      = mean over batch and snapshots of ||x - xhat||^2 (summed over D)
      sparsity = jumprelu: tanh-quad penalty; relu: mean_b sum_i f_i sum_s n[s,i]; topk/batchtopk: 0
      aux_loss = AuxK (topk/batchtopk with a dead_mask [F] bool given), else 0
    aux (all float32 unless noted; sums and means are over this batch only):
      mse_per_snapshot [S], mse, sparsity, sparsity_term, aux_loss, aux_term, loss,
      l0_per_snapshot [S] (mean active features per token), fired [F] bool (active anywhere in the batch),
      and metrics.batch_sums(x, xhat): sse [S], x_sum [S,D], x_sq_sum [S], legacy_sum [S], count (rows), the
      sums metrics.EVAccumulator adds up exactly.
    """
    check_params(params, cfg)
    _check_batch(x, cfg)
    if dead_mask is not None and tuple(dead_mask.shape) != (cfg.num_features,):
        raise CrossjaxError(f"dead_mask has shape {tuple(dead_mask.shape)}; expected [F={cfg.num_features}] bool")
    cd = jnp.dtype(compute_dtype)
    h = encode(params, x, compute_dtype=cd)
    n = decoder_norms(params)
    acts, sparsity = _activate(params, h, n, cfg, cd)
    xhat = _decode(params, acts, cd)
    xf = x.astype(jnp.float32)
    err = xf - xhat
    sq = jnp.sum(jnp.square(err), axis=-1)                                 # [B,S]
    mse_per_snapshot = jnp.mean(sq, axis=0)
    mse = jnp.mean(mse_per_snapshot)
    if dead_mask is not None and cfg.activation in ("topk", "batchtopk"):
        aux_loss = _auxk_loss(params, h, err, dead_mask.astype(bool), cfg, cd)
    else:
        aux_loss = jnp.zeros((), jnp.float32)
    sparsity_term = sparsity_coef * sparsity
    aux_term = cfg.aux_coef * aux_loss
    loss = mse + sparsity_term + aux_term

    sg = jax.lax.stop_gradient
    if cfg.activation == "jumprelu":
        # acts >= 0, so sign() counts the active ones; it reads the compute_dtype copy the decoder matmul made
        l0 = jnp.sum(jnp.sign(sg(acts).astype(cd)), axis=(1, 2), dtype=jnp.float32) / x.shape[0]
        # some (b, s) has h n > theta  <=>  (max_b h)(max_s n) > theta, since n >= 0: no [S,B,F] pass needed
        h_, n_ = sg(h), sg(n)
        fired = jnp.max(h_, axis=0) * jnp.max(n_, axis=0) > jnp.exp(sg(params["log_threshold"]))
    else:
        active = sg(acts) > 0                                                              # [B,F]
        l0 = jnp.broadcast_to(jnp.mean(jnp.sum(active, axis=-1, dtype=jnp.float32)), (cfg.num_snapshots,))
        fired = jnp.any(active, axis=0)
    aux = {
        "loss": sg(loss), "mse": sg(mse), "mse_per_snapshot": sg(mse_per_snapshot),
        "sparsity": sg(sparsity), "sparsity_term": sg(sparsity_term),
        "aux_loss": sg(aux_loss), "aux_term": sg(aux_term),
        "l0_per_snapshot": l0, "fired": fired,
        **metrics.batch_sums(sg(xf), sg(xhat)),
    }
    return loss, aux
