"""The activation store: one tensorstore zarr3 array of every snapshot's activations over the same rows.

Layout under the store URL (a local path, or any tensorstore kvstore URL such as ``gs://bucket/x``,
``file:///abs/path`` or ``memory://name``):

- ``meta.json``: the :class:`StoreMeta` as JSON.
- ``activations/``: zarr3 ``[N, S, D]`` float16/bfloat16, chunk ``[R, 1, D]``: one (block, snapshot) unit is
  one chunk file, so writers of disjoint units never touch the same file.
- ``token_ids/``, ``context_ids/``, ``positions/``: zarr3 int32 ``[N]``, chunk ``[R]``.
- ``done/b{block:06d}_s{snapshot:03d}`` and ``done/b{block:06d}_tokens``: empty markers, each written only
  after its unit's data is durable. A unit without a marker is rewritten on resume.
- ``scales.json``: per-snapshot normalisation scales, once computed.

Crash safety rests on the kvstore writing each key atomically. The file driver writes a value to
``<key>.__lock``, fsyncs it and renames it over ``<key>`` (tensorstore/kvstore/file/file_key_value_store.cc),
so a process killed mid-way leaves either the old file or the new one, never a torn chunk; object stores
(gs://) replace whole objects. Since a unit's bytes depend only on its inputs, rewriting an unmarked unit
gives the bytes an uninterrupted run would have written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections
import ml_dtypes
import numpy as np
import tensorstore as ts

from crossjax.errors import CrossjaxError

DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
_TOKEN_ARRAYS = ("token_ids", "context_ids", "positions")
_LAYOUT_KEYS = ("meta.json", "scales.json", "activations/", "done/") + tuple(f"{n}/" for n in _TOKEN_ARRAYS)
_ZSTD_LEVEL = 3
_INT32 = np.iinfo(np.int32)

# One context for the whole process: `memory://` stores live in a context, so every store opened in this
# process must share it to see the same data. Its cache pool is empty (no caching), so a reader always sees
# what other processes have written.
_CONTEXT = ts.Context()


class NotAStoreError(CrossjaxError):
    """The URL holds no activation store (no meta.json)."""


class StoreMismatchError(CrossjaxError):
    """A store already exists at the URL with other metadata."""


class IncompleteStoreError(CrossjaxError):
    """Rows were requested from units that are not written yet (or the store is empty)."""


class UnitDoneError(CrossjaxError):
    """A finished unit was offered again without ``overwrite=True``."""


def default_config() -> ml_collections.ConfigDict:
    """The ``store`` config section."""
    return ml_collections.ConfigDict(
        {
            "path": "store",  # relative paths are under the workdir; or a kvstore URL (gs://..., file://...)
            "block_rows": 4096,  # rows per block R: one chunk file holds R rows of one snapshot
            "dtype": "float16",  # "float16" | "bfloat16"
        }
    )


def resolve_url(path: str, workdir: str | None = None) -> str:
    """Store location from a config ``path``: URLs and absolute paths as given, relative paths under ``workdir``."""
    if not path:
        raise CrossjaxError("store.path is empty: set it to a directory or a kvstore URL such as gs://bucket/store.")
    if "://" in path or os.path.isabs(path) or workdir is None:
        return path
    return os.path.join(workdir, path)


# ----------------------------------------------------------------------------------------------------------
# Metadata


@dataclasses.dataclass(frozen=True)
class StoreMeta:
    """What a store holds. Equal metas mean the same store; :meth:`ActivationStore.create` enforces it."""

    snapshots: tuple[str, ...]
    d_model: int
    num_rows: int
    block_rows: int
    dtype: str  # "float16" | "bfloat16"
    model: str
    hook: str
    context_len: int | None = None
    snapshot_hashes: tuple[str, ...] | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # free-form JSON: tokenizer, source fingerprint, ...

    def __post_init__(self):
        # Normalise sequences to tuples so that metas read back from JSON compare equal to the ones written.
        object.__setattr__(self, "snapshots", tuple(self.snapshots))
        if self.snapshot_hashes is not None:
            object.__setattr__(self, "snapshot_hashes", tuple(self.snapshot_hashes))
        object.__setattr__(self, "extra", dict(self.extra))
        self.validate()

    def __hash__(self) -> int:  # `extra` is a dict, so hash the canonical JSON
        return hash(self.to_json())

    @property
    def num_snapshots(self) -> int:
        return len(self.snapshots)

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_rows / self.block_rows)

    def validate(self) -> None:
        """Raise CrossjaxError naming the first bad field and the fix."""
        if not self.snapshots:
            raise CrossjaxError("StoreMeta.snapshots is empty: list at least one snapshot name.")
        for name in self.snapshots:
            if not isinstance(name, str) or not name:
                raise CrossjaxError(f"StoreMeta.snapshots holds {name!r}: every snapshot name must be a non-empty string.")
        dup = sorted({s for s in self.snapshots if self.snapshots.count(s) > 1})
        if dup:
            raise CrossjaxError(f"StoreMeta.snapshots repeats {dup}: each snapshot must appear once.")
        for field in ("d_model", "num_rows", "block_rows"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise CrossjaxError(f"StoreMeta.{field}={value!r}: it must be a positive integer.")
        if self.dtype not in DTYPES:
            raise CrossjaxError(f"StoreMeta.dtype={self.dtype!r}: use one of {sorted(DTYPES)}.")
        if self.context_len is not None and (not isinstance(self.context_len, (int, np.integer)) or self.context_len <= 0):
            raise CrossjaxError(f"StoreMeta.context_len={self.context_len!r}: give a positive integer or None.")
        if self.snapshot_hashes is not None and len(self.snapshot_hashes) != len(self.snapshots):
            raise CrossjaxError(
                f"StoreMeta.snapshot_hashes has {len(self.snapshot_hashes)} entries for {len(self.snapshots)} "
                "snapshots: give one hash per snapshot or None."
            )
        try:
            json.dumps(self.extra)
        except (TypeError, ValueError) as e:
            raise CrossjaxError(f"StoreMeta.extra is not JSON-serialisable ({e}): keep it to str/int/float/list/dict.") from e

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["snapshots"] = list(self.snapshots)
        d["snapshot_hashes"] = None if self.snapshot_hashes is None else list(self.snapshot_hashes)
        d["d_model"], d["num_rows"], d["block_rows"] = int(self.d_model), int(self.num_rows), int(self.block_rows)
        return (json.dumps(d, sort_keys=True, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "meta.json") -> StoreMeta:
        try:
            d = json.loads(data)
        except json.JSONDecodeError as e:
            raise NotAStoreError(f"{where} is not valid JSON ({e}): the store is damaged; delete it and write it again.") from e
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - fields or not {"snapshots", "d_model", "num_rows"} <= set(d):
            raise NotAStoreError(
                f"{where} does not describe an activation store (fields {sorted(d) if isinstance(d, dict) else d}): "
                "point store.path at a store written by crossjax, or at an empty location."
            )
        return cls(**d)


def check_compatible(metas: Sequence[StoreMeta]) -> None:
    """Raise CrossjaxError unless the parts can form one store.

    Parts (e.g. one per snapshot) must agree on d_model, row count, block size, dtype, model, hook and
    context length, and must not repeat a snapshot.
    """
    if not metas:
        raise CrossjaxError("check_compatible got no parts: give at least one StoreMeta.")
    for field in ("d_model", "num_rows", "block_rows", "dtype", "model", "hook", "context_len"):
        values = {}
        for m in metas:
            for s in m.snapshots:
                values[s] = getattr(m, field)
        if len(set(values.values())) > 1:
            what = {"d_model": "d_model (hidden size)", "num_rows": "row count"}.get(field, field)
            raise CrossjaxError(
                f"snapshots disagree in {what}: {values}. All snapshots of one store must be the same model "
                "architecture run over the same rows: drop the odd snapshots or regenerate them with the same settings."
            )
    seen: set[str] = set()
    for m in metas:
        rep = seen & set(m.snapshots)
        if rep:
            raise CrossjaxError(f"snapshot(s) {sorted(rep)} appear in more than one part: list each snapshot once.")
        seen |= set(m.snapshots)


def merge_metas(metas: Sequence[StoreMeta], **overrides: Any) -> StoreMeta:
    """One StoreMeta over all parts' snapshots, in order, after :func:`check_compatible`."""
    check_compatible(metas)
    hashes = None
    if all(m.snapshot_hashes is not None for m in metas):
        hashes = tuple(h for m in metas for h in m.snapshot_hashes)
    extra: dict = {}
    for m in metas:
        extra.update(m.extra)
    merged = dataclasses.replace(
        metas[0], snapshots=tuple(s for m in metas for s in m.snapshots), snapshot_hashes=hashes, extra=extra
    )
    return dataclasses.replace(merged, **overrides) if overrides else merged


