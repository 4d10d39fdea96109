"""Tokenized documents in a shared place: each process tokenizes its share once, every process reads all back.

Layout of a cache (``<cache_dir>/tokens-<key>/``; ``cache_dir`` a directory or any kvstore URL tensorstore
opens, e.g. ``gs://``; the key a hash of everything the tokens depend on: source, split, field, seed, packing,
context length, tokenizer, the source's files):

- ``SETTINGS.json``: what the key was made of, for a person reading the directory; ``UNITS.json``: the source's
  unit count when the cache was made (a source whose shards changed is refused, not mixed).
- ``unit-<j>/part-<start>-<docs>-<valid>.npz``: the tokens of documents ``[start, start + docs)`` of unit j
  (:mod:`crossjax.document_stream`), as each document is kept (without packing only its first
  ``context_len - 1`` tokens), and their document ids; ``valid`` is how many stored rows they give. Written
  whole (a file by rename, an object by one put), so a part that exists is complete. The parts of a unit are
  the recorded position: a run that was stopped continues each unit after its last part and reads no finished
  unit again; a run whose tokens are all there does not open the source at all.
- ``unit-<j>/END-<docs>``: the unit's documents are all tokenized.

Sharding: process p of P tokenizes units j with ``j % P == p``, in order, and stops as soon as the tokens known
to lie before its position (its own and the other processes' parts of earlier units) give ``num_tokens`` rows:
no unit the contexts need is skipped, and each process over-reads by at most about one unit per other process.
Contexts are then assembled from the parts in unit order, the same on every process and for every P.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from typing import Callable, Iterator, Sequence

import numpy as np

from crossjax import console
from crossjax.errors import CrossjaxError

_PART = re.compile(r"part-(\d+)-(\d+)-(\d+)\.npz$")
_END = re.compile(r"END-(\d+)$")
POLL_S = 1.0


class TokenCache:
    """The parts of one tokenization (one key) under a location every process reaches: a directory (a shared
    disk on several hosts) or a kvstore URL such as ``gs://bucket/run/store.tokens``."""

    def __init__(self, cache_dir: str | os.PathLike, settings: dict):
        from crossjax.store_format import open_kvstore

        blob = json.dumps(settings, sort_keys=True, default=str)
        self.key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        root, shown = open_kvstore(os.fspath(cache_dir))
        self.kv, self.dir = root / f"tokens-{self.key}/", f"{shown}/tokens-{self.key}"
        if self.kv.read("SETTINGS.json").result().state != "value":
            self.kv.write("SETTINGS.json", json.dumps(settings, indent=1, sort_keys=True, default=str)).result()
        self._finished: dict[int, int] = {}  # unit -> valid rows, for units seen finished (they never change)
        self._partial: dict[int, int] = {}  # unit -> valid rows of its parts at the last listing
        self._scanned = False
        self._num_units: int | None = None

    @staticmethod
    def _unit(j: int) -> str:
        return f"unit-{j:06d}/"

    def parts(self, j: int) -> tuple[list[tuple[int, int, int, str]], int | None]:
        """(contiguous parts from document 0: (start, docs, valid, key), END's document count or None)."""
        names = [self._unit(j) + k.decode() for k in (self.kv / self._unit(j)).list().result()]
        return self._parse(names).get(j, ([], None))

    def scan(self) -> dict[int, tuple[list[tuple[int, int, int, str]], int | None]]:
        """``parts`` of every unit in the cache, from one listing."""
        return self._parse([k.decode() for k in self.kv.list().result()])

    @staticmethod
    def _parse(keys: Sequence[str]) -> dict[int, tuple[list[tuple[int, int, int, str]], int | None]]:
        found: dict[int, dict[int, tuple]] = {}
        ends: dict[int, int] = {}
        for key in keys:
            unit, _, name = key.partition("/")
            if not unit.startswith("unit-"):
                continue
            j = int(unit[5:])
            if m := _PART.match(name):
                found.setdefault(j, {})[int(m[1])] = (int(m[1]), int(m[2]), int(m[3]), key)
            elif m := _END.match(name):
                ends[j] = int(m[1])
        out = {}
        for j in set(found) | set(ends):
            parts, pos, by_start = [], 0, found.get(j, {})
            while pos in by_start and by_start[pos][1] > 0:
                parts.append(by_start[pos])
                pos += by_start[pos][1]
            out[j] = (parts, ends[j] if ends.get(j) == pos else None)
        return out

    def rows_at_least_before(self, j: int) -> int:
        """Rows the parts of units 0..j-1 already written give: the prefix before unit j holds at least these.
        One listing of the cache the first time, then one of each unit not yet seen finished."""
        if self._scanned:
            listed = {u: self.parts(u) for u in range(j) if u not in self._finished}
        else:
            listed, self._scanned = self.scan(), True
        for u, (parts, end) in listed.items():
            (self._finished if end is not None else self._partial)[u] = sum(p[2] for p in parts)
        return sum(self._finished.get(u, self._partial.get(u, 0)) for u in range(j))

    def num_units(self, units) -> int:
        """The source's unit count, checked against (or recorded as) the one this cache was made with: a source
        whose shards changed would otherwise mix two orders."""
        if self._num_units is None:
            n, r = units.num_units, self.kv.read("UNITS.json").result()
            if r.state == "value" and json.loads(r.value)["num_units"] != n:
                raise CrossjaxError(
                    f"the source now has {n} units (data files or blocks of documents) but the token cache "
                    f"{self.dir} was made when it had {json.loads(r.value)['num_units']}: its tokens follow another "
                    f"order. Delete {self.dir} to tokenize the source as it is now, or restore the old source.")
            if r.state != "value":
                self.kv.write("UNITS.json", json.dumps({"num_units": n})).result()
            self._num_units = n
        return self._num_units

    def write_part(self, j: int, start: int, doc_ids: Sequence[int], kept: Sequence[np.ndarray], valid: int):
        """One object per part, written whole (a file by rename, an object store by one put)."""
        lengths = np.asarray([len(k) for k in kept], np.int64)
        flat = np.concatenate(kept).astype(np.int32) if len(kept) else np.zeros(0, np.int32)
        buf = io.BytesIO()
        np.savez(buf, tokens=flat, lengths=lengths, doc_ids=np.asarray(doc_ids, np.int64))
        self.kv.write(f"{self._unit(j)}part-{start:09d}-{len(kept)}-{valid}.npz", buf.getvalue()).result()

    def mark_end(self, j: int, docs: int):
        self.kv.write(f"{self._unit(j)}END-{docs}", b"").result()

    def read_part(self, key: str) -> Iterator[tuple[int, np.ndarray]]:
        """(document id, kept tokens) of one part."""
        where = f"{self.dir}/{key}"
        try:
            with np.load(io.BytesIO(self.kv.read(key).result().value)) as z:
                flat, lengths, doc_ids = z["tokens"], z["lengths"], z["doc_ids"]
        except Exception as e:  # torn or altered object: it is derived data, made again from the source
            raise CrossjaxError(f"the token cache file {where} is unreadable ({type(e).__name__}: {e}); delete it: "
                                f"the next run tokenizes those documents again.") from e
        if len(lengths) != len(doc_ids) or int(lengths.sum()) != len(flat):
            raise CrossjaxError(f"the token cache file {where} is inconsistent (lengths do not match its tokens); "
                                f"delete it: the next run tokenizes those documents again.")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for i, doc in enumerate(doc_ids.tolist()):
            yield doc, flat[offsets[i]:offsets[i + 1]]


