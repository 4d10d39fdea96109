"""What a read of the activation store can find wrong in data already marked done, and how each is named.

A finished unit (one block of one snapshot, or one block's tokens) is one chunk file. Three faults are found on
read, never filled in silently: the chunk is missing (tensorstore is opened with ``fill_missing_data_reads``
off, so no fill value stands in for it), its bytes changed (the zstd frame checksum of stores written with checksums),
or it cannot be decoded (truncated or corrupt). Values that are NaN or Inf are found by one cheap vectorised
check per read. Each error names the store, block, snapshot (and row) and the repair: remove the unit's done
marker, so the command that wrote the store rewrites just that unit.

``scales.json`` is derived data: a damaged one is named with the fix of deleting it, so it is estimated again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import tensorstore as ts

from crossjax.errors import CrossjaxError
from crossjax.store_format import TOKEN_ARRAYS, StoreMeta, chunk_key, marker

_MAX_NAMED = 8  # damaged units or bad rows an error names one by one
_FINITE_CHUNK = 1 << 18  # elements per step of the finiteness scan: a temporary that stays in cache


class DamagedStoreError(CrossjaxError):
    """Data of a unit marked done is missing, changed, undecodable or not finite."""


# ----------------------------------------------------------------------------------------------------------
# Finiteness


def all_finite(x: np.ndarray) -> bool:
    """Whether every value of a float16/bfloat16/float32 array is finite.

    A value is NaN or Inf exactly when its magnitude bits are at least those of +Inf. Scanning the bits a
    cache-sized piece at a time costs a few ms per 100 MB, several times less than ``np.isfinite(x).all()``.
    """
    flat = x.reshape(-1)
    if flat.dtype.itemsize not in (2, 4):
        return bool(np.isfinite(flat).all())
    bits = flat.view(np.uint16 if flat.dtype.itemsize == 2 else np.uint32)
    inf = np.array(np.inf, flat.dtype).view(bits.dtype)
    magnitude = ~np.array(0, bits.dtype) >> 1  # all bits but the sign
    for a in range(0, len(bits), _FINITE_CHUNK):
        if np.bitwise_and(bits[a : a + _FINITE_CHUNK], magnitude).max() >= inf:
            return False
    return True


def non_finite_error(url: str, snapshots: Sequence[str], acts: np.ndarray, rows: np.ndarray, block_rows: int,
                     fill: str) -> DamagedStoreError:
    """The error for NaN/Inf in ``acts [n, S, D]``, whose row i is store row ``rows[i]``; only called on failure."""
    bad = ~np.isfinite(acts.astype(np.float32)).all(axis=2)  # [n, S]
    where_rows, where_snaps = np.nonzero(bad)
    found = [(int(rows[i]), int(s)) for i, s in zip(where_rows, where_snaps)]
    named = [f"row {r} (block {r // block_rows}, snapshot {snapshots[s]})" for r, s in found[:_MAX_NAMED]]
    more = f" and {len(found) - _MAX_NAMED} more" if len(found) > _MAX_NAMED else ""
    units = sorted({(r // block_rows, s) for r, s in found})
    markers = ", ".join(f"{url}/{marker(b, s)}" for b, s in units[:_MAX_NAMED])
    return DamagedStoreError(
        f"{url} holds NaN or Inf activations in {len(found)} (row, snapshot) pair(s): {', '.join(named)}{more}. "
        f"The data is bad, not the training settings. Rewrite the unit(s): delete the done marker(s) {markers}"
        f"{' ...' if len(units) > _MAX_NAMED else ''} and run {fill}; it rewrites only units without a marker "
        "(and refuses the rows again, naming them, if the model snapshot itself produces NaN/Inf)."
    )


# ----------------------------------------------------------------------------------------------------------
# Missing, changed or undecodable chunks


def read_problem(error: Exception) -> str | None:
    """What a failed chunk read says about the chunk's file, or None when the failure is not about the data."""
    text = str(error)
    if text.startswith("NOT_FOUND"):
        return "is missing"
    if text.startswith("DATA_LOSS") or "match checksum" in text or "digest mismatch" in text.lower():
        return "fails its checksum (its bytes changed on disk)"
    if text.startswith(("FAILED_PRECONDITION", "INVALID_ARGUMENT", "OUT_OF_RANGE")):
        return f"is truncated or corrupt ({text.split(' [tensorstore_spec', 1)[0]})"
    return None