def _meta_differences(a: StoreMeta, b: StoreMeta) -> list[str]:
    out = []
    for f in dataclasses.fields(StoreMeta):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if va != vb:
            out.append(f"{f.name}: stored {va!r}, requested {vb!r}")
    return out


# ----------------------------------------------------------------------------------------------------------
# The store


def _open_kvstore(url: str) -> tuple[ts.KvStore, str]:
    """(kvstore rooted at the store with a trailing '/', display url). Local paths become absolute."""
    if not isinstance(url, (str, os.PathLike)) or not str(url):
        raise CrossjaxError(f"store url {url!r} is not a path or URL: give a directory or e.g. gs://bucket/store.")
    url = os.fspath(url)
    if "://" in url:
        spec: Any = url if url.endswith("/") else url + "/"
        shown = url.rstrip("/")
    else:
        shown = os.path.abspath(url)
        spec = {"driver": "file", "path": shown + "/"}
    try:
        kv = ts.KvStore.open(spec, context=_CONTEXT).result()
    except ValueError as e:
        raise CrossjaxError(f"cannot open store location {url!r} ({e}): give a local path or a kvstore URL.") from e
    return kv, shown


def _array_spec(kv: ts.KvStore, name: str, meta: StoreMeta | None) -> dict:
    spec: dict = {"driver": "zarr3", "kvstore": (kv / f"{name}/").spec().to_json()}
    # Store chunks even when they equal the fill value, so every finished unit is a file on disk.
    spec["store_data_equal_to_fill_value"] = True
    if meta is None:
        return spec
    codecs = [{"name": "bytes", "configuration": {"endian": "little"}},
              {"name": "zstd", "configuration": {"level": _ZSTD_LEVEL, "checksum": False}}]
    if name == "activations":
        shape = [meta.num_rows, meta.num_snapshots, meta.d_model]
        chunk = [meta.block_rows, 1, meta.d_model]
        dims = ["row", "snapshot", "embed"]
        dtype = meta.dtype
    else:
        shape, chunk, dims, dtype = [meta.num_rows], [meta.block_rows], ["row"], "int32"
    spec["metadata"] = {
        "shape": shape,
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
        "codecs": codecs,
        "fill_value": 0,
        "dimension_names": dims,
    }
    return spec


