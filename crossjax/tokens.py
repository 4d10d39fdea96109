"""Documents -> fixed token contexts, the one token layout every snapshot sees.

Documents come from the sources of :mod:`crossjax.documents` (config section ``tokens``); the tokenizer is the
snapshot's own ``tokenizer.json`` (:func:`load_tokenizer`, and :func:`open_tokenizer` for readers that only
decode).

Contexts (``build_contexts``): documents are visited in a seeded order (:mod:`crossjax.document_stream`: for a
random-access source a seeded permutation of all documents; for a stream the data files in a seeded permutation,
each read in order in windows shuffled by the seed). Without packing (the paper's setting) each document gives
one context ``[BOS] + tokens[:T-1]`` padded to ``T``. With packing the documents are
concatenated, each opened by BOS (and closed by EOS when EOS differs from BOS), and cut into full contexts of ``T``.
Stored rows are the valid positions: BOS, EOS, padding and every special token are excluded. Collection stops as
soon as exactly ``num_tokens`` valid positions are gathered (the excess of the last context is marked invalid), so
the activation store has exactly ``num_tokens`` rows; only the documents that reach that count are read.

The contexts are a function of the ordered documents alone. With a token cache (:mod:`crossjax.token_cache`)
each process tokenizes only its share of the documents and a stopped run continues from the recorded position;
the contexts are the same as without it, for any number of processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence

import numpy as np

from crossjax import token_cache
from crossjax.document_stream import SequenceUnits, StreamUnits
from crossjax.documents import open_units
from crossjax.errors import CrossjaxError

_ENCODE_CHUNK = 256  # documents tokenized per encode_batch call


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """A snapshot's tokenizer and the ids contexts need."""

    tokenizer: object  # tokenizers.Tokenizer, or a callable str -> list[int]
    bos_id: int
    eos_id: int | None
    pad_id: int
    special_ids: frozenset
    vocab_size: int
    sha256: str  # of the tokenizer's serialised form: equal tokenizers, equal hashes

    def describe(self) -> dict:
        """JSON-able summary kept in the store's metadata."""
        return dict(sha256=self.sha256, vocab_size=self.vocab_size, bos_id=self.bos_id, eos_id=self.eos_id,
                    pad_id=self.pad_id, special_ids=sorted(self.special_ids))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise CrossjaxError(f"{path} is not valid JSON ({e}); repair or re-download the snapshot.") from e


