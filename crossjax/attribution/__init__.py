"""Which crosscoder features carry a behaviour at each snapshot: tasks as data, the crosscoder spliced into a
snapshot, attribution (patching, clean-minus-corrupted, integrated gradients), ablation and retention curves.

- tasks: the JSONL task format, the loader, the bundled tasks (tasks/*.jsonl and the generated induction task);
- splice: one snapshot with the crosscoder's reconstruction spliced in at the hook, the error term kept;
- attribute: per-feature attributions of the task metric at a spliced snapshot;
- curves: the metric with the top-k attributed features ablated or alone kept, against k random ones;
- run: all of it over a crosscoder's snapshots (`analyze`) or a finished run (`analyze_run`,
  `python -m crossjax.analyze`).

``from crossjax.attribution import analyze_run, load_task`` works; modules load on first use, so reading tasks
does not import JAX.
"""

import importlib

_LAZY = {
    "analyze": "crossjax.attribution.run",
    "analyze_run": "crossjax.attribution.run",
    "load_task": "crossjax.attribution.tasks",
    "tokenize": "crossjax.attribution.tasks",
    "Splice": "crossjax.attribution.splice",
}
_MODULES = ("tasks", "splice", "attribute", "curves", "run", "templates")

__all__ = [*_MODULES, *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"crossjax.attribution.{name}")
    raise AttributeError(f"module 'crossjax.attribution' has no attribute {name!r}")
