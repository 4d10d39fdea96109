"""Attribution of a task over every snapshot of a crosscoder, and of a finished run (`python -m crossjax.analyze`).

    from crossjax.attribution import analyze, analyze_run
    out = analyze_run("/tmp/crossjax_tiny", "kjv_agreement")          # writes <workdir>/attribution/kjv_agreement.*
    out["snapshots"]["step1600"]["curves"]["attribution"]["ablate_top"]

`analyze` works on snapshots and a crosscoder given directly: pass 1 collects every snapshot's residual at the
hook (the encoder needs all of them), then each target snapshot is loaded again, spliced (splice.Splice),
attributed (attribute.attribute) and its ablation/retention curves measured (curves.curves), one model in memory
at a time. LoadedSnapshots are used as given (loaded once).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

from crossjax import console
from crossjax.attribution import attribute as attribute_lib
from crossjax.attribution import curves as curves_lib
from crossjax.attribution import splice as splice_lib
from crossjax.attribution import tasks as tasks_lib
from crossjax.errors import CrossjaxError

OUT_DIR = "attribution"


def analyze(snapshots: Sequence | Mapping, crosscoder, hook: str, task: tasks_lib.TokenizedTask, *,
            targets: Sequence[str] | None = None, methods: Sequence[str] = attribute_lib.METHODS,
            ig_steps: int = 32, draws: int = 3, seed: int = 0, max_k: int | None = None,
            progress: bool = False) -> dict[str, dict]:
    """{snapshot name: {"attribution": attribute.Attribution, "curves": {method: curves.curves(...)}}} for each
    target (default: every snapshot). snapshots: the crosscoder's S snapshots in its order (LoadedSnapshots or
    directories, or a mapping name -> one); crosscoder: an export directory or (params, scales, cfg)."""
    cc = splice_lib.Crosscoder.of(crosscoder)
    items = splice_lib.snapshot_items(snapshots)
    names = [n for n, _ in items]
    if cc.cfg.num_snapshots != len(items):
        raise CrossjaxError(f"the crosscoder covers {cc.cfg.num_snapshots} snapshots but {len(items)} were given "
                            f"({names}): pass exactly the snapshots it was trained on, in its order.")
    targets = list(names if targets is None else targets)
    missing = [t for t in targets if t not in names]
    if missing or not targets:
        raise CrossjaxError(f"snapshots {missing or targets} to analyze are not among the crosscoder's {names}.")
    console.say("attribution", f"{tasks_lib.describe(task)}; activations at {hook} of {len(items)} snapshots",
                enabled=progress)
    res = splice_lib.collect_residuals(items, hook, task, cc.cfg.d_model)
    h_clean, h_corr = cc.encode(res.clean, task.valid), cc.encode(res.corrupted, task.valid)
    out = {}
    for name in targets:
        s = names.index(name)
        loaded = splice_lib.load(name, items[s][1], hook, task, cc.cfg.d_model)
        sp = splice_lib.Splice(loaded.model, hook, cc, s, task, res.clean[s], res.corrupted[s], h_clean, h_corr)
        attr = attribute_lib.attribute(sp, methods, ig_steps=ig_steps)
        made = {m: curves_lib.curves(sp, attr.scores[m], attr.active, draws=draws, seed=seed, max_k=max_k)
                for m in attr.scores}
        out[name] = {"attribution": attr, "curves": made}
        first = made[next(iter(made))]
        console.say("attribution", f"{name}: metric clean {attr.metric_clean:+.3f} corrupted "
                    f"{attr.metric_corrupted:+.3f}; {first['active_features']} active features", enabled=progress)
        del sp, loaded
    return out


# ----------------------------------------------------------------------------------------------------------------
# A finished run


def run_snapshots(workdir: str) -> tuple[list[str], dict[str, str], str, str]:
    """(snapshot names, {name: directory}, hook, export dir) of the finished run in workdir."""
    from crossjax import activations
    from crossjax import workdir as workdir_lib
    from crossjax.summary import RunSummary

    summary = RunSummary.read(workdir)
    export = os.path.join(workdir, "export")
    if not os.path.isdir(export):
        export = summary.export
    recorded = workdir_lib.read_recorded(workdir)
    model = (recorded or {}).get("model")
    if not isinstance(model, dict) or not model.get("hook") or not (model.get("path_template") or model.get("repo")):
        raise CrossjaxError(f"{workdir}/config.json records no model snapshots (model.hook and model.path_template "
                            "or model.repo): attribution needs a run over model snapshots, not planted data.")
    section = ConfigDict(model)
    all_names, _ = activations.snapshot_specs(section)
    unknown = [n for n in summary.snapshots if n not in all_names]
    if unknown:
        raise CrossjaxError(f"{workdir}/summary.json names snapshots {unknown} that config.json's model.snapshots "
                            "lacks: the two files come from different runs; rerun the training command to rewrite "
                            "them.")
    dirs = {n: str(d) for n, d in activations.snapshot_dirs(section, summary.snapshots).items()}
    return list(summary.snapshots), dirs, str(model["hook"]), export


def tokenized_task(task: str, snapshot_dir: str, *, skip_invalid: bool = False) -> tasks_lib.TokenizedTask:
    """A task (bundled name or .jsonl file) tokenized with the tokenizer of a run's snapshot, prompts capped at the
    model's context length."""
    from crossjax import tokens
    from crossjax.models import snapshot_files

    tokenizer = tokens.load_tokenizer(snapshot_dir)
    max_len = snapshot_files.read_config(snapshot_files.resolve_snapshot(snapshot_dir)).max_position_embeddings
    return tasks_lib.tokenize(tasks_lib.load_task(task, tokenizer), tokenizer, skip_invalid=skip_invalid,
                              max_len=max_len)


