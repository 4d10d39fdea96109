"""A snapshot with the crosscoder spliced in at the hook, as a function of its features: the object attribution
differentiates.

    cc = Crosscoder.of("runs/x/export")                          # or Crosscoder.of((params, scales, cfg))
    res = collect_residuals(snapshots, "blocks.6.hook_resid_post", task)   # pass 1: every snapshot to the hook
    h_clean, h_corr = cc.encode(res.clean, task.valid), cc.encode(res.corrupted, task.valid)
    sp = Splice(loaded_model, hook, cc, s, task, res.clean[s], res.corrupted[s], h_clean, h_corr)
    m, per_pair = sp.metric(sp.f_clean)                           # = the model's own metric (checked)

The crosscoder encodes from all S snapshots at once (h = sum_s x_s W_enc[s] + b_enc), so every snapshot's
activation at the hook is collected first, for the clean and the corrupted prompts (`collect_residuals`, one model
in memory at a time; [S,P,T,D] float32 each). For snapshot s, the features are f_s = the activation of h at s
([P,T,F]; JumpReLU gates each snapshot with its own decoder norm), and the activation at the hook is replaced at
every valid position by

    act'(f) = (f @ W_dec[s] + b_dec[s]) / scale[s] + stop_gradient(err),   err = act - xhat(f_clean)

so act'(f_clean) = act: the output is unchanged (Splice checks it against the plain forward) and changing f
changes the output only through the reconstruction. Positions that are not valid (BOS, special tokens) keep
`base`, their own activation. The model always runs on the clean prompts: at a residual hook the replaced stream
is all that comes after sees, so the corrupted activation patched in gives the corrupted run itself; at an
attention or MLP output the residual that bypasses the hook stays the clean prompts', and "corrupted" means the
clean run with the corrupted prompts' activation patched in at the hook (the metric_corrupted it reports). The
metric of pair p is logit(right_p) - logit(wrong_p) at its last real token; `metric` returns the mean over pairs
and the per-pair values.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crossjax import crosscoder as cc_lib, crosscoder_export
from crossjax.errors import CrossjaxError
from crossjax.models.gpt_neox import parse_hook
from crossjax.models.load import LoadedSnapshot, load_snapshot
from crossjax.models.runner import Runner

UNCHANGED_TOLERANCE = 1e-3   # |spliced - plain| metric, relative to 1 + |plain|: float rounding only


# ----------------------------------------------------------------------------------------------------------------
# Jitted pieces: the graphdef is static, so the snapshots of one architecture share one compilation


def _readout(logits, last, right, wrong):
    """logits [P,T,V] -> per-pair logit(right) - logit(wrong) at position last, [P]."""
    p = jnp.arange(last.shape[0])
    at = logits[p, last]
    return at[p, right] - at[p, wrong]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _plain_metric(graphdef, state, ids, mask, last, right, wrong):
    return _readout(nnx.merge(graphdef, state)(ids, mask), last, right, wrong)


@functools.partial(jax.jit, static_argnames=("graphdef", "hook"))
def _patched_metric(graphdef, state, ids, act, mask, last, right, wrong, *, hook):
    """The metric of ids [P,T] with the activation at the hook replaced by act [P,T,D]."""
    return _readout(nnx.merge(graphdef, state).forward_replacing(ids, hook, act, mask), last, right, wrong)


def _reconstruct(f, w_dec, b_dec, inv_scale):
    """f [P,T,F] -> xhat [P,T,D] at the model's scale (the decoder of one snapshot, then 1 / its scale)."""
    return (jnp.einsum("ptf,fd->ptd", f, w_dec, precision=jax.lax.Precision.HIGHEST) + b_dec) * inv_scale


def _spliced_logits(graphdef, state, f, err, base, ids, w_dec, b_dec, inv_scale, valid, mask, hook):
    """[P,T,V] logits of ids [P,T] with act' = xhat(f) + err at valid positions and base elsewhere. err is an input
    of its own, a constant for d/df (what stop_gradient(act - xhat(f_clean)) is), and differentiable for the error
    node."""
    xhat = _reconstruct(f, w_dec, b_dec, inv_scale)
    act = jnp.where(valid[..., None], xhat + err, base)
    return nnx.merge(graphdef, state).forward_replacing(ids, hook, act, mask)


def _spliced_metric(f, err, base, graphdef, state, ids, w_dec, b_dec, inv_scale, valid, mask, last, right, wrong,
                    hook):
    per_pair = _readout(_spliced_logits(graphdef, state, f, err, base, ids, w_dec, b_dec, inv_scale, valid, mask,
                                        hook), last, right, wrong)
    return per_pair.mean(), per_pair


_metric_jit = jax.jit(_spliced_metric, static_argnames=("graphdef", "hook"))
_logits_jit = jax.jit(_spliced_logits, static_argnames=("graphdef", "hook"))
_grads_jit = jax.jit(jax.value_and_grad(_spliced_metric, argnums=(0, 1, 2), has_aux=True),
                     static_argnames=("graphdef", "hook"))


_encode = jax.jit(cc_lib.encode)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _shared_acts(params, h, *, cfg):
    return cc_lib.activate(params, h, cfg)