def find_damage(url: str, meta: StoreMeta, arrays: Mapping[str, ts.TensorStore], blocks: Iterable[int],
                tokens: bool, fill: str) -> CrossjaxError | None:
    """After a failed read of ``blocks``: read each of their units alone (the tokens units if ``tokens``, else every
    snapshot's) and return the error naming the damaged ones, or None if none fails now."""
    damaged = []
    for b in blocks:
        a, z = b * meta.block_rows, min((b + 1) * meta.block_rows, meta.num_rows)
        units = ([(n, None, arrays[n][a:z]) for n in TOKEN_ARRAYS] if tokens
                 else [("activations", s, arrays["activations"][a:z, s : s + 1]) for s in range(meta.num_snapshots)])
        for name, s, view in units:
            try:
                view.read().result()
            except ValueError as e:
                problem = read_problem(e)
                if problem is None:
                    return unreadable_error(url, f"block {b}", e)
                damaged.append((b, s, name, problem))
    return damaged_error(url, meta.snapshots, damaged, fill) if damaged else None


def damaged_error(url: str, snapshots: Sequence[str], damaged: list[tuple[int, int | None, str, str]],
                  fill: str) -> DamagedStoreError:
    """The error for units marked done whose chunks failed: ``damaged`` holds (block, snapshot or None for the
    tokens, array name, problem from :func:`read_problem`)."""
    named = []
    for block, snapshot, name, problem in damaged[:_MAX_NAMED]:
        what = "tokens" if snapshot is None else f"snapshot {snapshots[snapshot]}"
        named.append(f"block {block} {what}: chunk {url}/{chunk_key(name, block, snapshot)} {problem}")
    more = f"; and {len(damaged) - _MAX_NAMED} more" if len(damaged) > _MAX_NAMED else ""
    units = sorted({(b, s) for b, s, _, _ in damaged}, key=lambda u: (u[0], -1 if u[1] is None else u[1]))
    markers = ", ".join(f"{url}/{marker(b, s)}" for b, s in units[:_MAX_NAMED])
    return DamagedStoreError(
        f"{url} is damaged: {len(units)} unit(s) marked done cannot be read ({'; '.join(named)}{more}). "
        f"Rewrite them: delete the done marker(s) {markers}{' ...' if len(units) > _MAX_NAMED else ''} "
        f"and run {fill}; it rewrites only units without a marker and keeps every other unit."
    )


def unreadable_error(url: str, what: str, error: Exception) -> CrossjaxError:
    """A read that failed for a reason other than the data (permissions, network)."""
    return CrossjaxError(f"cannot read {what} of {url} ({error}): check that the store is reachable and readable.")


# ----------------------------------------------------------------------------------------------------------
# scales.json


def parse_scales(data: bytes, where: str, snapshots: Sequence[str]) -> np.ndarray:
    """The per-snapshot scales ``[S]`` (float32) saved in scales.json; DamagedStoreError unless each is a finite
    positive number, one per snapshot of the store."""
    fix = ("scales.json is derived data: delete it and run the same command again, which estimates the scales "
           "anew from the store (data.scale_rows rows) and saves them.")
    try:
        d = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedStoreError(f"{where} is not valid JSON ({e}), e.g. truncated: {fix}") from e
    if not isinstance(d, dict) or not isinstance(d.get("scales"), list):
        raise DamagedStoreError(f"{where} has no list 'scales' (it holds {str(d)[:80]!r}): {fix}")
    if list(d.get("snapshots") or []) != list(snapshots):
        raise DamagedStoreError(f"{where} is for snapshots {d.get('snapshots')}, the store holds {list(snapshots)}: {fix}")
    values = d["scales"]
    if len(values) != len(snapshots):
        raise DamagedStoreError(f"{where} has {len(values)} scales for {len(snapshots)} snapshots: {fix}")
    bad = [f"{name}: {v!r}" for name, v in zip(snapshots, values)
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0]
    if bad:
        raise DamagedStoreError(f"{where} holds scales that are not finite positive numbers ({', '.join(bad)}): {fix}")
    with np.errstate(over="ignore"):
        scales = np.asarray(values, np.float32)
    if not np.all(np.isfinite(scales) & (scales > 0)):  # e.g. 1e300 or 1e-60, beyond float32
        raise DamagedStoreError(f"{where} holds scales {values} that float32 turns into {scales.tolist()}: {fix}")
    return scales
