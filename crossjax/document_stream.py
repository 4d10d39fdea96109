"""Documents in units: the order every token context is built in, split into pieces a process can take alone.

A source's documents are visited as a list of *units*, each a list of *parts* (at most ``PART_DOCS`` documents).
The visiting order is the units in index order, each unit's documents in order; it depends only on the source and
the seed, never on how many processes read it, so any split of the units between processes gives the same
contexts (:mod:`crossjax.token_cache`).

- Random-access sources (offline, text, jsonl, a ``save_to_disk`` dataset): the documents in the seeded
  permutation ``np.random.default_rng(seed).permutation(N)`` (the order contexts have always used), cut into units
  of ``PART_DOCS`` documents of that order. A document's id is its source index.
- Streams (``hf_dataset`` through ``datasets.load_dataset(..., streaming=True)``; no random access): one unit per
  source shard (a data file of the dataset), the shards in the seeded permutation
  ``np.random.default_rng(seed).permutation(n_shards)``. Inside a shard the documents are read in stream order in
  windows of ``STREAM_WINDOW_DOCS`` and each window is shuffled by ``np.random.default_rng((seed, shard, window))``
  (one window is one part). A document's id is ``shard * DOC_ID_STRIDE + its row in the shard``. Only the shards
  that are reached are opened, and a shard is read only up to the window where the contexts are complete.

``units.read(unit, start)`` yields that unit's parts from document ``start`` (a part boundary) on: a stream
skips the first ``start`` documents of its shard (a data file can only be read from its start) and never reads
the shards before it again.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from crossjax.errors import CrossjaxError

PART_DOCS = 1024  # documents per part: the unit of resumption
STREAM_WINDOW_DOCS = PART_DOCS  # documents shuffled together inside a stream shard
DOC_ID_STRIDE = 2**32  # stream document id = shard * DOC_ID_STRIDE + row in the shard
_FETCH = 256  # random-access documents fetched per call

Part = list  # [(doc_id, text)]


def _fetch(documents, indices: np.ndarray) -> list[str]:
    if hasattr(documents, "fetch_many"):
        return documents.fetch_many(indices)
    return [documents[int(i)] for i in indices]


class SequenceUnits:
    """Units of a random-access sequence of texts in its seeded permutation."""

    def __init__(self, documents: Sequence[str], seed: int):
        self.documents = documents
        self.order = np.random.default_rng(seed).permutation(len(documents))
        self.num_units = -(-len(self.order) // PART_DOCS)

    def describe(self) -> dict:
        return dict(kind="sequence", num_documents=len(self.order), part_docs=PART_DOCS)

    def read(self, unit: int, start: int = 0) -> Iterator[Part]:
        idx = self.order[unit * PART_DOCS + start:(unit + 1) * PART_DOCS]
        part = []
        for lo in range(0, len(idx), _FETCH):
            chunk = idx[lo:lo + _FETCH]
            part.extend(zip(chunk.tolist(), _fetch(self.documents, chunk)))
        if part:
            yield part


class StreamUnits:
    """Units of a ``datasets.IterableDataset``: one per source shard, in the seeded shard order.

    The dataset is opened on first use (``num_units`` or ``read``): a run whose tokens are all in the token cache
    never reaches the dataset, so it also runs without network."""

    def __init__(self, open_dataset, text_field: str, seed: int, where: str):
        self._open, self._dataset = open_dataset, None
        self.text_field, self.seed, self.where = text_field, int(seed), where

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = self._open()
        return self._dataset

    @property
    def num_units(self) -> int:
        return int(self.dataset.n_shards)

    @property
    def num_shards(self) -> int:
        return self.num_units

    @property
    def shard_order(self) -> np.ndarray:
        return np.random.default_rng(self.seed).permutation(self.num_shards)

    def describe(self) -> dict:
        return dict(kind="stream", window_docs=STREAM_WINDOW_DOCS)

    def read(self, unit: int, start: int = 0) -> Iterator[Part]:
        if start % STREAM_WINDOW_DOCS:
            raise ValueError(f"start={start} is not a window boundary")
        shard = int(self.shard_order[unit])
        ds = self.dataset.shard(num_shards=self.num_shards, index=shard, contiguous=True)
        if start:
            ds = ds.skip(start)
        where = f"{self.where} shard {shard} of {self.num_shards}"
        row, window, records = start, [], iter(ds)
        while True:
            try:
                record = next(records, None)
            except Exception as e:  # a dropped connection, a damaged data file: say where, and how to go on
                raise CrossjaxError(
                    f"reading {where} failed at row {row} ({type(e).__name__}: {e}). The tokens written so far are "
                    f"kept: if the connection dropped, run the same command again (with a token cache it continues "
                    f"from there); if that data file is damaged, repair or download it again.") from e
            if record is None:
                break
            window.append((shard * DOC_ID_STRIDE + row, self._text(record, where, row)))
            row += 1
            if len(window) == STREAM_WINDOW_DOCS:
                yield self._shuffled(shard, window)
                window = []
        if window:
            yield self._shuffled(shard, window)

    def _text(self, record: dict, where: str, row: int) -> str:
        if self.text_field not in record:
            raise CrossjaxError(f"{where} row {row} has no field {self.text_field!r} (fields: {sorted(record)}); "
                                f"set --config.tokens.text_field to the field that holds the text.")
        value = record[self.text_field]
        if not isinstance(value, str):
            raise CrossjaxError(f"{where} row {row}: field {self.text_field!r} holds {type(value).__name__}, not "
                                f"text; set --config.tokens.text_field to a text field.")
        return value

    def _shuffled(self, shard: int, window: Part) -> Part:
        first_row = window[0][0] - shard * DOC_ID_STRIDE
        perm = np.random.default_rng((self.seed, shard, first_row // STREAM_WINDOW_DOCS)).permutation(len(window))
        return [window[i] for i in perm]


def open_stream(path: str, split: str, text_field: str, seed: int) -> StreamUnits:
    """``datasets.load_dataset(path, split=split, streaming=True)`` as units, opened on first use; every failure
    named with its fix."""
    return StreamUnits(lambda: _load_stream(path, split, text_field), text_field, seed,
                       f"dataset {path!r} split {split!r}")


def _load_stream(path: str, split: str, text_field: str):
    import datasets

    try:
        ds = datasets.load_dataset(path, split=split, streaming=True)
    except ConnectionError as e:
        raise CrossjaxError(
            f"the dataset {path!r} could not be reached ({e}). On a machine with network, download the files "
            f"you need (e.g. `hf download --repo-type dataset {path} --include 'train/chunk1/*' --local-dir DIR`, "
            f"read here as a stream) or save it with datasets' save_to_disk, then set --config.tokens.path=DIR."
        ) from e
    except ValueError as e:
        if "split" in str(e).lower():
            raise CrossjaxError(f"dataset {path!r} has no split {split!r} ({e}); set --config.tokens.split.") from e
        raise CrossjaxError(f"could not open dataset {path!r} as a stream ({e}); set --config.tokens.path to a "
                            f"dataset name, a directory of data files or a save_to_disk directory.") from e
    except FileNotFoundError as e:
        raise CrossjaxError(f"dataset {path!r} was not found ({e}); set --config.tokens.path to a dataset name, "
                            f"a directory of data files or a save_to_disk directory.") from e
    features = getattr(ds, "features", None)
    if features is not None and text_field not in features:
        raise CrossjaxError(f"dataset {path!r} has no field {text_field!r} (fields: {list(features)}); "
                            f"set --config.tokens.text_field to the field that holds the text.")
    return ds.select_columns([text_field]) if features is not None else ds
