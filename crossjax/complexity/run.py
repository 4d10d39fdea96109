"""Complexity of a finished run's features and its correlation with when they form.

    out = score_run("runs/tiny", scorer="offline", features=64)
    out["correlation"]   # {"spearman_r", "spearman_p", "pearson_r", ..., "features"}

The features scored: `features` drawn (seeded) among those that emerge (an emergence snapshot by the one presence
rule) and fire on the indexed rows; their top contexts come from the run's FeatureIndex (workdir/index, built and
saved on first use). The result, every score included, is written to workdir/complexity_<scorer>.json.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from crossjax import console, files
from crossjax.complexity import make_scorer
from crossjax.complexity.correlation import correlate
from crossjax.complexity.from_index import emergence_steps, feature_contexts


def run_index(workdir: str):
    """The run's FeatureIndex: workdir/index when saved, else built over the run's store and saved there."""
    from crossjax.analysis import FeatureIndex
    path = os.path.join(workdir, "index")
    if os.path.exists(path):
        return FeatureIndex.load(path)
    console.say("complexity", f"building the feature index of {workdir} (one pass over its store)")
    index = FeatureIndex.build(workdir)
    index.save(path)
    return index


def score_run(workdir: str, *, scorer: str = "offline", model: str = "", base_url: str = "", key_env: str = "",
              allow_network: bool = False, features: int = 64, contexts: int = 10, window: int = 8, seed: int = 0,
              cache_dir: str | None = None, log_steps: bool = False) -> dict:
    """Score `features` emerging features of the run in workdir with `scorer` (module docstring)."""
    from crossjax.attribution.run import run_snapshots
    index = run_index(workdir)
    names, dirs, _, _ = run_snapshots(workdir)
    emerging = np.flatnonzero((np.asarray(index.emergence) >= 0) & (np.asarray(index.frequency) > 0))
    chosen = np.sort(np.random.default_rng(seed).choice(emerging, size=min(int(features), len(emerging)),
                                                        replace=False))
    fc = feature_contexts(index, chosen.tolist(), tokenizer=dirs[names[-1]], k=contexts, window=window)
    scores = make_scorer(scorer, model=model, base_url=base_url, key_env=key_env, allow_network=allow_network,
                         cache_dir=cache_dir or os.path.join(workdir, "complexity_cache")).score(fc)
    out = {"scorer": scorer, "model": model, "features": chosen.tolist(), "eligible_features": int(len(emerging)),
           "correlation": correlate(emergence_steps(index), scores, log_steps=log_steps),
           "scores": [dataclasses.asdict(s) for s in scores]}
    files.atomic_write_text(os.path.join(workdir, f"complexity_{scorer}.json"), json.dumps(out, indent=1) + "\n")
    return out
