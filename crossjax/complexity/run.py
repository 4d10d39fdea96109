"""Complexity of a finished run's features and its correlation with when they form.

    out = score_run("runs/tiny", scorer="offline", features=64)
    out["correlation"]   # {"spearman_r", "spearman_p", "pearson_r", ..., "features"}

The features scored: `features` drawn (seeded) among those that emerge (an emergence snapshot by the one presence
rule) and fire on the indexed rows; their top contexts come from the run's one FeatureIndex (workdir/index,
crossjax.analysis.run_index: shared with the report, built and saved by whichever asks first). The result, every
score included, is written to workdir/complexity_<scorer>.json, and its figures to summary.json's
evals["complexity"][scorer]. Without a tokenizer (planted data) contexts are token ids ("<id>"): the offline
scorer only compares tokens, an LLM scorer refuses them.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from crossjax import files, summary_sections
from crossjax.analysis.run_index import DEFAULT_ROWS, run_index
from crossjax.complexity import make_scorer
from crossjax.complexity.correlation import correlate
from crossjax.complexity.from_index import emergence_steps, feature_contexts
from crossjax.errors import CrossjaxError
from crossjax.summary import RunSummary


def score_run(workdir: str, *, scorer: str = "offline", model: str = "", base_url: str = "", key_env: str = "",
              allow_network: bool = False, features: int = 64, contexts: int = 10, window: int = 8, seed: int = 0,
              cache_dir: str | None = None, log_steps: bool = False, index_rows: int = DEFAULT_ROWS,
              progress: bool = True) -> dict:
    """Score `features` emerging features of the run in workdir with `scorer` (module docstring); the result is
    also recorded in its summary.json as evals["complexity"][scorer] (summary_entry). On a multi-host run every
    process calls it (they share the index's pass); process 0 scores, writes and returns the result, the others {}."""
    from crossjax.report.contexts import find_tokenizer
    workdir = os.path.abspath(workdir)
    summary = RunSummary.read(workdir)
    index = run_index(workdir, rows=index_rows, top_k=contexts, window=window, stage="complexity",
                      progress=progress)
    if jax.process_index() != 0:     # the processes shared the index's pass; process 0 alone asks and writes
        return {}
    tokenizer = find_tokenizer(workdir, list(summary.snapshots)[::-1])     # the last snapshot's, as the LLM reads
    if tokenizer is None and scorer != "offline":
        raise CrossjaxError(f"{workdir} has no tokenizer (planted data, or its snapshots are gone): the {scorer} "
                            "scorer would read token ids; use --complexity=offline")
    emerging = np.flatnonzero((np.asarray(index.emergence) >= 0) & (np.asarray(index.frequency) > 0))
    chosen = np.sort(np.random.default_rng(seed).choice(emerging, size=min(int(features), len(emerging)),
                                                        replace=False))
    fc = feature_contexts(index, chosen.tolist(), tokenizer=tokenizer, k=contexts, window=window)
    scores = make_scorer(scorer, model=model, base_url=base_url, key_env=key_env, allow_network=allow_network,
                         cache_dir=cache_dir or os.path.join(workdir, "complexity_cache")).score(fc)
    out = {"scorer": scorer, "model": model, "export_sha256": index.info["export_sha256"],
           "features": chosen.tolist(), "eligible_features": int(len(emerging)),
           "correlation": correlate(emergence_steps(index), scores, log_steps=log_steps),
           "scores": [dataclasses.asdict(s) for s in scores]}
    path = os.path.join(workdir, f"complexity_{scorer}.json")
    files.atomic_write_text(path, json.dumps(out, indent=1) + "\n")
    summary_sections.record(workdir, "complexity", scorer, summary_entry(out, path))
    return out


def summary_entry(out: dict, path: str) -> dict:
    """The run summary's line for one scorer: the correlation's figures and where the scores are."""
    c = out["correlation"]
    scored = [s["complexity"] for s in out["scores"] if s.get("complexity") is not None]
    return {"file": os.path.basename(path), "scorer": out["scorer"], "model": out["model"],
            "features": c.get("features", 0), "spearman_r": c.get("spearman_r"), "spearman_p": c.get("spearman_p"),
            "pearson_r": c.get("pearson_r"), "pearson_p": c.get("pearson_p"),
            "mean_complexity": float(np.mean(scored)) if scored else None, "note": c.get("note")}