def _marker(block: int, snapshot: int | None) -> str:
    return f"done/b{block:06d}_tokens" if snapshot is None else f"done/b{block:06d}_s{snapshot:03d}"


class ActivationStore:
    """An opened store. Use :meth:`create` or :meth:`open`, not the constructor."""

    def __init__(self, kv: ts.KvStore, url: str, meta: StoreMeta, arrays: Mapping[str, ts.TensorStore]):
        self._kv = kv
        self.url = url
        self.meta = meta
        self._acts = arrays["activations"]
        self._tokens = {n: arrays[n] for n in _TOKEN_ARRAYS}
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
        kv, shown = _open_kvstore(url)
        existing = cls._read_meta(kv, shown)
        if existing is not None:
            cls._check_same(existing, meta, shown)
        else:
            foreign = [k.decode() for k in kv.list().result()
                       if not any(k.decode().startswith(p) for p in _LAYOUT_KEYS)]
            if foreign:
                raise CrossjaxError(
                    f"{shown} is not empty and holds no activation store (found {foreign[:5]}): "
                    "choose an empty or new location for store.path."
                )
        arrays = {}
        futures = {n: ts.open(_array_spec(kv, n, meta), create=True, open=True, context=_CONTEXT)
                   for n in ("activations",) + _TOKEN_ARRAYS}
        for n, fut in futures.items():
            try:
                arrays[n] = fut.result()
            except ValueError as e:
                raise StoreMismatchError(
                    f"{shown}/{n} exists with another layout ({e}): use another store.path or delete the old store."
                ) from e
        if existing is None:
            # meta.json goes last and only if still absent: it marks a finished skeleton, and of two processes
            # racing to create, the loser compares its meta with the winner's.
            no_value = kv.read("meta.json").result().stamp.generation
            stamp = kv.write("meta.json", meta.to_json(), if_equal=no_value).result()
            if not stamp.generation:
                cls._check_same(cls._read_meta(kv, shown), meta, shown)
        return cls(kv, shown, meta, arrays)

    @classmethod
    def open(cls, url: str) -> ActivationStore:
        """The store at ``url``; NotAStoreError if there is none."""
        kv, shown = _open_kvstore(url)
        meta = cls._read_meta(kv, shown)
        if meta is None:
            raise NotAStoreError(
                f"{shown} holds no activation store (no meta.json): check store.path, or write the store first "
                "(python -m crossjax.activations, or the planted generator)."
            )
        arrays = {}
        for n in ("activations",) + _TOKEN_ARRAYS:
            try:
                arrays[n] = ts.open(_array_spec(kv, n, None), open=True, context=_CONTEXT).result()
            except ValueError as e:
                raise NotAStoreError(f"{shown}/{n} is missing or unreadable ({e}): the store is damaged; delete it and write it again.") from e
        acts = arrays["activations"]
        want = (meta.num_rows, meta.num_snapshots, meta.d_model)
        if tuple(acts.shape) != want or acts.dtype.numpy_dtype != DTYPES[meta.dtype]:
            raise NotAStoreError(
                f"{shown}/activations is {tuple(acts.shape)} {acts.dtype} but meta.json says {want} {meta.dtype}: "
                "the store is damaged; delete it and write it again."
            )
        return cls(kv, shown, meta, arrays)

    @staticmethod
    def _read_meta(kv: ts.KvStore, shown: str) -> StoreMeta | None:
        r = kv.read("meta.json").result()
        if r.state != "value":
            return None
        return StoreMeta.from_json(r.value, where=f"{shown}/meta.json")

    @staticmethod
    def _check_same(existing: StoreMeta, meta: StoreMeta, shown: str) -> None:
        diff = _meta_differences(existing, meta)
        if diff:
            raise StoreMismatchError(
                f"a different store already exists at {shown} ({'; '.join(diff)}): use another store.path, "
                "or delete the old store to rebuild it."
            )

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

    def snapshot_index(self, snapshot: int | str) -> int:
        """Index of a snapshot given by index or name."""
        if isinstance(snapshot, str):
            if snapshot not in self.meta.snapshots:
                raise CrossjaxError(f"snapshot {snapshot!r} is not in this store: it holds {list(self.meta.snapshots)}.")
            return self.meta.snapshots.index(snapshot)
        if isinstance(snapshot, bool) or not isinstance(snapshot, (int, np.integer)) or not 0 <= snapshot < self.meta.num_snapshots:
            raise CrossjaxError(f"snapshot {snapshot!r} is out of range: give an index in [0, {self.meta.num_snapshots}) or a name.")
        return int(snapshot)

    def _check_block(self, block: int) -> None:
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or not 0 <= block < self.meta.num_blocks:
            raise CrossjaxError(f"block {block!r} is out of range: this store has blocks 0..{self.meta.num_blocks - 1}.")

    # ---- writing ---------------------------------------------------------------------------------------

    def write_block(self, block: int, snapshot: int | str, acts: Any, *, overwrite: bool = False) -> None:
        """Write one unit: ``acts [R_b, D]`` are rows ``block_range(block)`` of ``snapshot``.

        Shape and finiteness are checked before anything is written; the done marker follows the data.
        """
        s = self.snapshot_index(snapshot)
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
        for name, v in zip(_TOKEN_ARRAYS, (token_ids, context_ids, positions)):
            a = np.asarray(v)
            if a.shape != (stop - start,):
                raise CrossjaxError(f"block {block}: {name} has shape {a.shape}, expected ({stop - start},) (rows of this block).")
            if not np.issubdtype(a.dtype, np.integer):
                raise CrossjaxError(f"block {block}: {name} has dtype {a.dtype}; give integers.")
            if a.size and (a.min() < _INT32.min or a.max() > _INT32.max):
                raise CrossjaxError(f"block {block}: {name} has values outside int32; they must fit in int32.")
            arrays[name] = a.astype(np.int32)
        self._begin_unit(block, None, overwrite)
        futures = [self._tokens[n][start:stop].write(arrays[n]) for n in _TOKEN_ARRAYS]
        for f in futures:
            f.result()
        self._mark(block, None)

    def _begin_unit(self, block: int, snapshot: int | None, overwrite: bool) -> None:
        key = _marker(block, snapshot)
        if self._kv.read(key).result().state == "value":
            what = "tokens" if snapshot is None else f"snapshot {snapshot} ({self.meta.snapshots[snapshot]})"
            if not overwrite:
                raise UnitDoneError(f"block {block} {what} is already written: pass overwrite=True to replace it.")
            # Unmark first, so that a crash during the rewrite leaves the unit to be redone.
            self._kv.write(key, None).result()
            self._complete = False

    def _mark(self, block: int, snapshot: int | None) -> None:
        self._kv.write(_marker(block, snapshot), b"").result()

    # ---- progress --------------------------------------------------------------------------------------

    def is_done(self, block: int, snapshot: int | str | None = None) -> bool:
        """Whether a unit is finished; ``snapshot=None`` asks about the block's tokens."""
        self._check_block(block)
        s = None if snapshot is None else self.snapshot_index(snapshot)
        return self._kv.read(_marker(block, s)).result().state == "value"

    def _done_keys(self) -> set[str]:
        return {k.decode() for k in (self._kv / "done/").list().result()}

    def missing_units(self) -> list[tuple[int, int | None]]:
        """Units without a done marker, block by block: ``(block, None)`` is the tokens unit."""
        return self._missing_from(self._done_keys())

    def _missing_from(self, done: set[str]) -> list[tuple[int, int | None]]:
        out = []
        for b in range(self.meta.num_blocks):
            for s in (None, *range(self.meta.num_snapshots)):
                if _marker(b, s)[len("done/"):] not in done:
                    out.append((b, s))
        return out

    def is_complete(self) -> bool:
        if not self._complete:
            self._complete = not self.missing_units()
        return self._complete

    def _require_done(self, blocks: Iterable[int], tokens: bool) -> None:
        if self._complete:
            return
        done = self._done_keys()
        if len(done) >= self.meta.num_blocks * (self.meta.num_snapshots + 1) and not self._missing_from(done):
            self._complete = True
            return
        if not done:
            raise IncompleteStoreError(
                f"{self.url} is empty: no unit has been written yet. Generate the activations first "
                "(python -m crossjax.activations, or the planted generator)."
            )
        missing = []
        for b in blocks:
            units = [None] if tokens else range(self.meta.num_snapshots)
            missing += [(b, s) for s in units if _marker(b, s)[len("done/"):] not in done]
        if missing:
            raise IncompleteStoreError(
                f"{self.url}: rows requested from {len(missing)} unfinished unit(s) (block, snapshot) such as "
                f"{missing[:4]}: finish writing the store (rerun the generator; it resumes) before reading them."
            )

    # ---- reading ---------------------------------------------------------------------------------------

    def _check_rows(self, start: int, stop: int) -> None:
        if not (0 <= start < stop <= self.meta.num_rows):
            raise CrossjaxError(f"rows [{start}, {stop}) are not a non-empty range inside [0, {self.meta.num_rows}).")

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of every snapshot: ``[n, S, D]`` in the storage dtype."""
        self._check_rows(start, stop)
        r = self.meta.block_rows
        self._require_done(range(start // r, (stop - 1) // r + 1), tokens=False)
        return self._acts[start:stop].read().result()

    def read_blocks(self, blocks: Sequence[int]) -> np.ndarray:
        """The rows of ``blocks`` in the given order: ``[sum R_b, S, D]``. All reads are issued before any wait."""
        blocks = [int(b) for b in blocks]
        if not blocks:
            raise CrossjaxError("read_blocks got no blocks: pass at least one block index.")
        ranges = [self.block_range(b) for b in blocks]
        self._require_done(blocks, tokens=False)
        futures = [self._acts[a:b].read() for a, b in ranges]
        out = np.empty((sum(b - a for a, b in ranges), self.meta.num_snapshots, self.meta.d_model), DTYPES[self.meta.dtype])
        pos = 0
        for (a, b), fut in zip(ranges, futures):
            out[pos : pos + b - a] = fut.result()
            pos += b - a
        return out

    def read_tokens(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """``{token_ids, context_ids, positions}`` of rows [start, stop), each int32 ``[n]``."""
        self._check_rows(start, stop)
        r = self.meta.block_rows
        self._require_done(range(start // r, (stop - 1) // r + 1), tokens=True)
        futures = {n: self._tokens[n][start:stop].read() for n in _TOKEN_ARRAYS}
        return {n: f.result() for n, f in futures.items()}

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
                d = json.loads(r.value)
                if list(d.get("snapshots", [])) != list(self.meta.snapshots):
                    raise CrossjaxError(f"{self.url}/scales.json is for snapshots {d.get('snapshots')}: delete it and set the scales again.")
                self._scales = np.asarray(d["scales"], np.float32)
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
