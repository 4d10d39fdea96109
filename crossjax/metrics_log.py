"""The run's metric records: workdir/metrics.jsonl (one JSON object per line) and tensorboard scalars in workdir/tb.

Written by process 0 only. A record is {"step": t, "kind": "train" | "eval", ...values}; per-snapshot lists also go
to tensorboard as `kind/key/snapshot`. Opening the log for a run resumed at step r drops the records past r (the
resumed run writes them again) and, when r is the final step, the final evaluation (it is measured again).
A torn last record (a run killed while appending it) is dropped with a message; a damaged record before the last
one is an error naming its line, as the records after it cannot be trusted to be in order or complete.
"""
from __future__ import annotations

import json
import os

import numpy as np

from crossjax import console
from crossjax.errors import CrossjaxError
from crossjax.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"
STAGE = "crosscoder"


class MetricsLog:
    def __init__(self, workdir: str, resume_step: int, final_step: int, snapshots: tuple[str, ...]):
        import jax
        self.enabled = jax.process_index() == 0
        self.snapshots = tuple(snapshots)
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if not self.enabled:
            return
        if os.path.exists(self.path):
            def kept(r):
                redone = r["kind"] == "eval" and r["step"] == resume_step == final_step
                return r["step"] <= resume_step and not redone
            # a fresh run (resume_step 0) keeps nothing, so an old log need not even parse
            records = read_records(self.path) if resume_step > 0 else []
            atomic_write_text(self.path, "".join(json_line + "\n" for r, json_line in records if kept(r)))
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, **jsonable(values)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, v in record.items():
            if key in ("step", "kind"):
                continue
            if isinstance(v, list) and len(v) == len(self.snapshots):
                for name, x in zip(self.snapshots, v):
                    self._tb.add_scalar(f"{kind}/{key}/{name}", x, step)
            elif isinstance(v, (int, float)):
                self._tb.add_scalar(f"{kind}/{key}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_records(path: str) -> list[tuple[dict, str]]:
    """(record, its line without the newline) for each record of the log at `path`; a torn last line is dropped
    (with a message), a damaged line before it raises CrossjaxError."""
    with open(path, "rb") as f:
        lines = [(n, line.rstrip(b"\n")) for n, line in enumerate(f, start=1) if line.strip()]
    out = []
    for i, (n, line) in enumerate(lines):
        record = _parse(line)
        if record is not None:
            out.append((record, line.decode("utf-8")))
        elif i == len(lines) - 1:
            console.say(STAGE, f"dropped the torn last record of {path} (line {n}): a run was stopped while "
                        "writing it")
        else:
            shown = line[:80].decode("utf-8", "replace")
            raise CrossjaxError(
                f"{path} line {n} is not a metrics record (one JSON object with 'step' and 'kind' per line): the file "
                f"was damaged after it was written: {shown!r}. Repair or remove that line, or move the file aside "
                "to start a fresh log (the resumed run then logs only its new steps), and run again.")
    return out


def _parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("kind"), str)
    return record if ok else None


def jsonable(values: dict) -> dict:
    """Arrays and numpy scalars as lists, floats and ints (one level deep: the metric dicts are flat)."""
    out = {}
    for k, v in values.items():
        a = np.asarray(v)
        out[k] = a.tolist() if a.ndim else (float(a) if a.dtype.kind == "f" else a.item())
    return out
