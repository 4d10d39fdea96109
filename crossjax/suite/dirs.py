"""Files and directories of a suite build, each put in place by one rename: a killed build leaves no half of one."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from crossjax.errors import CrossjaxError
from crossjax.files import atomic_write


def save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a bare temporary name
            np.save(f, arr)
    atomic_write(path, write)


def fresh_partial_dir(path: Path) -> Path:
    """An empty `<path>.partial` directory to build `path` in (a leftover of a killed build is cleared)."""
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, final: Path) -> None:
    """Moves a finished directory into place (a rename: readers never see a half-written one)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def read_json(path: Path) -> dict | None:
    """The JSON record at `path`, None when there is none; a corrupt one names the suite directory to delete."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise CrossjaxError(f"{path} is corrupt ({e}); delete the suite directory {path.parent} and build again.")
