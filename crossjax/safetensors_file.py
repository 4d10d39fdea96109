"""A safetensors file checked before it is trusted: its header against the file's size, tensor by tensor.

A safetensors file is an 8-byte little-endian header length n, n bytes of JSON (tensor name -> dtype, shape and
byte range of its data), then the data. `read_header` checks every entry against the bytes that are really there,
so a truncated file or a damaged header is reported by file name (DamagedFileError), never as a bare
SafetensorError, zip or numpy error, and never read as wrong numbers. Bit flips inside the data are not visible
here: that is what the hashes recorded beside the weights are for.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from crossjax.errors import CrossjaxError

# safetensors dtype code -> (numpy dtype name, bytes per element)
DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
          "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
          "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1), "BOOL": ("bool", 1)}
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


class DamagedFileError(CrossjaxError):
    """A file that is missing pieces or is not what its name says; `problem` names what is wrong with `path`."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path} {problem}; {fix}")


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in the file (absolute offsets) and what they hold."""
    dtype: str                # numpy dtype name, e.g. "float32", "bfloat16"
    shape: tuple[int, ...]
    start: int
    stop: int


def read_header(path: str | os.PathLike, *, fix: str) -> dict[str, TensorEntry]:
    """name -> TensorEntry of a safetensors file, every entry checked against the file; DamagedFileError (with
    `fix` as the remedy) when the file is truncated, its header is not safetensors, or a dtype is unknown."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        first = fh.read(8)
        if len(first) < 8:
            raise DamagedFileError(path, f"is truncated ({size} bytes: not even a safetensors header)", fix)
        n = struct.unpack("<Q", first)[0]
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise DamagedFileError(path, f"is truncated or not safetensors (its first bytes announce a header of "
                                         f"{n} bytes; the file has {size})", fix)
        raw = fh.read(n)
    try:
        entries = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedFileError(path, f"has a damaged header (not JSON: {e})", fix) from None
    if not isinstance(entries, dict):
        raise DamagedFileError(path, "has a damaged header (not a JSON object)", fix)
    out: dict[str, TensorEntry] = {}
    for name, e in entries.items():
        if name == "__metadata__":
            continue
        out[name] = _entry(path, name, e, 8 + n, fix)
    data_bytes = size - 8 - n
    covered = 0
    for name, e in sorted(out.items(), key=lambda kv: kv[1].start):
        if e.start - 8 - n != covered:
            raise DamagedFileError(path, f"has a damaged header (tensor {name} does not start where the previous "
                                         "one ends)", fix)
        covered = e.stop - 8 - n
    if covered > data_bytes:
        raise DamagedFileError(path, f"is truncated ({size} bytes; its header describes {8 + n + covered})", fix)
    if covered < data_bytes:
        raise DamagedFileError(path, f"has {data_bytes - covered} bytes after its last tensor (not a safetensors "
                                     "file as written)", fix)
    return out


def _entry(path: Path, name: str, e, data_start: int, fix: str) -> TensorEntry:
    try:
        code, shape, (begin, end) = e["dtype"], [int(d) for d in e["shape"]], e["data_offsets"]
        begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError):
        raise DamagedFileError(path, f"has a damaged header (entry {name!r} is {e!r})", fix) from None
    if code not in DTYPES:
        raise DamagedFileError(path, f"holds tensor {name} of dtype {code}, which crossjax does not read", fix)
    dtype, itemsize = DTYPES[code]
    if min(shape, default=0) < 0 or begin < 0 or end - begin != math.prod(shape) * itemsize:
        raise DamagedFileError(path, f"has a damaged header (tensor {name}: {code} {shape} in bytes "
                                     f"[{begin}, {end}))", fix)
    return TensorEntry(dtype, tuple(shape), data_start + begin, data_start + end)


def read_tensors(path: str | os.PathLike, *, fix: str) -> dict[str, np.ndarray]:
    """Every tensor of a checked safetensors file as numpy arrays in their stored dtype."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    read_header(path, fix=fix)
    try:
        return load_file(os.fspath(path))
    except SafetensorError as e:  # what the header check cannot see
        raise DamagedFileError(path, f"cannot be read ({e})", fix) from None


def stream(fh, entry: TensorEntry, chunk_bytes: int = 1 << 23):
    """The stored bytes of one tensor from an open file, in chunks (memory: one chunk)."""
    fh.seek(entry.start)
    left = entry.stop - entry.start
    while left:
        piece = fh.read(min(chunk_bytes, left))
        if not piece:
            raise DamagedFileError(fh.name, "became shorter while it was read",
                                   "another process is writing it: run again once that one has finished")
        left -= len(piece)
        yield piece
