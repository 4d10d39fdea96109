"""Do features that form later score as more complex? Pearson and Spearman correlation between each feature's
emergence step and its complexity score, with p-values (scipy.stats, two-sided) and the counts left out.

The paper reports Pearson r about 0.31 on Pythia. Snapshots are usually spaced logarithmically in steps, so
``log_steps=True`` correlates log10(1 + step) instead (Spearman is the same either way: it only sees ranks).
"""
from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from typing import Sequence

import numpy as np

from crossjax.complexity import Score
from crossjax.errors import CrossjaxError


def _emergence_table(emergence_steps) -> dict[int, float | None]:
    """{feature: step or None (never emerges)} from a mapping, or from a sequence [F] with -1/None for never."""
    if isinstance(emergence_steps, np.ndarray) and emergence_steps.ndim == 1:
        emergence_steps = emergence_steps.tolist()
    if isinstance(emergence_steps, Mapping):
        items = emergence_steps.items()
    elif isinstance(emergence_steps, Sequence) and not isinstance(emergence_steps, (str, bytes)):
        items = enumerate(emergence_steps)
    else:
        raise CrossjaxError(f"emergence_steps must map feature -> step (None: never emerges) or be a sequence [F] "
                            f"of steps (-1: never), not {type(emergence_steps).__name__}; "
                            "crossjax.complexity.from_index.emergence_steps(index) builds one.")
    table = {}
    for feature, step in items:
        try:
            feature = operator.index(feature)
            step = None if step is None or float(step) < 0 else float(step)
        except (TypeError, ValueError):
            raise CrossjaxError(f"emergence_steps[{feature!r}] = {step!r}: steps must be numbers (None or -1: the "
                                "feature never emerges).") from None
        if step is not None and not math.isfinite(step):
            raise CrossjaxError(f"emergence_steps[{feature}] = {step}: steps must be finite.")
        table[feature] = step
    return table


def correlate(emergence_steps, scores: Sequence[Score], *, log_steps: bool = False) -> dict:
    """Correlation of emergence step and complexity over the features that emerge and were scored.

    emergence_steps: {feature: step, None if it never emerges} or a sequence [F] indexed by feature (-1: never).
    Returns {"features": n used, "pearson_r", "pearson_p", "spearman_r", "spearman_p" (None when n < 3 or either
    side is constant; "note" then says why), "never_emerged": scored features left out because they never emerge,
    "failed": features whose scoring failed, "steps": "step" or "log10(1+step)"}.
    """
    table = _emergence_table(emergence_steps)
    steps, complexity, never, failed, seen = [], [], 0, 0, set()
    for s in scores:
        if not isinstance(s, Score):
            raise CrossjaxError(f"scores must be Score objects from a scorer, got {type(s).__name__}.")
        if s.feature in seen:
            raise CrossjaxError(f"feature {s.feature} has more than one score: pass one Score per feature.")
        seen.add(s.feature)
        if not s.ok:
            failed += 1
            continue
        if s.feature not in table:
            raise CrossjaxError(f"feature {s.feature} has a score but no entry in emergence_steps: pass the "
                                "emergence of every scored feature (from_index.emergence_steps(index)).")
        if table[s.feature] is None:
            never += 1
            continue
        steps.append(table[s.feature])
        complexity.append(float(s.complexity))
    x = np.log10(1.0 + np.asarray(steps)) if log_steps else np.asarray(steps, dtype=float)
    y = np.asarray(complexity, dtype=float)
    out = {"features": len(y), "pearson_r": None, "pearson_p": None, "spearman_r": None, "spearman_p": None,
           "never_emerged": never, "failed": failed, "steps": "log10(1+step)" if log_steps else "step", "note": None}
    if len(y) < 3:
        out["note"] = f"{len(y)} features emerge and were scored: a correlation needs at least 3"
    elif np.ptp(x) == 0 or np.ptp(y) == 0:
        out["note"] = "every feature has the same " + ("emergence step" if np.ptp(x) == 0 else "complexity") + \
                      ": the correlation is undefined"
    else:
        from scipy import stats

        pearson, spearman = stats.pearsonr(x, y), stats.spearmanr(x, y)
        out.update(pearson_r=float(pearson.statistic), pearson_p=float(pearson.pvalue),
                   spearman_r=float(spearman.statistic), spearman_p=float(spearman.pvalue))
    return out
