"""The run's metric records: workdir/metrics.jsonl (one JSON object per line) and tensorboard scalars in workdir/tb.

Written by process 0 only. A record is {"step": t, "kind": "train" | "eval", ...values}; per-snapshot lists also go
to tensorboard as `kind/key/snapshot`. Opening the log for a run resumed at step r drops the records past r (the
resumed run writes them again) and, when r is the final step, the final evaluation (it is measured again).
"""
from __future__ import annotations

import json
import os

import numpy as np

from crossjax.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"


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
            with open(self.path) as f:
                records = [line for line in f if line.strip()]
            atomic_write_text(self.path, "".join(line for line in records if kept(json.loads(line))))
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


def jsonable(values: dict) -> dict:
    """Arrays and numpy scalars as lists, floats and ints (one level deep: the metric dicts are flat)."""
    out = {}
    for k, v in values.items():
        a = np.asarray(v)
        out[k] = a.tolist() if a.ndim else (float(a) if a.dtype.kind == "f" else a.item())
    return out
