"""Spliced-in loss: the LM's next-token loss when the hook's activation is replaced by the crosscoder's reconstruction.

    from crossjax.crosscoder_export import load_exported
    out = spliced_loss(["snap/step1000", "snap/step143000"], load_exported("runs/x/export"),
                       "blocks.6.hook_resid_post", contexts)      # tokens.Contexts, or (input_ids, valid)
    out["step1000"]  # {clean_loss, spliced_loss, zero_ablated_loss, loss_recovered, delta_loss, pairs}

Per snapshot s, over the same contexts:
- clean_loss: the model's own loss;
- spliced_loss: the activation at the hook replaced, at every valid position, by the crosscoder's reconstruction
  xhat[:, s] / scale[s] (the crosscoder sees x * scale, as in training), the rest of the model run on it;
- zero_ablated_loss: the activation at the valid positions set to 0 instead;
- loss_recovered = (zero_ablated - spliced) / (zero_ablated - clean) (1 = the reconstruction loses nothing);
- delta_loss = spliced - clean; pairs = the number of next-token predictions averaged over.
Positions that are not valid (BOS, padding, special tokens: the ones the store does not hold) keep their clean
activation, as the crosscoder never saw them. The loss is crossjax.models.lm_loss: the mean over next-token pairs
(t, t+1) that lie inside the attention mask; the mask defaults to each context's prefix up to its last valid
position (right padding).
Any hook kind works: at a residual hook the whole stream is replaced; at an attention or MLP output only that
sublayer's output is, and the residual that bypasses it is the model's own.

The encoder sums over snapshots, so every snapshot's activation is needed before any can be reconstructed. Hence
two passes, one model in memory at a time: (1) run each snapshot to the hook and keep its valid positions on the
host, x [N, S, D] float32 (N = valid positions; this is the memory bound, as large as N rows of the activation
store in float32); (2) reconstruct all rows; (3) for each snapshot, rerun to the hook and finish the clean,
spliced and zero-ablated forwards. Snapshots given as directories are loaded in both passes; pass LoadedSnapshots
to load them once.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crossjax import console
from crossjax import crosscoder as cc, crosscoder_export
from crossjax.errors import CrossjaxError
from crossjax.models.gpt_neox import lm_loss, parse_hook
from crossjax.models.load import LoadedSnapshot, load_snapshot
from crossjax.models.runner import Runner

Reconstruct = Callable[[np.ndarray], Any]  # x [n,S,D] normalised -> xhat [n,S,D] normalised


# ----------------------------------------------------------------------------------------------------------------
# Jitted pieces (the activation at the hook comes from models.Runner); the graphdef is static so snapshots of
# one architecture share one compilation


@functools.partial(jax.jit, static_argnames=("graphdef", "hook"))
def _losses(graphdef, state, input_ids, mask, valid, xhat, *, hook):
    """(clean, spliced, zero-ablated) mean next-token losses of one batch; xhat [B,T,D] is used where valid."""
    model = nnx.merge(graphdef, state)
    act = model.run_hooks(input_ids, [hook], mask)[hook]
    v = valid[..., None]
    clean = lm_loss(model(input_ids, mask), input_ids, mask)  # the plain forward, not forward_replacing
    spliced = lm_loss(model.forward_replacing(input_ids, hook, jnp.where(v, xhat, act), mask), input_ids, mask)
    zero = lm_loss(model.forward_replacing(input_ids, hook, jnp.where(v, 0.0, act), mask), input_ids, mask)
    return clean, spliced, zero


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype"))
def _crosscoder_xhat(params, x, *, cfg, compute_dtype):
    return cc.forward(params, x, cfg, compute_dtype=compute_dtype)["xhat"]


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def _contexts(contexts: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids [C,T] int32, valid [C,T] bool, mask [C,T] bool) from a Contexts, a tuple or a dict."""
    if hasattr(contexts, "input_ids") and hasattr(contexts, "valid"):
        ids, valid = contexts.input_ids, contexts.valid
    elif isinstance(contexts, Mapping):
        ids, valid = contexts.get("input_ids"), contexts.get("valid")
    elif isinstance(contexts, (tuple, list)) and len(contexts) == 2:
        ids, valid = contexts
    else:
        raise CrossjaxError(f"contexts of type {type(contexts).__name__}: give a tokens.Contexts, a tuple "
                            "(input_ids [C,T], valid [C,T]) or a dict with those keys.")
    ids, valid = np.asarray(ids), np.asarray(valid)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise CrossjaxError(f"input_ids must be an integer array [contexts, tokens], got {ids.dtype} {ids.shape}.")
    if valid.shape != ids.shape or valid.dtype != bool:
        raise CrossjaxError(f"valid must be a bool array of the input_ids' shape {ids.shape}, got {valid.dtype} "
                            f"{valid.shape}.")
    if not valid.any():
        raise CrossjaxError("no position is valid: mark the positions to splice (the stored rows) in valid.")
    if attention_mask is None:
        from crossjax.tokens import prefix_mask
        mask = prefix_mask(valid)
    else:
        mask = np.asarray(attention_mask).astype(bool)
        if mask.shape != ids.shape:
            raise CrossjaxError(f"attention_mask has shape {mask.shape}; it must be the input_ids' {ids.shape}.")
        if (valid & ~mask).any():
            raise CrossjaxError("some valid positions lie outside the attention mask: only real tokens can be "
                                "spliced; mark padding as not valid.")
    return ids.astype(np.int32), valid, mask