def analyze_run(workdir: str, task: str, *, snapshots: Sequence[str] | None = None,
                methods: Sequence[str] = attribute_lib.METHODS, ig_steps: int = 32, draws: int = 3, seed: int = 0,
                max_k: int | None = None, skip_invalid: bool = False, progress: bool = True) -> dict:
    """analyze() for the run in workdir and a task (bundled name or .jsonl file), tokenized with the run's
    tokenizer. Writes <workdir>/attribution/<task>.json (figures and curves) and .npz (write_results), records
    summary_entry in summary.json as evals["attribution"][<task>] and returns the JSON's content."""
    from crossjax import summary_sections

    workdir = os.path.abspath(workdir)
    names, dirs, hook, export = run_snapshots(workdir)
    tokenized = tokenized_task(task, dirs[names[0]], skip_invalid=skip_invalid)
    results = analyze(dirs, export, hook, tokenized, targets=snapshots, methods=methods, ig_steps=ig_steps,
                      draws=draws, seed=seed, max_k=max_k, progress=progress)
    out = write_results(workdir, tokenized, hook, results, export=export, ig_steps=ig_steps, draws=draws, seed=seed)
    summary_sections.record(workdir, "attribution", tokenized.name, summary_entry(out))
    return out


def write_results(workdir: str, task: tasks_lib.TokenizedTask, hook: str, results: dict[str, dict], *,
                  export: str, ig_steps: int, draws: int, seed: int) -> dict:
    """Write analyze()'s results as <workdir>/attribution/<task>.json (figures and curves, and the hash of the
    export's weights they come from) and .npz (scores [S',F] and per-position scores [S',T,F] per method, S' the
    analyzed snapshots); return the JSON's content with "files" added."""
    from crossjax import crosscoder_export
    from crossjax.analysis.index_build import file_sha256
    from crossjax.files import atomic_write, atomic_write_text

    out = {"task": task.name, "pairs": task.num_pairs, "skipped": list(task.skipped), "hook": hook,
           "workdir": workdir, "export_sha256": file_sha256(Path(export) / crosscoder_export.EXPORT_WEIGHTS),
           "ig_steps": ig_steps, "draws": draws, "seed": seed,
           "snapshots": {n: {**r["attribution"].summary(), "curves": r["curves"]} for n, r in results.items()}}
    base = os.path.join(workdir, OUT_DIR, task.name)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    atomic_write_text(base + ".json", json.dumps(_finite_or_null(out), indent=1) + "\n")
    arrays = {"snapshots": np.array(list(results))}
    for m in next(iter(results.values()))["attribution"].scores:
        arrays[m] = np.stack([r["attribution"].scores[m] for r in results.values()])
        arrays[f"{m}_per_position"] = np.stack([r["attribution"].per_position[m] for r in results.values()])

    def write_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(base + ".npz", write_npz)
    out["files"] = [base + ".json", base + ".npz"]
    return out


SUMMARY_K = 16     # the k of the summary's top-k against random ablation (or the largest k below it)


def summary_entry(out: dict) -> dict:
    """The run summary's line for one task: per snapshot the metric, and with the first method's top-k features
    ablated against k random active ones; the first method's top features at the last snapshot."""
    names = list(out["snapshots"])
    method = next(iter(out["snapshots"][names[0]]["curves"]))
    per_snapshot = {}
    for name, s in out["snapshots"].items():
        c = s["curves"][method]
        i = max([j for j, k in enumerate(c["k"]) if k <= SUMMARY_K], default=None)
        per_snapshot[name] = {"metric_clean": s["metric_clean"], "metric_corrupted": s["metric_corrupted"],
                              "k": None if i is None else c["k"][i],
                              "ablate_top": None if i is None else c["ablate_top"][i],
                              "ablate_random": None if i is None else c["ablate_random"][i]}
    top = out["snapshots"][names[-1]]["top"][method]
    return _finite_or_null({"file": f"{OUT_DIR}/{out['task']}.json", "pairs": out["pairs"], "method": method,
                            "snapshots": per_snapshot, "top_features": [int(f) for f, _ in top[:5]]})


def _finite_or_null(value):
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value
