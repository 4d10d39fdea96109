"""The analyses of a finished run that the report shows when they have run: task attribution
(`python -m crossjax.analyze --task=T` or the `attribution` evaluator: workdir/attribution/<task>.{json,npz}) and
feature complexity (`python -m crossjax.analyze --complexity=SCORER`: workdir/complexity_<scorer>.json).

Each file found is checked against the run (its snapshots, its number of features, and the hash of the exported
weights it was computed from when it records one); one that does not fit is left out with a note naming the
command that writes it again, like every other missing input of the report (inputs.py).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import glob
import io
import json
import os
import zipfile

import numpy as np

from crossjax import crosscoder_export, paths

ATTRIBUTION_DIR = "attribution"
COMPLEXITY_GLOB = "complexity_*.json"


@dataclasses.dataclass
class TaskAttribution:
    """One task's attribution over the analyzed snapshots S' (a subset of the run's, in its order)."""
    task: str
    result: dict                       # the task's JSON (attribution.run.write_results)
    snapshots: list[str]               # [S'] analyzed snapshots
    methods: list[str]                 # attribution methods, the first one leads (curves, top features, column)
    scores: dict[str, np.ndarray]      # method -> [S', F] per-feature attribution

    @property
    def key(self) -> str:
        """The feature table's column key."""
        return "attr_" + "".join(c if c.isalnum() else "_" for c in self.task.lower())

    def peak(self) -> np.ndarray:
        """[F] the first method's largest attribution over the analyzed snapshots."""
        return self.scores[self.methods[0]].max(axis=0)


@dataclasses.dataclass
class Complexity:
    """One scorer's complexity scores of a sample of features and their correlation with emergence."""
    scorer: str
    model: str
    correlation: dict                  # complexity.correlation.correlate(...)
    scores: dict[int, dict]            # feature -> {"complexity": 1-5 or None, "explanation", "error"}
    eligible: int                      # features that could be drawn (emerging, firing)


def _rerun_task(workdir: str, task: str) -> str:
    return f"python -m crossjax.analyze --workdir={workdir} --task={task}"


def export_sha256(export_dir: str) -> str:
    """The hash of the exported weights, recorded by the analyses so that a reader can tell their run's."""
    from crossjax.analysis.index_build import file_sha256
    return file_sha256(paths.join(export_dir, crosscoder_export.EXPORT_WEIGHTS))


def _found(directory: str, pattern: str) -> list[str]:
    """The files in `directory` whose names match `pattern`, sorted (on gs://: the objects directly under it)."""
    if not paths.is_gcs(directory):
        return sorted(glob.glob(os.path.join(directory, pattern)))
    return [paths.join(directory, n) for n in paths.listdir(directory)   # no objects under it: []
            if fnmatch.fnmatchcase(n, pattern) and paths.isfile(paths.join(directory, n))]


def _stale(result: dict, export_dir: str, memo: dict) -> bool:
    recorded = result.get("export_sha256")
    if not recorded:              # written before the hash was recorded: taken as it is
        return False
    if "sha" not in memo:
        memo["sha"] = export_sha256(export_dir)
    return recorded != memo["sha"]


def load_attribution(workdir: str, export_dir: str, snapshots: list[str], num_features: int, notes: list[str], *,
                     has_model: bool) -> list[TaskAttribution]:
    """Every task attributed in workdir/attribution/ that fits the run (module docstring), sorted by name."""
    out, memo = [], {}
    found = _found(paths.join(workdir, ATTRIBUTION_DIR), "*.json")
    if not found and has_model:
        notes.append(f"task attribution: not run (python -m crossjax.analyze --workdir={workdir} "
                     "--task=kjv_agreement, or eval.attribution_task with attribution in config.evals)")
    for path in found:
        task = os.path.basename(path)[:-len(".json")]
        rerun = _rerun_task(workdir, task)
        try:
            result = json.loads(paths.read_bytes(path))
            names = list(result["snapshots"])
            methods = list(result["snapshots"][names[0]]["curves"])
            with np.load(io.BytesIO(paths.read_bytes(path[:-len(".json")] + ".npz")), allow_pickle=False) as z:
                scores = {m: np.asarray(z[m], np.float64) for m in methods}
                saved = [str(n) for n in z["snapshots"]]
        except (OSError, ValueError, KeyError, IndexError, TypeError, zipfile.BadZipFile) as e:
            notes.append(f"attribution of {task}: {path} or its .npz is unreadable ({type(e).__name__}: {e}); "
                         f"{rerun} writes both again")
            continue
        if [n for n in names if n not in snapshots] or saved != names or \
                any(v.shape != (len(names), num_features) for v in scores.values()):
            notes.append(f"attribution of {task}: {path} is from another run (snapshots {names}, "
                         f"{next(iter(scores.values())).shape[-1]} features; this run: {snapshots}, {num_features} "
                         f"features); {rerun}")
            continue
        if _stale(result, export_dir, memo):
            notes.append(f"attribution of {task}: {path} was computed from other weights than the run's export "
                         f"(trained again since?); {rerun}")
            continue
        names.sort(key=snapshots.index)
        order = [saved.index(n) for n in names]
        out.append(TaskAttribution(task, result, names, methods, {m: v[order] for m, v in scores.items()}))
    return out


def load_complexity(workdir: str, export_dir: str, num_features: int, notes: list[str]) -> list[Complexity]:
    """Every complexity_<scorer>.json in workdir that fits the run, sorted by scorer."""
    out, memo = [], {}
    found = _found(workdir, COMPLEXITY_GLOB)
    if not found:
        notes.append(f"feature complexity against emergence: not scored (python -m crossjax.analyze "
                     f"--workdir={workdir} --complexity=offline)")
    for path in found:
        name = os.path.basename(path)[len("complexity_"):-len(".json")]
        rerun = f"python -m crossjax.analyze --workdir={workdir} --complexity={name}"
        try:
            result = json.loads(paths.read_bytes(path))
            scores = {int(s["feature"]): {"complexity": s.get("complexity"), "explanation": s.get("explanation"),
                                          "error": s.get("error")} for s in result["scores"]}
            correlation = dict(result["correlation"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            notes.append(f"complexity ({name}): {path} is unreadable ({type(e).__name__}: {e}); {rerun}")
            continue
        if any(not 0 <= f < num_features for f in scores):
            notes.append(f"complexity ({name}): {path} scores features beyond this run's {num_features}; {rerun}")
            continue
        if _stale(result, export_dir, memo):
            notes.append(f"complexity ({name}): {path} was computed from other weights than the run's export "
                         f"(trained again since?); {rerun}")
            continue
        out.append(Complexity(str(result.get("scorer", name)), str(result.get("model") or ""), correlation, scores,
                              int(result.get("eligible_features", len(scores)))))
    return out