def _snapshot_items(snapshots: Any) -> list[tuple[str, LoadedSnapshot | str]]:
    """[(name, LoadedSnapshot or directory)]: names are given (mapping), the snapshot's name, or the dir's name."""
    if isinstance(snapshots, (str, os.PathLike, LoadedSnapshot)):
        snapshots = [snapshots]
    items = list(snapshots.items()) if isinstance(snapshots, Mapping) else [(None, s) for s in snapshots]
    if not items:
        raise CrossjaxError("no snapshots given: pass the crosscoder's snapshots in its order.")
    out = []
    for name, s in items:
        if isinstance(s, LoadedSnapshot):
            out.append((name or s.name or str(s.path), s))
        elif isinstance(s, (str, os.PathLike)):
            out.append((name or Path(s).name, os.fspath(s)))
        else:
            raise CrossjaxError(f"snapshot {s!r} is neither a LoadedSnapshot nor a directory.")
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CrossjaxError(f"snapshot names {dup} repeat: pass a mapping name -> snapshot to name them apart.")
    return [(str(n), s) for n, s in out]


def _load(s: LoadedSnapshot | str) -> LoadedSnapshot:
    return s if isinstance(s, LoadedSnapshot) else load_snapshot(s)


def _reconstructor(crosscoder: Any, reconstruct: Reconstruct | None, scales: Any, num_snapshots: int,
                   compute_dtype) -> tuple[Reconstruct, np.ndarray, int | None]:
    """(x_normalised [n,S,D] -> xhat_normalised, scales [S], d_model or None)."""
    d_model = None
    if crosscoder is not None:
        params, cc_scales, cfg = crosscoder_export.load_exported(os.fspath(crosscoder)) if isinstance(
            crosscoder, (str, os.PathLike)) else crosscoder
        if not isinstance(cfg, cc.CrosscoderConfig):
            raise CrossjaxError("crosscoder must be an export directory or (params, scales, CrosscoderConfig) as "
                                "returned by crosscoder_export.load_exported.")
        if cfg.num_snapshots != num_snapshots:
            raise CrossjaxError(f"the crosscoder covers {cfg.num_snapshots} snapshots but {num_snapshots} were given: "
                                "pass exactly the snapshots it was trained on, in its order.")
        d_model = cfg.d_model
        scales = cc_scales if scales is None else scales
        if reconstruct is None:
            params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
            cd = jnp.dtype(compute_dtype)
            reconstruct = lambda x: _crosscoder_xhat(params, jnp.asarray(x), cfg=cfg, compute_dtype=cd)
    elif reconstruct is None:
        raise CrossjaxError("give a crosscoder (export dir or (params, scales, cfg)) or a reconstruct function.")
    scales = np.ones(num_snapshots, np.float32) if scales is None else np.asarray(scales, np.float32).reshape(-1)
    if scales.shape != (num_snapshots,) or not np.all(np.isfinite(scales)) or np.any(scales <= 0):
        raise CrossjaxError(f"scales {scales.tolist()} must be {num_snapshots} finite positive numbers, one per snapshot.")
    return reconstruct, scales, d_model


# ----------------------------------------------------------------------------------------------------------------
# The loss


