"""The hashes of a suite's snapshot weights: recorded when each snapshot is written, verified at every reuse.

The build records each snapshot's content hash (models.snapshot_files.weights_hash, read back from the file just
written) in its losses.json record and, when the build finishes, all of them in DONE.json. A reused suite streams
every snapshot's safetensors through the same hash (no model is built: about 0.2 s for the 17 snapshots of the
tiny suite) and refuses one that is damaged or differs, naming the file and the fix, so a flipped bit never
becomes wrong activations. A suite finished by a crossjax that recorded no hashes has them recorded on its first
reuse.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from crossjax import console
from crossjax.errors import CrossjaxError
from crossjax.files import atomic_write_text
from crossjax.models import snapshot_files
from crossjax.safetensors_file import DamagedFileError
from crossjax.suite import dirs
from crossjax.suite.training import WEIGHTS_KEY

DONE_FILE = "DONE.json"


def _rebuild_fix(snapshot_dir: Path) -> str:
    return (f"remove {snapshot_dir} and run the same command again: the suite then trains again from step 0 and "
            "rewrites its snapshots with the same bits (the build is deterministic)")


def _hash(root: Path, name: str) -> str:
    """The snapshot's weights hash; a damaged file is named with the suite's fix."""
    try:
        return snapshot_files.weights_hash(root / name)
    except CrossjaxError as e:
        problem = f"{e.path} {e.problem}" if isinstance(e, DamagedFileError) else str(e).rstrip(".")
        raise CrossjaxError(f"the suite snapshot {name} is damaged: {problem}; {_rebuild_fix(root / name)}.") from e


def recorded_at_build(root: Path, names: Sequence[str]) -> dict[str, str]:
    """name -> hash from losses.json, as each snapshot was written (computed now for a record that has none: a
    snapshot written by an earlier crossjax before the build was resumed)."""
    records = (dirs.read_json(root / "losses.json") or {}).get("snapshots", [])
    known = {r.get("name"): r.get(WEIGHTS_KEY) for r in records if isinstance(r, dict)}
    return {n: known[n] if isinstance(known.get(n), str) else _hash(root, n) for n in names}


def verify(root: Path, done: dict, names: Sequence[str], *, show: bool) -> None:
    """Checks every snapshot in `names` against the hash DONE.json (`done`) records; records the missing ones."""
    recorded = done.get(WEIGHTS_KEY)
    recorded = dict(recorded) if isinstance(recorded, dict) else {}
    unrecorded = [n for n in names if not isinstance(recorded.get(n), str)]
    for name in names:
        if name in unrecorded:
            continue
        got = _hash(root, name)
        if got != recorded[name]:
            raise CrossjaxError(
                f"{root / name / snapshot_files.SAFE_SINGLE} does not hold the weights the suite recorded for "
                f"{name} when it wrote them (sha256 {got[:12]}, recorded {recorded[name][:12]}): the file was changed "
                f"or damaged since; {_rebuild_fix(root / name)}.")
    if unrecorded:
        recorded.update({n: _hash(root, n) for n in unrecorded})
        atomic_write_text(root / DONE_FILE, json.dumps({**done, WEIGHTS_KEY: recorded}, indent=2, sort_keys=True))
        console.say("suite", f"recorded the weight hashes of {len(unrecorded)} snapshot(s) in {root / DONE_FILE} "
                    "(the suite was finished by a crossjax that did not record them); later runs verify them",
                    enabled=show)
