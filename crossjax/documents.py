"""Document sources: the texts that become token contexts, read from the ``tokens`` config section.

Sources (``tokens.source``):

- ``offline``: ``crossjax.suite.corpus.load_documents(split)``, the corpus shipped with the offline suite.
- ``text``: ``path`` is a file, a glob or a directory (all ``*.txt`` below it, sorted). Each file is one document,
  except that a line holding exactly ``<|endoftext|>`` splits a file into several documents (the usual separator
  of text dumps of web corpora). Documents are read lazily from byte ranges found in one scan.
- ``jsonl``: ``path`` as above (``*.jsonl`` under a directory). One JSON object per non-blank line; the document is
  its ``text_field``. Lines are indexed by byte offset in one scan and read lazily.
- ``hf_dataset``: a Hugging Face ``datasets`` dataset. A directory written by ``save_to_disk`` is read with
  ``load_from_disk`` (random access); anything else (a Hub name such as ``cerebras/SlimPajama-627B``, or a local
  directory of data files such as a Hub dataset's download) is streamed with
  ``load_dataset(path, split=split, streaming=True)``: nothing is downloaded whole.

Every source but a stream is a lazy random-access sequence of texts in source order (:func:`open_documents`);
:func:`open_units` gives any source as the units :mod:`crossjax.document_stream` describes, the seeded order
:mod:`crossjax.tokens` visits.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from crossjax.document_stream import SequenceUnits, StreamUnits, open_stream
from crossjax.errors import CrossjaxError

SOURCES = ("offline", "text", "jsonl", "hf_dataset")
TEXT_SEPARATOR = "<|endoftext|>"


def open_units(section) -> SequenceUnits | StreamUnits:
    """The documents of ``section`` in units, in the seeded order of ``section.seed``."""
    if is_streamed(section):
        _import_datasets()
        return open_stream(section.path, section.split, section.text_field, int(section.seed))
    return SequenceUnits(open_documents(section), int(section.seed))


def is_streamed(section) -> bool:
    """Whether ``section``'s documents come as a stream (an hf_dataset that is not a save_to_disk directory): its
    tokenization is then shared between processes and resumable through a token cache."""
    return section.source == "hf_dataset" and bool(section.path) and _is_stream(section.path)


def _is_stream(path: str) -> bool:
    """A dataset path that is not a save_to_disk directory (a Dataset's state.json or a DatasetDict's
    dataset_dict.json) is read as a stream."""
    return not (os.path.isfile(os.path.join(path, "state.json"))
                or os.path.isfile(os.path.join(path, "dataset_dict.json")))


def open_documents(section) -> Sequence[str]:
    """The documents of a random-access ``section`` as a lazy sequence (source order)."""
    source = section.source
    if source == "offline":
        return _offline_documents(section.split)
    if source == "text":
        return TextDocuments(_resolve_files(section.path, (".txt",), "text"))
    if source == "jsonl":
        return JsonlDocuments(_resolve_files(section.path, (".jsonl",), "jsonl"), section.text_field)
    if source == "hf_dataset":
        return _hf_documents(section.path, section.split, section.text_field)
    raise CrossjaxError(f"tokens.source={source!r} is unknown; choose one of {', '.join(SOURCES)}.")


def _offline_documents(split: str) -> list[str]:
    try:
        from crossjax.suite import corpus
    except ImportError as e:  # the suite package is part of crossjax; this only fails in a broken install
        raise CrossjaxError(f"tokens.source='offline' needs crossjax.suite.corpus, which failed to import: {e}") from e
    return list(corpus.load_documents(split))


def _resolve_files(path: str, exts: tuple[str, ...], source: str) -> list[Path]:
    if not path:
        raise CrossjaxError(f"tokens.path is empty but tokens.source={source!r} reads files; "
                            f"set --config.tokens.path=<file, glob or directory>.")
    if any(ch in path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(path):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name.endswith(exts))
    elif os.path.isfile(path):
        files = [Path(path)]
    else:
        raise CrossjaxError(f"tokens.path={path!r} does not exist; give an existing file, glob or directory.")
    if not files:
        raise CrossjaxError(f"tokens.path={path!r} matches no {'/'.join(exts)} file; check the path.")
    return files


class TextDocuments(Sequence[str]):
    """Documents of plain text files: a file, or each part of it between ``<|endoftext|>`` lines."""

    def __init__(self, files: Sequence[Path]):
        self.files = list(files)
        spans = []  # (file index, start byte, end byte)
        sep = TEXT_SEPARATOR.encode()
        for fi, f in enumerate(self.files):
            start = pos = 0
            with open(f, "rb") as fh:
                for line in fh:
                    if line.rstrip(b"\r\n") == sep:
                        spans.append((fi, start, pos))
                        start = pos + len(line)
                    pos += len(line)
            spans.append((fi, start, pos))
        self._spans = np.asarray(spans, dtype=np.int64).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self._spans)

    def __getitem__(self, i):
        fi, start, end = (int(v) for v in self._spans[i])
        with open(self.files[fi], "rb") as fh:
            fh.seek(start)
            return fh.read(end - start).decode("utf-8", errors="replace").strip("\r\n")


class JsonlDocuments(Sequence[str]):
    """Documents of JSON-lines files: field ``text_field`` of each non-blank line, read lazily by byte offset."""

    def __init__(self, files: Sequence[Path], text_field: str):
        self.files = list(files)
        self.text_field = text_field
        index = []  # (file index, 1-based line number, byte offset)
        for fi, f in enumerate(self.files):
            pos = 0
            with open(f, "rb") as fh:
                for lineno, line in enumerate(fh, start=1):
                    if line.strip():
                        index.append((fi, lineno, pos))
                    pos += len(line)
        self._index = np.asarray(index, dtype=np.int64).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):
        fi, lineno, offset = (int(v) for v in self._index[i])
        where = f"{self.files[fi]} line {lineno}"
        with open(self.files[fi], "rb") as fh:
            fh.seek(offset)
            line = fh.readline()
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CrossjaxError(f"{where} is not valid JSON ({e}); fix or remove that line.") from e
        if not isinstance(record, dict) or self.text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise CrossjaxError(f"{where} has no field {self.text_field!r} (keys seen: {keys}); "
                                f"set --config.tokens.text_field to the field that holds the text.")
        return _as_text(record[self.text_field], self.text_field, where)


def _as_text(value, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise CrossjaxError(f"{where}: field {field!r} holds {type(value).__name__}, not text; "
                            f"set --config.tokens.text_field to a text field.")
    return value


class _DatasetDocuments(Sequence[str]):
    """One text column of a ``datasets.Dataset``, fetched in batches."""

    def __init__(self, dataset, text_field: str, where: str):
        self.dataset, self.text_field, self.where = dataset, text_field, where

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return self.fetch_many([int(i)])[0]

    def fetch_many(self, indices: Sequence[int]) -> list[str]:
        column = self.dataset[[int(i) for i in indices]][self.text_field]
        return [_as_text(v, self.text_field, f"{self.where} row {i}") for i, v in zip(indices, column)]


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise CrossjaxError("tokens.source='hf_dataset' needs the `datasets` package: pip install datasets "
                            "(or pip install 'crossjax[hf]').") from e
    return datasets


def _hf_documents(path: str, split: str, text_field: str) -> Sequence[str]:
    datasets = _import_datasets()
    if not path:
        raise CrossjaxError("tokens.path is empty; set it to a save_to_disk directory or a dataset name.")
    if _is_stream(path):
        raise CrossjaxError(f"dataset {path!r} is not a save_to_disk directory, so it is read as a stream, "
                            f"without random access; read it through documents.open_units.")
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise CrossjaxError(f"dataset {path!r} has no split {split!r} (splits: {sorted(ds)}); "
                                f"set --config.tokens.split.")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise CrossjaxError(f"dataset {path!r} has no field {text_field!r} (fields: {ds.column_names}); "
                            f"set --config.tokens.text_field to the field that holds the text.")
    return _DatasetDocuments(ds, text_field, f"dataset {path!r}")
