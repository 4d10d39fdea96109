"""Per-feature attribution of a task's metric at one spliced snapshot (splice.Splice).

m = mean over pairs of logit(right) - logit(wrong) at the last token; f the features [P,T,F] of snapshot s;
gradients are taken at the clean run (the error term held at its clean value). Per feature i, summed over
positions (per position too, as the mean over pairs [T,F]):

- attribution patching (`attribution`):              f_i * dm/df_i                  (f at the clean run)
- its clean-minus-corrupted variant (`clean_minus_corrupted`): (f_clean,i - f_corr,i) * dm/df_i
- integrated gradients (`integrated_gradients`):     (f_clean,i - f_corr,i) * mean_k dm/df_i(path(a_k)),
  a_k = (k + 1/2) / steps (the midpoint rule), along the straight path from the corrupted run to the clean one:
  path(a) = corrupted + a (clean - corrupted) for the features, the error term and the residual at positions the
  crosscoder does not read. The path's ends are the two actual runs, so the features' attributions plus the error
  term's (`ig_error`) and those positions' (`ig_unspliced`) add up to m_clean - m_corrupted as steps grow
  (`ig_gap` is what is left).

Attribution patching is the first-order estimate of the effect of ablating a feature (setting it to 0); the
clean-minus-corrupted variant estimates the effect of patching in its corrupted value. Both are exact when the
metric is linear in the features.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from crossjax.errors import CrossjaxError

METHODS = ("attribution", "clean_minus_corrupted", "integrated_gradients")


@dataclasses.dataclass
class Attribution:
    """The attributions of one snapshot. F features, T positions (from the start of the prompts)."""
    metric_clean: float                    # the model's own mean metric (plain forward) on the clean prompts
    metric_corrupted: float                # ... on the corrupted prompts (patched in at the hook: splice.py)
    metric_spliced: float                  # with the crosscoder spliced in (= metric_clean: the splice is exact)
    scores: dict[str, np.ndarray]          # method -> [F], summed over positions
    per_position: dict[str, np.ndarray]    # method -> [T,F]
    ig_steps: int = 0
    ig_error: float = float("nan")         # integrated gradients of the error term
    ig_unspliced: float = float("nan")     # ... of the positions the crosscoder does not read
    ig_gap: float = float("nan")           # m_clean - m_corr - (features + error + unspliced)
    active: np.ndarray | None = None       # [F] bool: nonzero somewhere on the clean or corrupted prompts

    def summary(self) -> dict:
        """JSON-able figures (the per-feature arrays as the top features by each method)."""
        out = {k: getattr(self, k) for k in ("metric_clean", "metric_corrupted", "metric_spliced")}
        if self.ig_steps:
            out.update(ig_steps=self.ig_steps, ig_error=self.ig_error, ig_unspliced=self.ig_unspliced,
                       ig_gap=self.ig_gap, ig_features=float(self.scores["integrated_gradients"].sum()))
        out["active_features"] = int(self.active.sum()) if self.active is not None else None
        out["top"] = {m: top_features(v, 10) for m, v in self.scores.items()}
        return out


def top_features(scores: np.ndarray, k: int) -> list[list]:
    """[[feature, score]] of the k largest scores, largest first."""
    order = np.argsort(-scores, kind="stable")[:k]
    return [[int(i), float(scores[i])] for i in order]


def _position_sums(x: jax.Array) -> np.ndarray:
    """x [P,T,F] -> [T,F] summed over pairs (the metric's mean over pairs is inside the gradient already)."""
    return np.asarray(jnp.sum(x, axis=0))


def attribute(splice, methods=METHODS, *, ig_steps: int = 32) -> Attribution:
    """The attributions of splice.Splice `splice` by `methods` (module docstring)."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise CrossjaxError(f"attribution methods {unknown or list(methods)}: choose among {', '.join(METHODS)}.")
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, (int, np.integer)) or ig_steps < 1:
        raise CrossjaxError(f"ig_steps={ig_steps!r} must be a positive integer.")
    f_clean, f_corr = splice.f_clean, splice.f_corrupted
    per_position: dict[str, np.ndarray] = {}
    m_spliced, grad_f, _, _ = splice.grads(f_clean, splice.err_clean, splice.base_clean)
    delta = f_clean - f_corr
    if "attribution" in methods:
        per_position["attribution"] = _position_sums(f_clean * grad_f)
    if "clean_minus_corrupted" in methods:
        per_position["clean_minus_corrupted"] = _position_sums(delta * grad_f)
    result = Attribution(float(splice.plain_clean.mean()), float(splice.plain_corrupted.mean()), m_spliced, {},
                         per_position, active=np.asarray(jnp.any((f_clean != 0) | (f_corr != 0), axis=(0, 1))))
    if "integrated_gradients" in methods:
        d_err = splice.err_clean - splice.err_corrupted
        d_base = splice.base_clean - splice.base_corrupted
        sum_f, sum_err, sum_base = jnp.zeros_like(f_clean), jnp.zeros_like(d_err), jnp.zeros_like(d_base)
        for k in range(int(ig_steps)):
            a = (k + 0.5) / ig_steps
            _, gf, ge, gb = splice.grads(f_corr + a * delta, splice.err_corrupted + a * d_err,
                                         splice.base_corrupted + a * d_base)
            sum_f, sum_err, sum_base = sum_f + gf, sum_err + ge, sum_base + gb
        per_position["integrated_gradients"] = _position_sums(delta * sum_f / ig_steps)
        # the unspliced positions' share: only where the crosscoder does not read (elsewhere base is unused)
        outside = ~np.asarray(splice.task.valid)[..., None]
        result.ig_steps = int(ig_steps)
        result.ig_error = float(jnp.sum(d_err * sum_err) / ig_steps)
        result.ig_unspliced = float(jnp.sum(jnp.where(outside, d_base * sum_base, 0.0)) / ig_steps)
        total = float(per_position["integrated_gradients"].sum()) + result.ig_error + result.ig_unspliced
        result.ig_gap = result.metric_clean - result.metric_corrupted - total
    result.scores = {m: v.sum(axis=0) for m, v in per_position.items()}
    return result
