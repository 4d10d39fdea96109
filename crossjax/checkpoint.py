"""Checkpoints of the training state and the data iterator, saved together so a resumed run sees the same batches.

A thin layer over orbax's CheckpointManager: async saves (the step loop does not wait for the disk), the last N
kept, unfinished saves (a process killed mid-write) ignored and cleaned up, restore onto any mesh: the target is a
pytree of jax.ShapeDtypeStruct carrying the new shardings and orbax reshards while reading.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from crossjax.errors import CrossjaxError


class Checkpoints:
    """`directory` holds one sub-directory per saved step: `state/` (orbax pytree) and `data/` (iterator state)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int, async_save: bool = True):
        if keep < 1:
            raise CrossjaxError(f"keep={keep}: at least one checkpoint must be kept")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any | None = None) -> None:
        """Queue a save of `state` (a pytree of jax.Arrays) and, if given, the data iterator's position.

        The iterator state is captured now (synchronously); the arrays are written in the background.
        """
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
        """Read step `step` onto the shardings of `abstract_state` (ShapeDtypeStructs); reposition the iterator.

        Returns the restored state pytree. The iterator, if given, is restored in place.
        """
        if step not in self._manager.all_steps():
            raise CrossjaxError(f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def wait(self) -> None:
        """Block until every queued save is durable."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with the shapes/dtypes of `tree` and the given shardings (a restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
