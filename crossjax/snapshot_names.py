"""Snapshots named by the user: a name or a 0-based index into an ordered list of snapshot names.

One rule for every place that accepts a snapshot (the store, the loader's subset, data.snapshots, the analyses):
a string is looked up by name, an integer (not a bool) is an index in [0, S), anything else is an error that
lists the valid choices. No numpy or JAX here: configs use it before JAX starts.
"""
from __future__ import annotations

import operator
from typing import Sequence

from crossjax.errors import CrossjaxError


def index_of(snapshot, names: Sequence[str], *, where: str = "") -> int:
    """The index in `names` of a snapshot given by name or by 0-based index (numpy integers too)."""
    names = list(names)
    place = f" of {where}" if where else ""
    if isinstance(snapshot, str):
        if snapshot not in names:
            raise CrossjaxError(f"snapshot {snapshot!r} is not one of the snapshots{place}: {names}")
        return names.index(snapshot)
    try:
        i = None if isinstance(snapshot, bool) else operator.index(snapshot)
    except TypeError:
        i = None
    if i is None or not 0 <= i < len(names):
        raise CrossjaxError(f"snapshot {snapshot!r} is out of range: give a name from {names} or an index in "
                            f"[0, {len(names)}){place}")
    return i


def select(spec: str, names: Sequence[str]) -> tuple[tuple[str, ...], list[int] | None]:
    """A comma-separated selection (data.snapshots, --snapshots) resolved against `names`.

    Each entry is a name in `names`, else a 0-based index (negative counts from the end); "" selects all.
    Returns (selected names, their indices), or (names, None) when the selection is all snapshots in order
    (nothing to select).
    """
    names = tuple(names)
    entries = [e.strip() for e in str(spec).split(",") if e.strip()]
    if not entries:
        return names, None
    indices, unknown = [], []
    for e in entries:
        if e in names:
            indices.append(names.index(e))
        elif e.lstrip("-").isdigit() and -len(names) <= int(e) < len(names):
            indices.append(int(e) % len(names))
        else:
            unknown.append(e)
    if unknown or len(set(indices)) != len(indices):
        raise CrossjaxError(
            f"data.snapshots={spec!r} must list distinct snapshots of the store, by name or 0-based index, "
            f"from {list(names)}" + (f"; unknown: {unknown}" if unknown else "; some snapshot is listed twice"))
    if indices == list(range(len(names))):
        return names, None
    return tuple(names[i] for i in indices), indices