def cache_beside(store_url: str) -> str:
    """Where the activation stage keeps the tokens of the store at ``store_url``: ``<store>.tokens`` beside it
    (not inside: the store's location holds only the store)."""
    return os.fspath(store_url).rstrip("/") + ".tokens"


def tokenize_share(units, cache: TokenCache, tokenize: Callable[[list[str]], list[np.ndarray]],
                   count_rows: Callable[[list[np.ndarray]], int], *, num_rows: int, process_index: int,
                   process_count: int, progress: bool = True) -> int:
    """Tokenizes this process's units into ``cache`` until the rows before its position reach ``num_rows``.

    tokenize: texts -> kept tokens per text; count_rows: kept tokens -> the stored rows they give.
    Returns the number of documents read from the source (resumed units skip their finished parts); the source
    is not opened when the cache already holds this process's share."""
    read, j = 0, int(process_index)
    bar = console.progress("tokens", int(num_rows), unit="tok", unit_scale=True, enabled=progress)
    while True:
        before = cache.rows_at_least_before(j)
        parts, end = cache.parts(j)
        pos, own = sum(p[1] for p in parts), sum(p[2] for p in parts)
        bar.n = min(before + own, num_rows)
        bar.refresh()
        if before + own >= num_rows:
            break
        if end is None:
            if j >= cache.num_units(units):
                break
            for part in units.read(j, pos):
                kept = tokenize([text for _, text in part])
                rows = count_rows(kept)
                cache.write_part(j, pos, [doc for doc, _ in part], kept, rows)
                pos, own, read = pos + len(part), own + rows, read + len(part)
                before = cache.rows_at_least_before(j)
                bar.n = min(before + own, num_rows)
                bar.refresh()
                if before + own >= num_rows:
                    break
            else:
                cache.mark_end(j, pos)
            if before + own >= num_rows:
                break
        j += int(process_count)
    bar.close()
    return read


def cached_documents(units, cache: TokenCache, *, process_count: int,
                     wait_s: float) -> Iterator[tuple[int, np.ndarray]]:
    """(document id, kept tokens) of every unit in order, from the cache; waits up to ``wait_s`` seconds (for
    each unit) for parts other processes are still writing. The consumer stops pulling once its contexts are
    complete."""
    listing, j = cache.scan(), -1
    while True:
        j += 1
        parts, end = listing.get(j, ([], None))
        if not parts and end is None and j >= cache.num_units(units):
            return
        pos, deadline, said = 0, time.monotonic() + wait_s, False
        while True:
            for start, docs, _, path in parts:
                if start + docs > pos:
                    yield from cache.read_part(path)
                    pos = start + docs
            if end is not None:
                break
            if time.monotonic() >= deadline:
                raise CrossjaxError(
                    f"the tokens of unit {j} (documents {pos} on, tokenized by process {j % process_count} of "
                    f"{process_count}) are missing from {cache.dir}; run the same command on every process (each "
                    f"tokenizes its share, a stopped one continues where it stopped).")
            if not said:
                console.say("tokens", f"waiting for process {j % process_count} to tokenize unit {j} "
                                      f"into {cache.dir}")
                said = True
            time.sleep(POLL_S)
            parts, end = cache.parts(j)
