"""Shared helpers of the trainer tests: the tiny synthetic config and readers of a finished workdir."""
import importlib.util
import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", os.path.join(ROOT, "experiments", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


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


def summary(workdir) -> dict:
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)
