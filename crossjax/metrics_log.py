"""The run's metric records: workdir/metrics.jsonl (one JSON object per line) and tensorboard scalars in workdir/tb.

Written by process 0 only. A record is {"step": t, "kind": "train" | "eval", ...values}; per-snapshot lists also go
to tensorboard as `kind/key/snapshot`. Opening the log for a run resumed at step r drops the records past r (the
resumed run writes them again) and, when r is the final step, the final evaluation (it is measured again).
A torn last record (a run killed while appending it) is dropped with a message; a damaged record before the last
one is an error naming its line, as the records after it cannot be trusted to be in order or complete.

On gs:// an object cannot be appended to: the log keeps its lines in memory and each record rewrites the whole
object (one atomic upload), so a killed run leaves the log as of its last whole record, never a torn one. The
tensorboard event files are written to a temporary local directory and uploaded whole with each record.
"""
from __future__ import annotations

import json
import os

import numpy as np

from crossjax import console, paths
from crossjax.errors import CrossjaxError

METRICS_FILE = "metrics.jsonl"
STAGE = "crosscoder"


class MetricsLog:
    def __init__(self, workdir: str, resume_step: int, final_step: int, snapshots: tuple[str, ...]):
        import jax
        self.enabled = jax.process_index() == 0
        self.snapshots = tuple(snapshots)
        self.path = paths.join(workdir, METRICS_FILE)
        self._tb_dir = paths.join(workdir, "tb")
        self._tb = None
        self._tb_staging: str | None = None
        self._lines: list[str] | None = [] if paths.is_gcs(self.path) else None  # gs://: the whole log, rewritten
        if not self.enabled:
            return
        if paths.exists(self.path):
            def kept(r):
                redone = r["kind"] == "eval" and r["step"] == resume_step == final_step
                return r["step"] <= resume_step and not redone
            # a fresh run (resume_step 0) keeps nothing, so an old log need not even parse
            records = read_records(self.path) if resume_step > 0 else []
            lines = [json_line + "\n" for r, json_line in records if kept(r)]
            paths.write_text(self.path, "".join(lines))
            if self._lines is not None:
                self._lines = lines
        from tensorboardX import SummaryWriter
        if self._lines is None:
            self._tb = SummaryWriter(self._tb_dir)
        else:  # written beside, and each event file uploaded whole with every record
            import tempfile
            self._tb_staging = tempfile.mkdtemp(prefix="crossjax-tb-")
            self._tb = SummaryWriter(self._tb_staging)

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, **jsonable(values)}
        if self._lines is None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        else:
            self._lines.append(json.dumps(record) + "\n")
            paths.write_text(self.path, "".join(self._lines))
        for key, v in record.items():
            if key in ("step", "kind"):
                continue
            if isinstance(v, list) and len(v) == len(self.snapshots):
                for name, x in zip(self.snapshots, v):
                    self._tb.add_scalar(f"{kind}/{key}/{name}", x, step)
            elif isinstance(v, (int, float)):
                self._tb.add_scalar(f"{kind}/{key}", v, step)
        self._upload_tb()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
            self._upload_tb()
            if self._tb_staging is not None:
                import shutil
                shutil.rmtree(self._tb_staging, ignore_errors=True)
                self._tb_staging = None


    def _upload_tb(self) -> None:
        """gs://: put the staged tensorboard event files at workdir/tb, each in one upload."""
        if self._tb_staging is None:
            return
        if self._tb is not None:
            self._tb.flush()
        for name in os.listdir(self._tb_staging):
            with open(os.path.join(self._tb_staging, name), "rb") as f:
                paths.write_bytes(paths.join(self._tb_dir, name), f.read())


def read_records(path: str) -> list[tuple[dict, str]]:
    """(record, its line without the newline) for each record of the log at `path`; a torn last line is dropped
    (with a message), a damaged line before it raises CrossjaxError."""
    data = paths.read_bytes(path)
    lines = [(n, line) for n, line in enumerate(data.split(b"\n"), start=1) if line.strip()]
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