# ----------------------------------------------------------------------------------------------------------------
# The crosscoder


@dataclasses.dataclass(frozen=True)
class Crosscoder:
    """Exported crosscoder weights on the device. scales [S]: the crosscoder sees x * scales[s]."""
    params: dict
    scales: np.ndarray
    cfg: cc_lib.CrosscoderConfig

    @classmethod
    def of(cls, crosscoder: Any) -> Crosscoder:
        """From an export directory or (params, scales, CrosscoderConfig) as crosscoder_export.load_exported returns."""
        if isinstance(crosscoder, Crosscoder):
            return crosscoder
        if isinstance(crosscoder, (str, os.PathLike)):
            crosscoder = crosscoder_export.load_exported(crosscoder)
        params, scales, cfg = crosscoder
        if not isinstance(cfg, cc_lib.CrosscoderConfig):
            raise CrossjaxError("crosscoder must be an export directory or (params, scales, CrosscoderConfig) as "
                                "returned by crosscoder_export.load_exported.")
        return cls({k: jnp.asarray(v, jnp.float32) for k, v in params.items()},
                   np.asarray(scales, np.float32).reshape(-1), cfg)

    def encode(self, resid: np.ndarray, valid: np.ndarray) -> jax.Array:
        """resid [S,P,T,D] (model scale), valid [P,T] -> h [P,T,F], the shared pre-activation (0 where not valid)."""
        s, p, t, d = resid.shape
        x = np.moveaxis(resid[:, valid], 0, 1) * self.scales[None, :, None]          # [n,S,D] normalised
        h = _encode(self.params, jnp.asarray(x))
        return jnp.zeros((p, t, self.cfg.num_features), jnp.float32).at[np.nonzero(valid)].set(h)

    def features(self, h: jax.Array, s: int, valid: np.ndarray) -> jax.Array:
        """h [P,T,F] -> f [P,T,F] as snapshot s's decoder sees them (crosscoder.activate's rule), 0 where not valid."""
        if self.cfg.activation == "jumprelu":   # gated per snapshot: h 1[h n[s] > theta]
            n_s = cc_lib.decoder_norms(self.params)[s]
            f = jnp.where(h * n_s > jnp.exp(self.params["log_threshold"]), h, 0.0)
        else:                                   # shared by every snapshot (batchtopk: over the task's valid rows)
            rows = np.nonzero(valid)
            f = jnp.zeros_like(h).at[rows].set(_shared_acts(self.params, h[rows], cfg=self.cfg))
        return jnp.where(jnp.asarray(valid)[..., None], f, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Pass 1: the activations at the hook of every snapshot


@dataclasses.dataclass(frozen=True)
class Residuals:
    names: tuple[str, ...]
    clean: np.ndarray        # [S,P,T,D] float32: the activation at the hook on the clean prompts
    corrupted: np.ndarray    # [S,P,T,D] float32: ... on the corrupted prompts


def snapshot_items(snapshots: Sequence | Mapping) -> list[tuple[str, LoadedSnapshot | str]]:
    """[(name, LoadedSnapshot or directory)] in the crosscoder's order; names from a mapping, the snapshot, or the
    directory's name."""
    items = list(snapshots.items()) if isinstance(snapshots, Mapping) else [(None, s) for s in snapshots]
    out = []
    for name, s in items:
        if isinstance(s, LoadedSnapshot):
            out.append((str(name or s.name or s.path), s))
        elif isinstance(s, (str, os.PathLike)):
            out.append((str(name or Path(s).name), os.fspath(s)))
        else:
            raise CrossjaxError(f"snapshot {s!r} is neither a LoadedSnapshot nor a directory.")
    names = [n for n, _ in out]
    if not out or len(set(names)) != len(names):
        raise CrossjaxError(f"snapshots {names}: give the crosscoder's snapshots, each once, in its order.")
    return out


def load(name: str, snapshot: LoadedSnapshot | str, hook: str, task, d_model: int) -> LoadedSnapshot:
    """The snapshot loaded and checked against the hook, the task's token ids and the crosscoder's d_model."""
    loaded = snapshot if isinstance(snapshot, LoadedSnapshot) else load_snapshot(snapshot)
    cfg = loaded.config
    parse_hook(cfg, hook)
    if cfg.hidden_size != d_model:
        raise CrossjaxError(f"snapshot {name!r} has hidden size {cfg.hidden_size} but the crosscoder's d_model is "
                            f"{d_model}: pass the snapshots the crosscoder was trained on.")
    top = int(max(task.clean.max(), task.corrupted.max(), task.right.max(), task.wrong.max()))
    if top >= cfg.vocab_size:
        raise CrossjaxError(f"task {task.name} holds token id {top} but snapshot {name!r} has vocab_size "
                            f"{cfg.vocab_size}: tokenize the task with the snapshots' tokenizer.")
    if task.clean.shape[1] > cfg.max_position_embeddings:
        raise CrossjaxError(f"task {task.name} has prompts of {task.clean.shape[1]} tokens, more than snapshot "
                            f"{name!r}'s {cfg.max_position_embeddings} positions; shorten them.")
    return loaded


def collect_residuals(items: list[tuple[str, LoadedSnapshot | str]], hook: str, task, d_model: int) -> Residuals:
    """Every snapshot's activation at the hook for the clean and the corrupted prompts (one model loaded at a time)."""
    clean, corrupted = [], []
    for name, snap in items:
        runner = Runner(load(name, snap, hook, task, d_model).model)
        clean.append(np.asarray(runner.hook(task.clean, hook, task.mask), np.float32))
        corrupted.append(np.asarray(runner.hook(task.corrupted, hook, task.mask), np.float32))
        del runner
    return Residuals(tuple(n for n, _ in items), np.stack(clean), np.stack(corrupted))


# ----------------------------------------------------------------------------------------------------------------
# Pass 2: one snapshot, spliced


class Splice:
    """Snapshot s with the crosscoder spliced in (module docstring). Arrays: f [P,T,F], err and base [P,T,D]."""

    def __init__(self, model, hook: str, crosscoder: Crosscoder, s: int, task, resid_clean: np.ndarray,
                 resid_corrupted: np.ndarray, h_clean: jax.Array, h_corrupted: jax.Array):
        self.hook, self.task, self.snapshot = hook, task, s
        self._graphdef, self._state = nnx.split(model)
        p = crosscoder.params
        self._w_dec, self._b_dec = p["W_dec"][s], p["b_dec"][s]
        self._inv_scale = jnp.float32(1.0 / float(crosscoder.scales[s]))
        self._valid, self._mask, self._ids = jnp.asarray(task.valid), jnp.asarray(task.mask), jnp.asarray(task.clean)
        self._readout = tuple(jnp.asarray(a) for a in (task.last, task.right, task.wrong))
        self.f_clean = crosscoder.features(h_clean, s, task.valid)
        self.f_corrupted = crosscoder.features(h_corrupted, s, task.valid)
        self.base_clean, self.base_corrupted = jnp.asarray(resid_clean), jnp.asarray(resid_corrupted)
        self.err_clean = self.base_clean - self.reconstruction(self.f_clean)
        self.err_corrupted = self.base_corrupted - self.reconstruction(self.f_corrupted)
        self.plain_clean = np.asarray(_plain_metric(self._graphdef, self._state, task.clean, task.mask,
                                                    *self._readout))
        # the clean prompts with the corrupted activation at the hook: the corrupted run itself at a residual hook
        self.plain_corrupted = np.asarray(_patched_metric(self._graphdef, self._state, self._ids, self.base_corrupted,
                                                          self._mask, *self._readout, hook=hook))
        self._check_unchanged()

    @property
    def num_features(self) -> int:
        return int(self.f_clean.shape[-1])

    def reconstruction(self, f: jax.Array) -> jax.Array:
        """f [P,T,F] -> xhat [P,T,D] at the model's scale."""
        return _reconstruct(f, self._w_dec, self._b_dec, self._inv_scale)

    def _args(self):
        return (self._graphdef, self._state, self._ids, self._w_dec, self._b_dec, self._inv_scale, self._valid,
                self._mask)

    def metric(self, f: jax.Array, err: jax.Array | None = None, base: jax.Array | None = None
               ) -> tuple[float, np.ndarray]:
        """(mean metric, per-pair metric [P]) with features f; err and base default to the clean run's."""
        err = self.err_clean if err is None else err
        base = self.base_clean if base is None else base
        m, per_pair = _metric_jit(f, err, base, *self._args(), *self._readout, hook=self.hook)
        return float(m), np.asarray(per_pair)

    def logits(self, f: jax.Array, err: jax.Array | None = None, base: jax.Array | None = None) -> jax.Array:
        """[P,T,V] logits of the spliced model (clean err and base by default)."""
        err = self.err_clean if err is None else err
        base = self.base_clean if base is None else base
        g, st, ids, w, b, inv, valid, mask = self._args()
        return _logits_jit(g, st, f, err, base, ids, w, b, inv, valid, mask, hook=self.hook)

    def grads(self, f: jax.Array, err: jax.Array, base: jax.Array) -> tuple[float, jax.Array, jax.Array, jax.Array]:
        """(mean metric, d/df [P,T,F], d/derr [P,T,D], d/dbase [P,T,D]) at (f, err, base)."""
        (m, _), (df, derr, dbase) = _grads_jit(f, err, base, *self._args(), *self._readout, hook=self.hook)
        return float(m), df, derr, dbase

    def _check_unchanged(self) -> None:
        for what, f, err, base, plain in (("clean", self.f_clean, self.err_clean, self.base_clean, self.plain_clean),
                                          ("corrupted", self.f_corrupted, self.err_corrupted, self.base_corrupted,
                                           self.plain_corrupted)):
            _, spliced = self.metric(f, err, base)
            gap = float(np.max(np.abs(spliced - plain) / (1.0 + np.abs(plain))))
            if not gap <= UNCHANGED_TOLERANCE:
                raise RuntimeError(f"the spliced {what} run of snapshot {self.snapshot} moved the metric by {gap:.2e} "
                                   "(relative): the error term must make the splice exact; this is a bug in crossjax.")
