"""The activation store's format: what its metadata says and where each piece lies under the store URL.

Layout under the store URL (a local path, or any tensorstore kvstore URL such as ``gs://bucket/x``,
``file:///abs/path`` or ``memory://name``):

- ``meta.json``: the :class:`StoreMeta` as JSON.
- ``activations/``: zarr3 ``[N, S, D]`` float16/bfloat16, chunk ``[R, 1, D]``: one (block, snapshot) unit is
  one chunk file (``activations/c/{block}/{snapshot}/0``), so writers of disjoint units never touch the same file.
- ``token_ids/``, ``context_ids/``, ``positions/``: zarr3 int32 ``[N]``, chunk ``[R]`` (``<name>/c/{block}``).
- ``done/b{block:06d}_s{snapshot:03d}`` and ``done/b{block:06d}_tokens``: empty markers, each written only
  after its unit's data is durable. A unit without a marker is rewritten on resume.
- ``scales.json``: per-snapshot normalisation scales, once computed.

Crash safety rests on the kvstore writing each key atomically. The file driver writes a value to
``<key>.__lock``, fsyncs it and renames it over ``<key>`` (tensorstore/kvstore/file/file_key_value_store.cc),
so a process killed mid-way leaves either the old file or the new one, never a torn chunk; object stores
(gs://) replace whole objects. Since a unit's bytes depend only on its inputs, rewriting an unmarked unit
gives the bytes an uninterrupted run would have written.

Integrity on read: every chunk is stored, even one equal to the fill value, and arrays are opened with
``fill_missing_data_reads`` off, so a chunk file missing under a done marker is an error, never zeros. Chunks
carry zstd's frame checksum of their decoded bytes, so changed bytes are found on
read; stores written before the checksum was added have none and open and read as before.

:class:`crossjax.store.ActivationStore` reads and writes this format; nothing else touches it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts

from crossjax import paths
from crossjax.errors import CrossjaxError

DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
TOKEN_ARRAYS = ("token_ids", "context_ids", "positions")
LAYOUT_KEYS = ("meta.json", "scales.json", "activations/", "done/") + tuple(f"{n}/" for n in TOKEN_ARRAYS)
_ZSTD_LEVEL = 3
# The codec chain of new arrays; existing arrays keep theirs (those written before checksums have none). zstd's
# own frame checksum (xxhash64 of the decoded bytes) finds changed bytes as surely as a crc32c codec over the
# compressed chunk, at a fraction of its read cost (measured: +0-5% against +15-20% per block read).
CODECS = ({"name": "bytes", "configuration": {"endian": "little"}},
          {"name": "zstd", "configuration": {"level": _ZSTD_LEVEL, "checksum": True}})

# One context for the whole process: `memory://` stores live in a context, so every store opened in this
# process must share it to see the same data. Its cache pool is empty (no caching), so a reader always sees
# what other processes have written.
CONTEXT = ts.Context()


class NotAStoreError(CrossjaxError):
    """The URL holds no activation store (no meta.json)."""


class StoreMismatchError(CrossjaxError):
    """A store already exists at the URL with other metadata."""


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


def check_same_meta(existing: StoreMeta, meta: StoreMeta, shown: str) -> None:
    """StoreMismatchError listing every field in which the store at ``shown`` differs from the requested meta."""
    diff = [f"{f.name}: stored {getattr(existing, f.name)!r}, requested {getattr(meta, f.name)!r}"
            for f in dataclasses.fields(StoreMeta) if getattr(existing, f.name) != getattr(meta, f.name)]
    if diff:
        raise StoreMismatchError(
            f"a different store already exists at {shown} ({'; '.join(diff)}): use another store.path, "
            "or delete the old store to rebuild it."
        )


def read_meta(kv: ts.KvStore, shown: str) -> StoreMeta | None:
    """The store's meta.json, or None where there is none."""
    try:
        r = kv.read("meta.json").result()
    except ValueError as e:  # e.g. no permission, or an object store that cannot be reached
        raise CrossjaxError(f"cannot read the store location {shown} ({e}): store.path must name a directory "
                            "(or a kvstore URL) that this process can read and write.") from e
    if r.state != "value":
        return None
    return StoreMeta.from_json(r.value, where=f"{shown}/meta.json")


# ----------------------------------------------------------------------------------------------------------
# Keys and arrays


