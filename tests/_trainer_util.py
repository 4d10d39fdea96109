"""Shared helpers of the trainer tests: the tiny synthetic config and readers of a finished workdir."""
import json
import os

import numpy as np

from crossjax import configs

# Length of the single-device reference run (tests/trainer/conftest.py one_device_run).
STEPS = 6

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment(name: str, arg: str | None = None):
    """experiments/<name>.py[:arg], as --config reads it."""
    return configs.load_experiment(os.path.join(ROOT, "experiments", f"{name}.py") + (f":{arg}" if arg else ""))


def tiny_config(store_path: str, **overrides):
    """experiments/synthetic.py:tiny on a shared planted store; overrides as {"train.lr": 1e-3, ...}."""
    c = experiment("synthetic", "tiny")
    c.store.path = str(store_path)
    c.train.progress = False
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def mesh_overrides(data: int, snapshot: int, feature: int) -> dict:
    return {"mesh.data": data, "mesh.snapshot": snapshot, "mesh.feature": feature}


def train_records(workdir) -> list[dict]:
    """metrics.jsonl training records without the timing field."""
    out = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == "train":
                r.pop("tokens_per_s")
                out.append(r)
    return out


def exported(workdir) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(os.path.join(workdir, "export", "model.safetensors"))


def summary(workdir):
    from crossjax.summary import RunSummary
    return RunSummary.read(workdir)
