"""The workdir guard: workdir/config.json records the config a run was started with.

The same config again resumes the run; another config is refused with the keys that differ, so two experiments
never mix their checkpoints. Keys in RESUME_SAFE_KEYS may change between a run and its resumption: they move
work around (mesh, logging, checkpoint cadence, evaluation), not the numbers trained.
"""
from __future__ import annotations

import json
import os

from ml_collections import ConfigDict

from crossjax.errors import CrossjaxError
from crossjax.files import atomic_write_text

CONFIG_FILE = "config.json"
RESUME_SAFE_KEYS = ("mesh.", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                    "train.async_checkpointing", "train.progress", "train.eval_every", "eval.", "evals")


def config_json(config: ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict, new: dict, defaults: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts, ignoring RESUME_SAFE_KEYS; a key that the old
    config lacks (added to crossjax after the run started) reads as its value in `defaults`."""
    a, b = _flat(old), _flat(new)
    flat_defaults = _flat(defaults)
    a.update({k: flat_defaults[k] for k in b.keys() - a.keys() if k in flat_defaults})
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys
            if a.get(k, "<absent>") != b.get(k, "<absent>") and not k.startswith(RESUME_SAFE_KEYS)]


def prepare(workdir: str) -> str:
    """The absolute path of workdir, created if missing; CrossjaxError when it is a file or cannot be made."""
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise CrossjaxError(f"--workdir={workdir} is a file, not a directory; choose another --workdir")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise CrossjaxError(f"cannot create --workdir={workdir} ({e.strerror}: {e.filename}); choose a writable "
                            "location for --workdir") from e
    return workdir


def read_recorded(workdir: str) -> dict | None:
    """The config dict recorded in workdir/config.json, None when there is none; CrossjaxError when it is damaged."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            old = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        old = e
    if not isinstance(old, dict):
        what = f"is not valid JSON ({old})" if isinstance(old, Exception) else f"holds {type(old).__name__}"
        raise CrossjaxError(
            f"{path} {what}, not the config this workdir's run was started with (it is written in one rename, so "
            "something else damaged it). If this workdir holds a run of the same --config, delete that file and "
            "run the same command again: it is written anew and the run resumes from its checkpoints; otherwise "
            "use another --workdir.")
    return old


def check(config: ConfigDict, workdir: str, defaults: ConfigDict) -> bool:
    """True when workdir holds a run of this same config (resume); raise when it holds another config's run."""
    old = read_recorded(workdir)
    if old is None:
        return False
    diff = config_differences(old, config_json(config), config_json(defaults))
    if diff:
        raise CrossjaxError(
            f"{workdir} holds a run of another config ({len(diff)} key(s) differ):\n  "
            + "\n  ".join(diff[:20]) + ("\n  ..." if len(diff) > 20 else "")
            + "\nUse another --workdir, or delete this one to start over.")
    return True


def record(config: ConfigDict, workdir: str) -> None:
    """Write workdir/config.json (process 0)."""
    import jax
    if jax.process_index() == 0:
        atomic_write_text(os.path.join(workdir, CONFIG_FILE), json.dumps(config_json(config), indent=1) + "\n")
