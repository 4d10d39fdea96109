"""Analyses of a trained crosscoder.

- evolution: decoder-norm strength, emergence, kinds and rotation per feature (numpy only); trajectories: clusters
  of strength curves, the S x S rotation matrix, emergence by training step;
- lookup: FeatureIndex, per-feature statistics, histograms and top activating rows (per snapshot) over an
  activation store (its one pass over the store: index_build, activation_histograms); feature_table:
  `index.table()`; new_text: `index.run(text)`, which features fire on new text at each snapshot;
- recovery: planted truth against learned directions; separability: linear probes against decoder norms;
  phases: the LM's loss and KL to corpus n-gram statistics per snapshot;
- spliced: the LM's loss with the hook's residual replaced by the crosscoder's reconstruction.

``from crossjax.analysis import FeatureIndex, spliced_loss`` works; the modules load on first use, so importing
``crossjax.analysis.evolution`` alone does not pull in JAX or the model code.
"""

import importlib

_LAZY = {
    "FeatureIndex": "crossjax.analysis.lookup",
    "FeatureReport": "crossjax.analysis.lookup",
    "Example": "crossjax.analysis.lookup",
    "Histogram": "crossjax.analysis.lookup",
    "TextActivations": "crossjax.analysis.new_text",
    "spliced_loss": "crossjax.analysis.spliced",
}

__all__ = ["evolution", "index_build", "lookup", "spliced", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("evolution", "index_build", "lookup", "spliced"):
        return importlib.import_module(f"crossjax.analysis.{name}")
    raise AttributeError(f"module 'crossjax.analysis' has no attribute {name!r}")
