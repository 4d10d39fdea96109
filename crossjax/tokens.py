"""Documents -> fixed token contexts, the one token layout every snapshot sees.

Documents come from the sources of :mod:`crossjax.documents` (config section ``tokens``); the tokenizer is the
snapshot's own ``tokenizer.json`` (:func:`load_tokenizer`, and :func:`open_tokenizer` for readers that only
decode).

Contexts (``build_contexts``): documents are visited in a seeded random order. Without packing (the paper's
setting) each document gives one context ``[BOS] + tokens[:T-1]`` padded to ``T``. With packing the documents are
concatenated, each opened by BOS (and closed by EOS when EOS differs from BOS), and cut into full contexts of ``T``.
Stored rows are the valid positions: BOS, EOS, padding and every special token are excluded. Collection stops as
soon as exactly ``num_tokens`` valid positions are gathered (the excess of the last context is marked invalid), so
the activation store has exactly ``num_tokens`` rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence

import numpy as np

from crossjax.documents import open_documents
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


def _fetch(documents, indices: np.ndarray) -> list[str]:
    if hasattr(documents, "fetch_many"):
        return documents.fetch_many(indices)
    return [documents[int(i)] for i in indices]


def _document_stream(documents, seed: int) -> Iterator[tuple[int, str]]:
    """(source index, text) in the seeded order; materialises plain iterables first."""
    if not isinstance(documents, Sequence) and not hasattr(documents, "fetch_many"):
        documents = list(documents)
    order = np.random.default_rng(seed).permutation(len(documents))
    for lo in range(0, len(order), _ENCODE_CHUNK):
        idx = order[lo:lo + _ENCODE_CHUNK]
        yield from zip(idx.tolist(), _fetch(documents, idx))


def build_contexts(documents: Iterable[str], tokenizer, *, context_len: int, num_tokens: int, packing: bool = False,
                   bos_id: int, pad_id: int, eos_id: int | None = None, special_ids: Collection[int] = (),
                   seed: int = 0) -> Contexts:
    """Tokenizes documents in a seeded order into contexts holding exactly ``num_tokens`` valid positions.

    documents: a sequence (random access, lazily read) or iterable (materialised) of texts.
    tokenizer: a ``tokenizers.Tokenizer`` (special tokens are not added: BOS is placed here) or a callable
      ``str -> list[int]``.
    Returns Contexts(input_ids [C, T] int32, valid [C, T] bool, doc_ids [C]). BOS, EOS, pad and ``special_ids``
    positions are never valid.
    """
    T, n_target = int(context_len), int(num_tokens)
    if T < 2:
        raise CrossjaxError(f"tokens.context_len={T} leaves no room after BOS; use at least 2.")
    if n_target <= 0:
        raise CrossjaxError(f"tokens.num_tokens={n_target} must be positive.")
    excluded = np.array(sorted({int(bos_id), int(pad_id), *(int(s) for s in special_ids)}
                               | ({int(eos_id)} if eos_id is not None else set())), dtype=np.int64)
    encode = _batch_encoder(tokenizer)

    rows_ids, rows_valid, rows_doc = [], [], []
    collected = 0

    def emit(ids: np.ndarray, doc: int) -> bool:
        """Adds one context (padded to T); returns True once num_tokens valid positions are collected."""
        nonlocal collected
        ctx = np.full(T, pad_id, dtype=np.int32)
        ctx[:len(ids)] = ids
        valid = np.zeros(T, dtype=bool)
        valid[:len(ids)] = ~np.isin(ids, excluded)
        n = int(valid.sum())
        if n == 0:
            return False
        if collected + n > n_target:  # trim the excess so the store has exactly num_tokens rows
            keep = np.flatnonzero(valid)[: n_target - collected]
            valid[:] = False
            valid[keep] = True
            n = len(keep)
        rows_ids.append(ctx), rows_valid.append(valid), rows_doc.append(doc)
        collected += n
        return collected >= n_target

    stream = _document_stream(documents, seed)
    done = False
    if not packing:
        for chunk in _chunks(stream, _ENCODE_CHUNK):
            for (doc, _), toks in zip(chunk, encode([t for _, t in chunk])):
                if emit(np.asarray([bos_id, *toks[: T - 1]], dtype=np.int64), doc):
                    done = True
                    break
            if done:
                break
    else:
        sep_after = [eos_id] if eos_id is not None and eos_id != bos_id else []
        buf: list[int] = []
        buf_docs: list[int] = []  # source document of each buffered token
        for chunk in _chunks(stream, _ENCODE_CHUNK):
            for (doc, _), toks in zip(chunk, encode([t for _, t in chunk])):
                piece = [bos_id, *toks, *sep_after]
                buf.extend(piece)
                buf_docs.extend([doc] * len(piece))
                while len(buf) >= T and not done:
                    done = emit(np.asarray(buf[:T], dtype=np.int64), buf_docs[0])
                    del buf[:T], buf_docs[:T]
                if done:
                    break
            if done:
                break
        if not done and buf:
            done = emit(np.asarray(buf, dtype=np.int64), buf_docs[0])

    if collected < n_target:
        raise CrossjaxError(f"the documents hold only {collected} usable tokens but tokens.num_tokens={n_target}; "
                            f"lower --config.tokens.num_tokens or give more text.")
    return Contexts(input_ids=np.stack(rows_ids), valid=np.stack(rows_valid),
                    doc_ids=np.asarray(rows_doc, dtype=np.int64))


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


def contexts_for(section, tokenizer: TokenizerInfo) -> Contexts:
    """The contexts of a ``tokens`` config section, tokenized with a snapshot's tokenizer."""
    return build_contexts(open_documents(section), tokenizer.tokenizer, context_len=section.context_len,
                          num_tokens=section.num_tokens, packing=section.packing, bos_id=tokenizer.bos_id,
                          pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id, special_ids=tokenizer.special_ids,
                          seed=section.seed)
