"""Checkpoints of the training state and the loader position, saved together so a resumed run sees the same batches.

A thin layer over orbax's CheckpointManager: async saves (the step loop does not wait for the disk), the last N
kept, unfinished saves (a process killed mid-write) ignored and cleaned up, restore onto any mesh and any number of
processes: the target is a pytree of jax.ShapeDtypeStruct carrying the new shardings and orbax reshards while
reading. Every process takes part in a save (each writes the shards it holds) and in a restore.

Layout of a step directory: `state/` (orbax pytree) and `loader/position.json` (the loader position, written
once by process 0: the batch order does not depend on the process count, so one position serves any number of
processes). Checkpoints of earlier versions hold the position in `data/`, one grain file per process; they hold
the same global position, and any one of them is read.

Resuming (restore_latest) takes the newest checkpoint that restores and holds only finite numbers. A damaged one
(a file truncated or missing, an emptied step directory: a full disk, a copy cut short) is skipped with a message
and moved to `<directory>.skipped/<step>`: kept for inspection, never taken as the latest again, and its step can
be saved anew (orbax refuses to save a step whose directory exists). A position that belongs to another batch
order (other loader settings) is not damage: it stops the run with the loader's message.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from crossjax import console, paths
from crossjax.errors import CrossjaxError

SKIPPED_SUFFIX = ".skipped"
LOADER_ITEM = "loader"          # the loader position, one JSON for every process
LOADER_FILE = "position.json"
LEGACY_LOADER_ITEM = "data"     # earlier versions: grain's per-process iterator files (read only)


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int                      # the checkpoint the run resumes from
    state: Any                     # its state pytree, on the target's shardings


class Checkpoints:
    """`directory` holds one sub-directory per saved step: `state/` (orbax pytree) and `loader/` (position)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int, async_save: bool = True):
        if keep < 1:
            raise CrossjaxError(f"keep={keep}: at least one checkpoint must be kept")
        self.directory = paths.absolute(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), LOADER_ITEM: ocp.JsonCheckpointHandler(LOADER_FILE),
                    LEGACY_LOADER_ITEM: ocp.JsonCheckpointHandler()}   # the last is never read through orbax
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._good: set[int] = set()       # steps known to restore: the one resumed from, those saved and durable
        self._queued: set[int] = set()     # saved here, maybe not yet durable

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def last_good_step(self) -> int | None:
        """The newest kept step known to restore: the one restore_latest resumed from or one saved (and made
        durable) by this object; what restore_latest would pick. Waits for queued saves."""
        self.wait()
        good = self._good & set(self._manager.all_steps())
        return max(good) if good else None

    def save(self, step: int, state: Any, data_iterator: Any | None = None) -> None:
        """Queue a save of `state` (a pytree of jax.Arrays) and, if given, the data iterator's position.

        Every process calls it. The position (`data_iterator.get_state()`, a JSON dict) is captured now; the
        arrays are written in the background.
        """
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[LOADER_ITEM] = ocp.args.JsonSave(data_iterator.get_state())
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._queued.add(step)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
        """Read step `step` onto the shardings of `abstract_state` (ShapeDtypeStructs); reposition the iterator.

        Returns the restored state pytree. The iterator, if given, is restored in place (its set_state refuses a
        position of another batch order with a CrossjaxError).
        """
        state, position = self._read(step, abstract_state, data_iterator is not None)
        if data_iterator is not None:
            data_iterator.set_state(position)
        return state

    def _read(self, step: int, abstract_state: Any, with_position: bool) -> tuple[Any, dict | None]:
        """(state on the target's shardings, the saved loader position or None)."""
        if step not in self._manager.all_steps():
            raise CrossjaxError(f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        step_dir = epath.Path(self.directory) / str(step)
        legacy = with_position and not (step_dir / LOADER_ITEM).exists() and (step_dir / LEGACY_LOADER_ITEM).exists()
        if with_position and not legacy:
            items[LOADER_ITEM] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if not with_position:
            return restored["state"], None
        return restored["state"], (_legacy_position(step_dir / LEGACY_LOADER_ITEM) if legacy
                                   else restored[LOADER_ITEM])

    def restore_latest(self, abstract_state: Any, data_iterator: Any | None = None, *,
                       stage: str) -> Restored | None:
        """The newest checkpoint that restores with finite numbers (None when there is none at all).

        Newer ones that fail are named (through console.say under `stage`) and moved to `<directory>.skipped/`.
        Raises CrossjaxError, changing nothing, when checkpoints exist but none of them restores.
        """
        skipped: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            state, why = self._attempt(step, abstract_state, data_iterator)
            if why is None:
                if skipped:
                    self._set_aside([s for s, _ in skipped], stage)
                self._good.add(step)
                return Restored(step=step, state=state)
            skipped.append((step, why))
            console.say(stage, f"skipping checkpoint step {step} in {self.directory}: {why}")
        if not skipped:
            return None
        reasons = "\n  ".join(f"step {s}: {why}" for s, why in skipped)
        raise CrossjaxError(
            f"none of the checkpoints in {self.directory} restores:\n  {reasons}\nPut back intact copies of those "
            f"files, or move the directory aside (mv {self.directory} {self.directory}.broken) to train from "
            "step 0; nothing was changed.")

    def _attempt(self, step: int, abstract_state: Any, data_iterator: Any | None) -> tuple[Any, str | None]:
        """(state, None) when step `step` restores with finite numbers, else (None, why)."""
        state, position, why = None, None, None
        try:
            state, position = self._read(step, abstract_state, data_iterator is not None)
        except Exception as e:  # orbax, tensorstore and json each raise their own types for a damaged file
            why = f"it does not restore ({_root_cause(e)})"
        if not _on_every_process(why is None):
            return None, why or "it does not restore on another process"
        bad = nonfinite_leaves(state)
        if bad:
            return None, f"it holds NaN/Inf in {', '.join(bad[:4])}" + (" ..." if len(bad) > 4 else "")
        if data_iterator is not None:
            data_iterator.set_state(position)   # another batch order: the loader's CrossjaxError stops the run
        return state, None

    def _set_aside(self, steps: list[int], stage: str) -> None:
        """Move the step directories out of the manager's view (process 0), so none is the latest again."""
        aside = self.directory + SKIPPED_SUFFIX
        if jax.process_index() == 0:
            paths.makedirs(aside)
            for step in steps:
                dest = _unused_path(paths.join(aside, str(step)))
                paths.move(paths.join(self.directory, str(step)), dest)
                console.say(stage, f"moved the skipped checkpoint step {step} to {dest} (kept for inspection; "
                            "the run no longer reads it)")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("crossjax checkpoints set aside")
        self._manager.reload()

    def wait(self) -> None:
        """Block until every queued save is durable."""
        self._manager.wait_until_finished()
        self._good |= self._queued
        self._queued.clear()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with the shapes/dtypes of `tree` and the given shardings (a restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def nonfinite_leaves(tree: Any) -> list[str]:
    """Dotted key paths of the floating-point leaves of `tree` that hold a NaN or an Inf (one jitted reduction
    per leaf, all in one call)."""
    named = [(jax.tree_util.keystr(path, simple=True, separator="."), x)
             for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not named:
        return []
    finite = jax.device_get(jax.jit(lambda xs: [jnp.isfinite(x).all() for x in xs])([x for _, x in named]))
    return [name for (name, _), ok in zip(named, finite) if not ok]


def _root_cause(e: BaseException) -> str:
    """`Type: first line` of the innermost cause (tensorstore wraps the useful message in a long one)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 300 else text[:300] + "..."


def _on_every_process(ok: bool) -> bool:
    """`ok` on every JAX process (so that all processes skip the same checkpoints)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _legacy_position(directory: epath.Path) -> dict:
    """The loader position of a checkpoint of an earlier version: grain's `process_<i>-of-<n>.json` files hold the
    same global position on every process, so any one of them serves any number of processes now."""
    files = sorted(directory.glob("process_*-of-*.json"))
    if not files:
        raise FileNotFoundError(f"no loader position (process_*-of-*.json) in {directory}")
    return json.loads(files[0].read_text())


def _unused_path(path: str) -> str:
    """`path`, or `path.1`, `path.2`, ... : the first that does not exist."""
    candidate, n = path, 0
    while paths.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate
