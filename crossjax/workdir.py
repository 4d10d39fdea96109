"""The workdir guard: workdir/config.json records the config a run was started with.

The same config again resumes the run; another config is refused with the keys that differ, so two experiments
never mix their checkpoints. Keys in RESUME_SAFE_KEYS may change between a run and its resumption: they move
work around (mesh, logging, checkpoint cadence, evaluation), not the numbers trained.
"""
from __future__ import annotations

import importlib.util
import json

from ml_collections import ConfigDict

from crossjax import paths
from crossjax.errors import CrossjaxError

CONFIG_FILE = "config.json"
RESUME_SAFE_KEYS = ("mesh.", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                    "train.async_checkpointing", "train.progress", "train.eval_every", "eval.", "evals",
                    # the same rows either way (the loader refuses a saved position of another batch order)
                    "data.on_the_fly", "data.streams")


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
    """The absolute path of workdir (a gs:// URL as given), created if missing; CrossjaxError when it is a file,
    cannot be made, or is a location crossjax cannot write (another scheme; gs:// without gcsfs)."""
    workdir = paths.absolute(paths.check_supported(workdir, "--workdir"))
    if paths.is_gcs(workdir):
        if importlib.util.find_spec("gcsfs") is None:
            raise CrossjaxError(f"--workdir={workdir} is on Cloud Storage, where the checkpoints are written "
                                "through gcsfs, which is not installed: pip install 'crossjax[gcs]' (or gcsfs)")
        if paths.isfile(workdir):
            raise CrossjaxError(f"--workdir={workdir} is an object, not a directory; choose another --workdir")
        return workdir
    if paths.exists(workdir) and not paths.isdir(workdir):
        raise CrossjaxError(f"--workdir={workdir} is a file, not a directory; choose another --workdir")
    try:
        paths.makedirs(workdir)
    except OSError as e:
        raise CrossjaxError(f"cannot create --workdir={workdir} ({e.strerror}: {e.filename}); choose a writable "
                            "location for --workdir") from e
    return workdir


def read_recorded(workdir: str) -> dict | None:
    """The config dict recorded in workdir/config.json, None when there is none; CrossjaxError when it is damaged."""
    path = paths.join(workdir, CONFIG_FILE)
    try:
        data = paths.read_bytes(path)
    except FileNotFoundError:
        return None
    try:
        old = json.loads(data)
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
        paths.write_text(paths.join(workdir, CONFIG_FILE), json.dumps(config_json(config), indent=1) + "\n")