def _token_name(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<|endoftext|>", ...} in some tokenizer_config files
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_tokenizer(path: str | os.PathLike):
    """(tokenizers.Tokenizer, the bytes of its tokenizer.json, the directory holding it) from a tokenizer.json
    file or a directory (a snapshot) that holds one."""
    import tokenizers

    p = Path(path)
    if p.is_dir():
        file = p / "tokenizer.json"
        if not file.is_file():
            raise CrossjaxError(f"{p} has no tokenizer.json; every snapshot must ship its tokenizer "
                                f"(save it there with tokenizer.save_pretrained({str(p)!r})).")
    elif p.is_file():
        file = p
    else:
        raise CrossjaxError(f"tokenizer file {p} not found: give a tokenizer.json file or a snapshot directory "
                            "that holds one.")
    raw = file.read_bytes()
    tok = tokenizers.Tokenizer.from_str(raw.decode())
    tok.no_truncation()
    tok.no_padding()
    return tok, raw, file.parent


def open_tokenizer(tokenizer: Any):
    """A tokenizer given as an object (returned as is; None stays None), a tokenizer.json path or a snapshot
    directory holding one -> tokenizers.Tokenizer. For readers that only encode or decode text."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    return _read_tokenizer(tokenizer)[0]


def load_tokenizer(snapshot_dir) -> TokenizerInfo:
    """Loads ``snapshot_dir/tokenizer.json`` (or that file itself) and finds BOS/EOS/padding ids.

    Ids come from config.json (``bos_token_id``/``eos_token_id``), then special_tokens_map.json /
    tokenizer_config.json, then the GPT-NeoX names ``<|endoftext|>`` and ``<|padding|>``.
    """
    tok, raw, d = _read_tokenizer(snapshot_dir)
    cfg = _read_json(d / "config.json")
    names = {**_read_json(d / "tokenizer_config.json"), **_read_json(d / "special_tokens_map.json")}

    def find(cfg_key, name_key, defaults):
        if isinstance(cfg.get(cfg_key), int):
            return cfg[cfg_key]
        for name in [_token_name(names.get(name_key)), *defaults]:
            if name is not None and tok.token_to_id(name) is not None:
                return tok.token_to_id(name)
        return None

    bos = find("bos_token_id", "bos_token", ["<|endoftext|>", "<s>", "<bos>"])
    eos = find("eos_token_id", "eos_token", ["<|endoftext|>", "</s>", "<eos>"])
    pad = find("pad_token_id", "pad_token", ["<|padding|>", "<pad>"])
    if bos is None:
        bos = eos
    if bos is None:
        raise CrossjaxError(f"the tokenizer in {d} has no BOS or EOS token (looked in config.json, "
                            f"special_tokens_map.json and for <|endoftext|>); add bos_token_id to config.json.")
    pad = bos if pad is None else pad
    special = {t["id"] for t in json.loads(raw).get("added_tokens", []) if t.get("special")}
    special |= {i for i in (bos, eos, pad) if i is not None}
    return TokenizerInfo(tokenizer=tok, bos_id=int(bos), eos_id=None if eos is None else int(eos), pad_id=int(pad),
                         special_ids=frozenset(int(i) for i in special), vocab_size=tok.get_vocab_size(),
                         sha256=hashlib.sha256(raw).hexdigest())


def _batch_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer: parallel, no special tokens added
        return lambda texts: [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    if callable(tokenizer):
        return lambda texts: [list(tokenizer(t)) for t in texts]
    raise CrossjaxError(f"tokenizer of type {type(tokenizer).__name__} is neither a tokenizers.Tokenizer nor a "
                        f"callable str -> token ids.")


# ----------------------------------------------------------------------------------------------------------------
# Contexts


@dataclasses.dataclass(frozen=True)
class Contexts:
    """Fixed contexts and which of their positions become stored rows.

    input_ids: [C, T] int32; valid: [C, T] bool (rows); doc_ids: [C] int64, the source index of the document
    that is at position 0 of each context. Context c's index c is the ``context_ids`` value stored per row.
    """

    input_ids: np.ndarray
    valid: np.ndarray
    doc_ids: np.ndarray

    @property
    def num_contexts(self) -> int:
        return self.input_ids.shape[0]

    @property
    def context_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    @property
    def context_ids(self) -> np.ndarray:
        return np.arange(self.num_contexts, dtype=np.int32)

    def fingerprint(self) -> str:
        """sha256 over tokens and validity: two runs agree on rows iff their fingerprints agree."""
        h = hashlib.sha256()
        h.update(np.asarray(self.input_ids.shape, np.int64).tobytes())
        h.update(np.ascontiguousarray(self.input_ids, dtype="<i4").tobytes())
        h.update(np.packbits(self.valid).tobytes())
        return h.hexdigest()


class _Assembler:
    """Turns documents' kept tokens, in visiting order, into contexts; ``add`` says when num_tokens are in."""

    def __init__(self, T: int, n_target: int, packing: bool, bos_id: int, pad_id: int, eos_id: int | None,
                 excluded: np.ndarray):
        self.T, self.n_target, self.packing = T, n_target, packing
        self.bos_id, self.pad_id, self.excluded = bos_id, pad_id, excluded
        self.sep_after = [eos_id] if packing and eos_id is not None and eos_id != bos_id else []
        self.rows_ids, self.rows_valid, self.rows_doc = [], [], []
        self.collected, self.done = 0, False
        self.buf: list[int] = []
        self.buf_docs: list[int] = []  # source document of each buffered token (packing)

    def keep(self, toks) -> np.ndarray:
        """The part of a document's tokens contexts can use: all of them when packing, else the first T-1."""
        return np.asarray(toks if self.packing else toks[: self.T - 1], dtype=np.int32)

    def rows(self, kept: np.ndarray) -> int:
        """Stored rows a document's kept tokens give (before the final trim)."""
        return int((~np.isin(kept, self.excluded)).sum())

    def rows_to_read(self) -> int:
        """Rows whose documents the contexts certainly lie in: num_tokens, and with packing T more (the last
        context is completed by the tokens of the documents after the num_tokens-th row)."""
        return self.n_target + (self.T if self.packing else 0)

    def _emit(self, ids: np.ndarray, doc: int) -> bool:
        """Adds one context (padded to T); returns True once num_tokens valid positions are collected."""
        ctx = np.full(self.T, self.pad_id, dtype=np.int32)
        ctx[:len(ids)] = ids
        valid = np.zeros(self.T, dtype=bool)
        valid[:len(ids)] = ~np.isin(ids, self.excluded)
        n = int(valid.sum())
        if n == 0:
            return False
        if self.collected + n > self.n_target:  # trim the excess so the store has exactly num_tokens rows
            keep = np.flatnonzero(valid)[: self.n_target - self.collected]
            valid[:] = False
            valid[keep] = True
            n = len(keep)
        self.rows_ids.append(ctx), self.rows_valid.append(valid), self.rows_doc.append(doc)
        self.collected += n
        return self.collected >= self.n_target

    def add(self, doc: int, kept: np.ndarray) -> bool:
        if self.done:
            return True
        if not self.packing:
            self.done = self._emit(np.asarray([self.bos_id, *kept.tolist()], dtype=np.int64), doc)
            return self.done
        piece = [self.bos_id, *kept.tolist(), *self.sep_after]
        self.buf.extend(piece)
        self.buf_docs.extend([doc] * len(piece))
        while len(self.buf) >= self.T and not self.done:
            self.done = self._emit(np.asarray(self.buf[:self.T], dtype=np.int64), self.buf_docs[0])
            del self.buf[:self.T], self.buf_docs[:self.T]
        return self.done

    def contexts(self) -> Contexts:
        """The contexts once every document was added (or num_tokens reached)."""
        if not self.done and self.buf:
            self.done = self._emit(np.asarray(self.buf, dtype=np.int64), self.buf_docs[0])
            self.buf, self.buf_docs = [], []
        if self.collected < self.n_target:
            raise CrossjaxError(f"the documents hold only {self.collected} usable tokens but tokens.num_tokens="
                                f"{self.n_target}; lower --config.tokens.num_tokens or give more text.")
        return Contexts(input_ids=np.stack(self.rows_ids), valid=np.stack(self.rows_valid),
                        doc_ids=np.asarray(self.rows_doc, dtype=np.int64))


def _assembler(context_len, num_tokens, packing, bos_id, pad_id, eos_id, special_ids) -> _Assembler:
    T, n_target = int(context_len), int(num_tokens)
    if T < 2:
        raise CrossjaxError(f"tokens.context_len={T} leaves no room after BOS; use at least 2.")
    if n_target <= 0:
        raise CrossjaxError(f"tokens.num_tokens={n_target} must be positive.")
    excluded = np.array(sorted({int(bos_id), int(pad_id), *(int(s) for s in special_ids)}
                               | ({int(eos_id)} if eos_id is not None else set())), dtype=np.int64)
    return _Assembler(T, n_target, bool(packing), int(bos_id), int(pad_id), eos_id, excluded)


def _as_units(documents, seed: int):
    if isinstance(documents, (SequenceUnits, StreamUnits)):  # already units
        return documents
    if not isinstance(documents, Sequence) and not hasattr(documents, "fetch_many"):
        documents = list(documents)
    return SequenceUnits(documents, seed)


def _live_documents(units, encode, keep) -> Iterator[tuple[int, np.ndarray]]:
    """(document id, kept tokens) of every unit in order, tokenized as they are read."""
    for j in range(units.num_units):
        for part in units.read(j):
            for chunk in _chunks(iter(part), _ENCODE_CHUNK):
                for (doc, _), toks in zip(chunk, encode([t for _, t in chunk])):
                    yield doc, keep(toks)


def build_contexts(documents, tokenizer, *, context_len: int, num_tokens: int, packing: bool = False,
                   bos_id: int, pad_id: int, eos_id: int | None = None, special_ids: Collection[int] = (),
                   seed: int = 0, cache_dir: str | os.PathLike | None = None, cache_settings: dict | None = None,
                   process_index: int = 0, process_count: int = 1, wait_s: float | None = None,
                   progress: bool = False) -> Contexts:
    """Tokenizes documents in a seeded order into contexts holding exactly ``num_tokens`` valid positions.

    documents: a sequence (random access, lazily read) or iterable (materialised) of texts, or units of
      :mod:`crossjax.document_stream` (e.g. a stream); the order is the units' (:mod:`crossjax.document_stream`).
    tokenizer: a ``tokenizers.Tokenizer`` (special tokens are not added: BOS is placed here) or a callable
      ``str -> list[int]``.
    cache_dir: None reads and tokenizes in memory, only as many documents as the contexts need (every process
      all of them). A directory every process sees (:mod:`crossjax.token_cache`): process ``process_index`` of
      ``process_count`` tokenizes only its share of the documents into it, a stopped run continues from the
      recorded position, then every process reads the whole back (waiting up to ``wait_s`` seconds, default
      6 hours with several processes, for the others' shares). ``cache_settings``: what else the tokens depend
      on (the source, the tokenizer's hash), part of the cache's key.
    Returns Contexts(input_ids [C, T] int32, valid [C, T] bool, doc_ids [C]), the same whatever the cache and the
    process count. BOS, EOS, pad and ``special_ids`` positions are never valid.
    """
    asm = _assembler(context_len, num_tokens, packing, bos_id, pad_id, eos_id, special_ids)
    encode = _batch_encoder(tokenizer)
    units = _as_units(documents, seed)
    if cache_dir is None:
        docs = _live_documents(units, encode, asm.keep)
    else:
        settings = {"tokenizer": _tokenizer_identity(tokenizer), **(cache_settings or {}),
                    "units": units.describe(), "seed": int(seed), "context_len": asm.T, "packing": asm.packing,
                    "bos_id": asm.bos_id, "pad_id": asm.pad_id, "eos_id": eos_id, "excluded": asm.excluded.tolist()}
        cache = token_cache.TokenCache(cache_dir, settings)
        token_cache.tokenize_share(units, cache, lambda texts: [asm.keep(t) for t in encode(texts)],
                                   lambda kept: sum(asm.rows(k) for k in kept), num_rows=asm.rows_to_read(),
                                   process_index=process_index, process_count=process_count, progress=progress)
        if wait_s is None:
            wait_s = 0.0 if int(process_count) == 1 else 6 * 3600.0
        docs = token_cache.cached_documents(units, cache, process_count=int(process_count), wait_s=wait_s)
    for doc, kept in docs:
        if asm.add(doc, kept):
            break
    return asm.contexts()


def _tokenizer_identity(tokenizer) -> str:
    """What identifies a tokenizer in a cache key: its serialised form's hash (a callable: its name)."""
    if hasattr(tokenizer, "to_str"):
        return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    return f"{getattr(tokenizer, '__module__', '')}.{getattr(tokenizer, '__qualname__', repr(tokenizer))}"


def _chunks(it: Iterator, n: int) -> Iterator[list]:
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def prefix_mask(valid: np.ndarray) -> np.ndarray:
    """valid [C, T] bool -> attention mask [C, T]: each context up to its last valid position (right padding)."""
    last = np.where(valid.any(axis=1), valid.shape[1] - np.argmax(valid[:, ::-1], axis=1), 0)
    return np.arange(valid.shape[1])[None, :] < last[:, None]


def contexts_for(section, tokenizer: TokenizerInfo, *, cache_dir: str | os.PathLike | None = None,
                 process_index: int = 0, process_count: int = 1, wait_s: float | None = None,
                 progress: bool = False) -> Contexts:
    """The contexts of a ``tokens`` config section, tokenized with a snapshot's tokenizer.

    cache_dir, process_index, process_count, wait_s: as :func:`build_contexts` (sharded, resumable tokenization
    through a cache every process sees); the contexts are the same with or without them."""
    units = open_units(section)
    source = dict(source=section.source, path=section.path, split=section.split, text_field=section.text_field,
                  files=_source_identity(units, section.path), tokenizer=tokenizer.sha256)
    return build_contexts(units, tokenizer.tokenizer, context_len=section.context_len,
                          num_tokens=section.num_tokens, packing=section.packing, bos_id=tokenizer.bos_id,
                          pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id, special_ids=tokenizer.special_ids,
                          seed=section.seed, cache_dir=cache_dir, cache_settings=source,
                          process_index=process_index, process_count=process_count, wait_s=wait_s,
                          progress=progress)


def _source_identity(units, path: str) -> list:
    """Files (name, size, mtime) or dataset fingerprint behind the units: a changed local source makes a new cache
    key, not stale tokens."""
    docs = getattr(units, "documents", None)
    files = docs.files if hasattr(docs, "files") else []
    if not files and not hasattr(units, "documents") and path and os.path.isdir(path):  # a stream of local files
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    if files:
        return [(str(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    fingerprint = getattr(getattr(docs, "dataset", None), "_fingerprint", None)
    return [fingerprint] if fingerprint else []
