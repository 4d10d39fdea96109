"""Analyses run after training add their line to the run summary, where the evaluators' results are.

    record(workdir, "attribution", "kjv_agreement", {...})   # summary.json: evals["attribution"]["kjv_agreement"]

An analysis of a finished run (`python -m crossjax.analyze`: attribution of a task, complexity by a scorer) keeps
its full result in its own files and a short entry in summary.json under evals[<section>][<key>], beside the
entries of the same section that other tasks or scorers wrote; the `attribution` evaluator writes the same
section at the end of a run. It goes through RunSummary.read and RunSummary.write (one atomic rewrite).
"""
from __future__ import annotations

import os

from crossjax.summary import RunSummary


def record(workdir: str | os.PathLike, section: str, key: str, entry: dict) -> str:
    """Put `entry` at evals[section][key] of workdir's summary.json; return the file's path."""
    workdir = os.fspath(workdir)          # a local path or a URL, as RunSummary takes them
    summary = RunSummary.read(workdir)
    current = summary.evals.get(section)
    summary.evals[section] = {**(current if isinstance(current, dict) else {}), key: entry}
    return summary.write(workdir)
