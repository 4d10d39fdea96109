"""The activation store: one tensorstore zarr3 array of every snapshot's activations over the same rows.

:class:`ActivationStore` creates, opens, writes, checks and reads a store; its on-disk layout, the crash-safety
argument and :class:`StoreMeta` are in :mod:`crossjax.store_format`. A store is written unit by unit (one block
of one snapshot, or one block's tokens); :meth:`ActivationStore.require_complete` says which units a reader
still lacks and how to fill them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from crossjax import paths
from crossjax.errors import CrossjaxError
from crossjax.snapshot_names import index_of
from crossjax.store_format import (  # StoreMeta, DTYPES and the errors: callers import them from here
    DTYPES,
    LAYOUT_KEYS,
    TOKEN_ARRAYS,
    NotAStoreError,
    StoreMeta,
    StoreMismatchError,
    check_same_meta,
    marker,
    open_array,
    open_kvstore,
    read_meta,
)
from crossjax.store_integrity import (
    DamagedStoreError,
    all_finite,
    find_damage,
    non_finite_error,
    parse_scales,
    unreadable_error,
)

__all__ = ["ActivationStore", "StoreMeta", "DTYPES", "NotAStoreError", "StoreMismatchError", "IncompleteStoreError",
           "UnitDoneError", "DamagedStoreError", "resolve_url"]

_INT32 = np.iinfo(np.int32)
_MAX_NAMED_UNITS = 8  # missing units an IncompleteStoreError names one by one


class IncompleteStoreError(CrossjaxError):
    """Rows were requested from units that are not written yet (or the store is empty)."""


class UnitDoneError(CrossjaxError):
    """A finished unit was offered again without ``overwrite=True``."""


def resolve_url(path: str, workdir: str | None = None) -> str:
    """Store location from a config ``path``: URLs and absolute paths as given, relative paths under ``workdir``."""
    if not path:
        raise CrossjaxError("store.path is empty: set it to a directory or a kvstore URL such as gs://bucket/store.")
    if "://" in path or os.path.isabs(path) or workdir is None:
        return path
    return paths.join(workdir, path)  # under a gs:// workdir: gs://bucket/run/store


class ActivationStore:
    """An opened store. Use :meth:`create` or :meth:`open`, not the constructor."""

    def __init__(self, kv: ts.KvStore, url: str, meta: StoreMeta, arrays: Mapping[str, ts.TensorStore]):
        self._kv = kv
        self.url = url
        self.meta = meta
        self._arrays = dict(arrays)  # activations and TOKEN_ARRAYS
        self._acts = arrays["activations"]
        self._tokens = {n: arrays[n] for n in TOKEN_ARRAYS}
        self._complete = False  # cached once true: finished units are never unmarked except by overwrite
        self._scales: np.ndarray | None = None

    # ---- opening ---------------------------------------------------------------------------------------

    @classmethod
    def create(cls, url: str, meta: StoreMeta) -> ActivationStore:
        """A new store at ``url``, or the existing one there if its meta equals ``meta``.

        Raises StoreMismatchError (touching nothing) if a store with other meta is there, and CrossjaxError
        if the location holds files that are not a store.
        """
        if not isinstance(meta, StoreMeta):
            raise CrossjaxError(f"create needs a StoreMeta, got {type(meta).__name__}.")
        meta.validate()
        kv, shown = open_kvstore(url)
        existing = read_meta(kv, shown)
        if existing is not None:
            check_same_meta(existing, meta, shown)
        else:
            foreign = [k.decode() for k in kv.list().result()
                       if not any(k.decode().startswith(p) for p in LAYOUT_KEYS)]
            if foreign:
                raise CrossjaxError(
                    f"{shown} is not empty and holds no activation store (found {foreign[:5]}): "
                    "choose an empty or new location for store.path."
                )
        arrays = {n: open_array(kv, shown, n, meta) for n in ("activations",) + TOKEN_ARRAYS}
        if existing is None:
            # meta.json goes last and only if still absent: it marks a finished skeleton, and of two processes
            # racing to create, the loser compares its meta with the winner's.
            no_value = kv.read("meta.json").result().stamp.generation
            stamp = kv.write("meta.json", meta.to_json(), if_equal=no_value).result()
            if not stamp.generation:
                check_same_meta(read_meta(kv, shown), meta, shown)
        return cls(kv, shown, meta, arrays)

    @classmethod
    def open(cls, url: str) -> ActivationStore:
        """The store at ``url``; NotAStoreError if there is none."""
        kv, shown = open_kvstore(url)
        meta = read_meta(kv, shown)
        if meta is None:
            raise NotAStoreError(
                f"{shown} holds no activation store (no meta.json): check store.path, or write the store first "
                "(python -m crossjax.activations, or the planted generator)."
            )
        arrays = {n: open_array(kv, shown, n, meta, create=False) for n in ("activations",) + TOKEN_ARRAYS}
        return cls(kv, shown, meta, arrays)

    # ---- geometry --------------------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return self.meta.num_rows

    @property
    def num_blocks(self) -> int:
        return self.meta.num_blocks

    def block_range(self, block: int) -> tuple[int, int]:
        """Rows [start, stop) of ``block``; the last block may be short."""
        self._check_block(block)
        r = self.meta.block_rows
        return block * r, min((block + 1) * r, self.meta.num_rows)

    def _snapshot(self, snapshot: int | str) -> int:
        """Index of a snapshot given by index or name."""
        return index_of(snapshot, self.meta.snapshots, where=f"the store {self.url}")

    def _check_block(self, block: int) -> None:
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or not 0 <= block < self.meta.num_blocks:
            raise CrossjaxError(f"block {block!r} is out of range: this store has blocks 0..{self.meta.num_blocks - 1}.")

    # ---- writing ---------------------------------------------------------------------------------------

    def write_block(self, block: int, snapshot: int | str, acts: Any, *, overwrite: bool = False) -> None:
        """Write one unit: ``acts [R_b, D]`` are rows ``block_range(block)`` of ``snapshot``.

        Shape and finiteness are checked before anything is written; the done marker follows the data.
        """
        s = self._snapshot(snapshot)
        start, stop = self.block_range(block)
        x = np.asarray(acts)
        want = (stop - start, self.meta.d_model)
        if x.shape != want:
            raise CrossjaxError(
                f"block {block} snapshot {s} ({self.meta.snapshots[s]}): activations have shape {x.shape}, "
                f"expected {want} (rows of this block, d_model)."
            )
        if not (np.issubdtype(x.dtype, np.floating) or x.dtype == DTYPES["bfloat16"]):
            raise CrossjaxError(f"block {block} snapshot {s}: activations have dtype {x.dtype}; give floating-point values.")
        finite = np.isfinite(x.astype(np.float32))
        bad = int(x.size - np.count_nonzero(finite))
        if bad:
            raise CrossjaxError(
                f"block {block} snapshot {s} ({self.meta.snapshots[s]}): {bad} of {x.size} values are NaN or Inf; "
                "nothing was written. Check the model snapshot (diverged weights?) or the hook's dtype."
            )
        with np.errstate(over="ignore"):
            y = x.astype(DTYPES[self.meta.dtype])
        over = int(y.size - np.count_nonzero(np.isfinite(y.astype(np.float32))))
        if over:
            raise CrossjaxError(
                f"block {block} snapshot {s} ({self.meta.snapshots[s]}): {over} values overflow {self.meta.dtype} "
                "(|x| > 65504 for float16); nothing was written. Use store.dtype='bfloat16'."
            )
        self._begin_unit(block, s, overwrite)
        self._acts[start:stop, s : s + 1, :].write(y[:, None, :]).result()
        self._mark(block, s)

    def write_tokens(self, block: int, token_ids: Any, context_ids: Any, positions: Any, *, overwrite: bool = False) -> None:
        """Write the token unit of ``block``: three integer arrays ``[R_b]``, stored as int32."""
        start, stop = self.block_range(block)
        arrays = {}
        for name, v in zip(TOKEN_ARRAYS, (token_ids, context_ids, positions)):
            a = np.asarray(v)
            if a.shape != (stop - start,):
                raise CrossjaxError(f"block {block}: {name} has shape {a.shape}, expected ({stop - start},) (rows of this block).")
            if not np.issubdtype(a.dtype, np.integer):
                raise CrossjaxError(f"block {block}: {name} has dtype {a.dtype}; give integers.")
            if a.size and (a.min() < _INT32.min or a.max() > _INT32.max):
                raise CrossjaxError(f"block {block}: {name} has values outside int32; they must fit in int32.")
            arrays[name] = a.astype(np.int32)
        self._begin_unit(block, None, overwrite)
        futures = [self._tokens[n][start:stop].write(arrays[n]) for n in TOKEN_ARRAYS]
        for f in futures:
            f.result()
        self._mark(block, None)

    def _begin_unit(self, block: int, snapshot: int | None, overwrite: bool) -> None:
        key = marker(block, snapshot)
        if self._kv.read(key).result().state == "value":
            what = "tokens" if snapshot is None else f"snapshot {snapshot} ({self.meta.snapshots[snapshot]})"
            if not overwrite:
                raise UnitDoneError(f"block {block} {what} is already written: no command rewrites a finished unit "
                                    "(the same command skips it); in Python, write_block(..., overwrite=True) "
                                    "replaces it.")
            # Unmark first, so that a crash during the rewrite leaves the unit to be redone.
            self._kv.write(key, None).result()
            self._complete = False

    def _mark(self, block: int, snapshot: int | None) -> None:
        self._kv.write(marker(block, snapshot), b"").result()

    # ---- progress --------------------------------------------------------------------------------------

    def is_done(self, block: int, snapshot: int | str | None = None) -> bool:
        """Whether a unit is finished; ``snapshot=None`` asks about the block's tokens."""
        self._check_block(block)
        s = None if snapshot is None else self._snapshot(snapshot)
        return self._kv.read(marker(block, s)).result().state == "value"

    def _done_keys(self) -> set[str]:
        return {k.decode() for k in (self._kv / "done/").list().result()}

    def missing_units(self) -> list[tuple[int, int | None]]:
        """Units without a done marker, block by block: ``(block, None)`` is the tokens unit."""
        return self._missing_from(self._done_keys())

    def _missing_from(self, done: set[str]) -> list[tuple[int, int | None]]:
        out = []
        for b in range(self.meta.num_blocks):
            for s in (None, *range(self.meta.num_snapshots)):
                if marker(b, s)[len("done/"):] not in done:
                    out.append((b, s))
        return out

    def is_complete(self) -> bool:
        if not self._complete:
            self._complete = not self.missing_units()
        return self._complete

    def require_complete(self, blocks: Iterable[int] | None = None, *, activations: bool = True,
                         tokens: bool = True) -> None:
        """Raise IncompleteStoreError unless the units a reader needs are written.

        blocks: the blocks to be read (all if None); activations / tokens: whether their activation units
        (every snapshot) and their token units are needed. The error names the missing units (block and
        snapshot name, or tokens) and the command that writes them.
        """
        if self._complete:
            return
        done = self._done_keys()
        if len(done) >= self.meta.num_blocks * (self.meta.num_snapshots + 1) and not self._missing_from(done):
            self._complete = True
            return
        fill = self._fill_command()
        if not done:
            raise IncompleteStoreError(
                f"{self.url} is incomplete: it is empty, no unit has been written yet. Fill it with {fill}.")
        if blocks is None:
            wanted, where = range(self.meta.num_blocks), ""
        else:
            blocks = list(blocks)
            for b in blocks:
                self._check_block(b)
            wanted, where = sorted({int(b) for b in blocks}), " of the requested blocks"
        units = ([None] if tokens else []) + (list(range(self.meta.num_snapshots)) if activations else [])
        missing = [(b, s) for b in wanted for s in units if marker(b, s)[len("done/"):] not in done]
        if missing:
            names = [f"block {b} " + ("tokens" if s is None else f"snapshot {self.meta.snapshots[s]}")
                     for b, s in missing[:_MAX_NAMED_UNITS]]
            more = f" and {len(missing) - _MAX_NAMED_UNITS} more" if len(missing) > _MAX_NAMED_UNITS else ""
            raise IncompleteStoreError(
                f"{self.url} is incomplete: {len(missing)} unfinished unit(s){where} ({', '.join(names)}{more}). "
                f"Fill them with {fill}; it redoes only the missing units.")

    def _fill_command(self) -> str:
        """What writes this store's missing units."""
        return ("crossjax.planted.generate_planted(url, cfg) again" if self.meta.model == "planted"
                else "python -m crossjax.activations --config=<your config> --workdir=<your workdir> (for the store "
                     "of an on-the-fly run, which holds only the held-out blocks, add --config.data.on_the_fly=False)")

    # ---- reading ---------------------------------------------------------------------------------------
    # Every read is checked: a chunk that is missing, changed or undecodable, and NaN/Inf values, raise
    # DamagedStoreError naming the unit (crossjax.store_integrity). The detail is worked out only on failure.

    def _check_rows(self, start: int, stop: int) -> None:
        if not (0 <= start < stop <= self.meta.num_rows):
            raise CrossjaxError(f"rows [{start}, {stop}) are not a non-empty range inside [0, {self.meta.num_rows}).")

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of every snapshot: ``[n, S, D]`` in the storage dtype."""
        self._check_rows(start, stop)
        r = self.meta.block_rows
        blocks = range(start // r, (stop - 1) // r + 1)
        self.require_complete(blocks, tokens=False)
        try:
            x = self._acts[start:stop].read().result()
        except ValueError as e:
            raise self._read_failure(blocks, e) from e
        self._check_finite(x, [(start, stop)])
        return x

    def read_blocks(self, blocks: Sequence[int]) -> np.ndarray:
        """The rows of ``blocks`` in the given order: ``[sum R_b, S, D]``. All reads are issued before any wait."""
        blocks = [int(b) for b in blocks]
        if not blocks:
            raise CrossjaxError("read_blocks got no blocks: pass at least one block index.")
        ranges = [self.block_range(b) for b in blocks]
        self.require_complete(blocks, tokens=False)
        futures = [self._acts[a:b].read() for a, b in ranges]
        out = np.empty((sum(b - a for a, b in ranges), self.meta.num_snapshots, self.meta.d_model), DTYPES[self.meta.dtype])
        pos, failed = 0, []
        for block, (a, b), fut in zip(blocks, ranges, futures):
            try:
                out[pos : pos + b - a] = fut.result()
            except ValueError as e:
                failed.append((block, e))
            pos += b - a
        if failed:
            raise self._read_failure([b for b, _ in failed], failed[0][1]) from failed[0][1]
        self._check_finite(out, ranges)
        return out

    def read_tokens(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """``{token_ids, context_ids, positions}`` of rows [start, stop), each int32 ``[n]``."""
        self._check_rows(start, stop)
        r = self.meta.block_rows
        blocks = range(start // r, (stop - 1) // r + 1)
        self.require_complete(blocks, activations=False)
        futures = {n: self._tokens[n][start:stop].read() for n in TOKEN_ARRAYS}
        try:
            return {n: f.result() for n, f in futures.items()}
        except ValueError as e:
            raise self._read_failure(blocks, e, tokens=True) from e

    def _check_finite(self, x: np.ndarray, ranges: Sequence[tuple[int, int]]) -> None:
        """DamagedStoreError naming the NaN/Inf rows of ``x [n, S, D]``, read from the store rows ``ranges``."""
        if not all_finite(x):
            rows = np.concatenate([np.arange(a, b) for a, b in ranges])
            raise non_finite_error(self.url, self.meta.snapshots, x, rows, self.meta.block_rows, self._fill_command())

    def _read_failure(self, blocks: Iterable[int], error: Exception, tokens: bool = False) -> CrossjaxError:
        """The error for a failed read of ``blocks``, naming the damaged units when that is the cause."""
        return (find_damage(self.url, self.meta, self._arrays, blocks, tokens, self._fill_command())
                or unreadable_error(self.url, f"blocks {list(blocks)}", error))

    # ---- normalisation scales --------------------------------------------------------------------------

    def estimate_scales(self, num_rows: int | None = None) -> np.ndarray:
        """Per-snapshot ``sqrt(D) / mean_rows ||x_row||`` over the first ``num_rows`` rows (all if None): ``[S]``.

        Norms are taken in float32, one block at a time.
        """
        n = self.meta.num_rows if num_rows is None else int(num_rows)
        if n <= 0:
            raise CrossjaxError(f"estimate_scales(num_rows={num_rows}): give a positive number of rows.")
        n = min(n, self.meta.num_rows)
        total = np.zeros(self.meta.num_snapshots, np.float64)
        step = self.meta.block_rows
        for a in range(0, n, step):
            x = self.read_rows(a, min(a + step, n)).astype(np.float32)
            total += np.linalg.norm(x, axis=-1).sum(axis=0, dtype=np.float64)
        mean = total / n
        if np.any(mean <= 0):
            zero = [self.meta.snapshots[i] for i in np.flatnonzero(mean <= 0)]
            raise CrossjaxError(f"snapshots {zero} have all-zero activations in the first {n} rows: no scale exists; check the data.")
        return (math.sqrt(self.meta.d_model) / mean).astype(np.float32)

    @property
    def scales(self) -> np.ndarray | None:
        """Saved per-snapshot scales ``[S]`` (float32), or None until :meth:`set_scales`."""
        if self._scales is None:
            r = self._kv.read("scales.json").result()
            if r.state == "value":
                self._scales = parse_scales(r.value, f"{self.url}/scales.json", self.meta.snapshots)
        return None if self._scales is None else self._scales.copy()

    def set_scales(self, scales: Any) -> None:
        """Save per-snapshot scales ``[S]`` in scales.json."""
        s = np.asarray(scales, np.float64)
        if s.shape != (self.meta.num_snapshots,):
            raise CrossjaxError(f"set_scales got shape {s.shape}: give one scale per snapshot, shape ({self.meta.num_snapshots},).")
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise CrossjaxError(f"set_scales got {s.tolist()}: scales must be finite and positive.")
        s32 = s.astype(np.float32)
        body = {"snapshots": list(self.meta.snapshots), "scales": [float(v) for v in s32]}
        self._kv.write("scales.json", (json.dumps(body, indent=1) + "\n").encode()).result()
        self._scales = s32

    # ---- side files (e.g. the planted ground truth) ----------------------------------------------------

    def write_file(self, name: str, data: bytes) -> None:
        """Save ``data`` under ``name`` beside the store (any kvstore)."""
        self._check_side_name(name)
        self._kv.write(name, bytes(data)).result()

    def read_file(self, name: str) -> bytes | None:
        """The bytes saved under ``name``, or None."""
        self._check_side_name(name)
        r = self._kv.read(name).result()
        return r.value if r.state == "value" else None

    @staticmethod
    def _check_side_name(name: str) -> None:
        if not name or "/" in name or name in ("meta.json", "scales.json") or name.endswith(".__lock"):
            raise CrossjaxError(f"side file name {name!r} is reserved or nested: use a plain new file name.")

    def __repr__(self) -> str:
        m = self.meta
        return f"ActivationStore({self.url!r}, rows={m.num_rows}, snapshots={m.num_snapshots}, d_model={m.d_model}, {m.dtype})"