def open_kvstore(url: str) -> tuple[ts.KvStore, str]:
    """(kvstore rooted at the store with a trailing '/', display url). Local paths become absolute."""
    if not isinstance(url, (str, os.PathLike)) or not str(url):
        raise CrossjaxError(f"store url {url!r} is not a path or URL: give a directory or e.g. gs://bucket/store.")
    url = os.fspath(url)
    if "://" in url:
        spec: Any = url if url.endswith("/") else url + "/"
        shown = url.rstrip("/")
    else:
        shown = os.path.abspath(paths.require_local(url, "store.path"))  # gs:/b/x (a lost '//') is refused
        spec = {"driver": "file", "path": shown + "/"}
        existing = shown
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise CrossjaxError(f"store location {shown} cannot be a store directory: {existing} is a file. "
                                "Point store.path at a directory, or at a location that does not exist yet.")
    try:
        kv = ts.KvStore.open(spec, context=CONTEXT).result()
    except ValueError as e:
        raise CrossjaxError(f"cannot open store location {url!r} ({e}): give a local path or a kvstore URL.") from e
    return kv, shown


def _layout(name: str, meta: StoreMeta) -> tuple[list[int], str, list[int], list[str]]:
    """(shape, data type, chunk shape, dimension names) of array ``name`` in a store of ``meta``."""
    if name == "activations":
        return ([meta.num_rows, meta.num_snapshots, meta.d_model], meta.dtype, [meta.block_rows, 1, meta.d_model],
                ["row", "snapshot", "embed"])
    return [meta.num_rows], "int32", [meta.block_rows], ["row"]


def array_spec(kv: ts.KvStore, name: str, meta: StoreMeta | None) -> dict:
    """The tensorstore spec of array ``name``; with ``meta`` it also creates the array with the store's layout."""
    spec: dict = {"driver": "zarr3", "kvstore": (kv / f"{name}/").spec().to_json()}
    # Store chunks even when they equal the fill value, so every finished unit is a file on disk, and refuse
    # to read a missing one as the fill value: under a done marker it is damage.
    spec["store_data_equal_to_fill_value"] = True
    spec["fill_missing_data_reads"] = False
    if meta is None:
        return spec
    shape, dtype, chunk, dims = _layout(name, meta)
    spec["metadata"] = {
        "shape": shape,
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
        "codecs": [dict(c) for c in CODECS],
        "fill_value": 0,
        "dimension_names": dims,
    }
    return spec


def layout_difference(array: ts.TensorStore, name: str, meta: StoreMeta) -> str | None:
    """How an open array's shape, data type or chunk shape differs from the layout of ``meta``, or None.

    The codec chain is not compared: arrays written before checksums were added have the same layout.
    """
    shape, dtype, chunk, _ = _layout(name, meta)
    have = array.spec().to_json().get("metadata", {})
    got = (have.get("shape"), have.get("data_type"), have.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape"))
    if got == (shape, dtype, chunk):
        return None
    return f"shape {got[0]}, {got[1]}, chunks {got[2]}; this store's meta.json needs shape {shape}, {dtype}, chunks {chunk}"


def chunk_key(name: str, block: int, snapshot: int | None) -> str:
    """The key of the chunk file holding ``block`` of array ``name`` (and of ``snapshot``, for activations)."""
    return f"{name}/c/{block}" if snapshot is None else f"{name}/c/{block}/{snapshot}/0"


def open_array(kv: ts.KvStore, shown: str, name: str, meta: StoreMeta, *, create: bool = True) -> ts.TensorStore:
    """Array ``name`` of the store of ``meta``: created if absent (``create``), else the existing one if its layout
    is the store's, whatever its codecs (arrays written before checksums were added read as before)."""
    create_error = None
    if create:
        try:
            return ts.open(array_spec(kv, name, meta), create=True, open=True, context=CONTEXT).result()
        except ValueError as e:  # an array with other codecs or another layout, or an unwritable location
            create_error = e
    try:
        array = ts.open(array_spec(kv, name, None), open=True, context=CONTEXT).result()
    except ValueError as e:
        if create_error is not None:
            raise CrossjaxError(f"cannot create {shown}/{name} ({create_error}): check that the location is "
                                "writable and has free space.") from create_error
        raise NotAStoreError(f"{shown}/{name} is missing or unreadable ({e}): the store is damaged; delete it and "
                             "write it again.") from e
    problem = layout_difference(array, name, meta)
    if problem and create:
        raise StoreMismatchError(f"{shown}/{name} exists with another layout ({problem}): use another store.path, "
                                 "or delete the old store to rebuild it.")
    if problem:
        raise NotAStoreError(f"{shown}/{name} does not match meta.json ({problem}): the store is damaged; delete it "
                             "and write it again.")
    return array


def marker(block: int, snapshot: int | None) -> str:
    """The done-marker key of a unit; ``snapshot=None`` is the block's tokens."""
    return f"done/b{block:06d}_tokens" if snapshot is None else f"done/b{block:06d}_s{snapshot:03d}"
