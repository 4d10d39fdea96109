"""Writing files so that a reader, or a run killed mid-write, never sees half of one: local paths or gs://."""
from __future__ import annotations

import os
from typing import Callable

from crossjax import paths


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) with a local temporary path, then put the result at `path` in one step (local: a
    rename; gs://: one object upload); the temporary file never outlives the call."""
    paths.write_via_local_file(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` in one step (a rename, or one gs:// object upload)."""
    paths.write_text(path, text)