def spliced_loss(snapshots: Sequence[LoadedSnapshot | str] | Mapping[str, LoadedSnapshot | str],
                 crosscoder: str | os.PathLike | tuple | None, hook: str, contexts: Any, *,
                 reconstruct: Reconstruct | None = None, scales: Any = None, attention_mask: Any = None,
                 batch_size: int = 8, rows_per_batch: int = 4096, compute_dtype=jnp.float32,
                 progress: bool = False) -> dict[str, dict[str, float]]:
    """Clean, spliced-in and zero-ablated next-token loss per snapshot (see the module docstring).

    snapshots: the crosscoder's S snapshots in its order: LoadedSnapshots or directories (or a mapping name -> one).
    crosscoder: an export directory or (params, scales [S], CrosscoderConfig) as from crosscoder_export.load_exported;
      None when `reconstruct` is given.
    hook: the crosscoder's hook (blocks.{i}.hook_resid_post, hook_resid_pre, hook_attn_out or hook_mlp_out).
    contexts: tokens.Contexts or (input_ids [C,T], valid [C,T] bool); valid positions are spliced.
    reconstruct: replaces the crosscoder's forward: x * scales [n,S,D] -> reconstruction in the same space.
    scales: [S] normalisation scales, overriding the crosscoder's (default: ones without a crosscoder).
    batch_size: contexts per forward; rows_per_batch: rows per crosscoder forward.
    progress: say each snapshot's losses on stderr (crossjax.spliced: ...) as they are measured.
    Returns {snapshot name: {clean_loss, spliced_loss, zero_ablated_loss, loss_recovered, delta_loss, pairs}}.
    """
    items = _snapshot_items(snapshots)
    num_s = len(items)
    ids, valid, mask = _contexts(contexts, attention_mask)
    fn, scales, d_model = _reconstructor(crosscoder, reconstruct, scales, num_s, compute_dtype)
    for name, value in (("batch_size", batch_size), ("rows_per_batch", rows_per_batch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise CrossjaxError(f"{name}={value!r} must be a positive integer.")
    num_ctx = ids.shape[0]
    batches = [slice(a, min(a + batch_size, num_ctx)) for a in range(0, num_ctx, batch_size)]
    row_start = np.concatenate([[0], np.cumsum(valid.sum(axis=1))])  # first valid row of each context
    n = int(row_start[-1])

    def checked(name, snap) -> LoadedSnapshot:
        loaded = _load(snap)
        cfg = loaded.config
        parse_hook(cfg, hook)
        if d_model is not None and cfg.hidden_size != d_model:
            raise CrossjaxError(f"snapshot {name!r} has hidden size {cfg.hidden_size} but the crosscoder's d_model is "
                                f"{d_model}: pass the snapshots the crosscoder was trained on.")
        if int(ids.max()) >= cfg.vocab_size or int(ids.min()) < 0:
            raise CrossjaxError(f"input_ids hold ids in [{int(ids.min())}, {int(ids.max())}] but snapshot {name!r} has "
                                f"vocab_size {cfg.vocab_size}: tokenize with the snapshots' tokenizer.")
        return loaded

    # pass 1: every snapshot's activation at the valid positions, x [N,S,D]
    x = None
    for s, (name, snap) in enumerate(items):
        loaded = checked(name, snap)
        runner = Runner(loaded.model)
        if x is None:
            x = np.empty((n, num_s, loaded.config.hidden_size), np.float32)
        elif x.shape[2] != loaded.config.hidden_size:
            raise CrossjaxError(f"snapshot {name!r} has hidden size {loaded.config.hidden_size}, the first snapshot "
                                f"{x.shape[2]}: all snapshots must be one architecture.")
        for sl in batches:
            resid = np.asarray(runner.hook(ids[sl], hook, mask[sl]))
            x[row_start[sl.start]:row_start[sl.stop], s] = resid[valid[sl]]
        del loaded, runner

    # pass 2: reconstruct in the crosscoder's normalised space, back to the model's scale, in place
    for a in range(0, n, rows_per_batch):
        b = min(a + rows_per_batch, n)
        xhat = np.asarray(fn(x[a:b] * scales[None, :, None]), np.float32)
        if xhat.shape != (b - a,) + x.shape[1:]:
            raise CrossjaxError(f"the reconstruction has shape {xhat.shape}; expected {(b - a,) + x.shape[1:]} "
                                "(rows, snapshots, d_model).")
        x[a:b] = xhat / scales[None, :, None]

    # pass 3: clean, spliced and zero-ablated losses, one snapshot at a time
    pairs_per_batch = [int((mask[sl, 1:] & mask[sl, :-1]).sum()) for sl in batches]
    pairs = sum(pairs_per_batch)
    if pairs == 0:
        raise CrossjaxError("the contexts hold no next-token pair inside the attention mask: give longer contexts.")
    out = {}
    for s, (name, snap) in enumerate(items):
        loaded = checked(name, snap)
        graphdef, state = nnx.split(loaded.model)
        sums = np.zeros(3, np.float64)
        for sl, p in zip(batches, pairs_per_batch):
            dense = np.zeros(ids[sl].shape + (x.shape[2],), np.float32)
            dense[valid[sl]] = x[row_start[sl.start]:row_start[sl.stop], s]
            losses = _losses(graphdef, state, ids[sl], mask[sl], valid[sl], dense, hook=hook)
            sums += np.asarray(jax.device_get(losses), np.float64) * p  # batch means -> sums over pairs
        clean, spliced, zero = sums / pairs
        recovered = (zero - spliced) / (zero - clean) if zero != clean else float("nan")
        out[name] = dict(clean_loss=float(clean), spliced_loss=float(spliced), zero_ablated_loss=float(zero),
                         loss_recovered=float(recovered), delta_loss=float(spliced - clean), pairs=int(pairs))
        console.say("spliced", f"{name}: clean {clean:.4f}  spliced {spliced:.4f}  zero-ablated {zero:.4f}  "
                    f"recovered {recovered:.3f}", enabled=progress)
    return out
