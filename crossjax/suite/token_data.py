"""The suite's training data: tokenizer and tokenised splits on disk, the batch of each step, fixed eval contexts.

Determinism: the batch of step s is a function of (seed, s) only (an epoch's permutation of fixed-length chunks of
the token stream), so a build resumed at any step sees the batches an uninterrupted one sees.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from crossjax import console, tokens
from crossjax.errors import CrossjaxError
from crossjax.suite import corpus, dirs
from crossjax.suite import tokenizer as tokenizer_lib


def train_documents(s: dict) -> list[str]:
    """The training split's documents, or an evenly spread subset of `max_documents` of them."""
    docs = corpus.load_documents("train")
    n = s["max_documents"]
    if n and n < len(docs):
        # An evenly spread subset keeps both sources (Shakespeare first, then the KJV) in the mix.
        idx = np.linspace(0, len(docs) - 1, n).round().astype(int)
        docs = [docs[i] for i in idx]
    return docs


def token_stream(tok, docs: Sequence[str]) -> np.ndarray:
    """Documents -> one uint16 stream, each document followed by <|endoftext|> (as Pythia's packed data)."""
    parts = []
    for enc in tok.encode_batch(list(docs)):
        parts.append(np.asarray(enc.ids, dtype=np.uint16))
        parts.append(np.array([tokenizer_lib.EOS_ID], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros([0], np.uint16)


def prepare_data(root: Path, s: dict, show: bool) -> tuple[Path, np.ndarray, np.ndarray]:
    """(tokenizer dir, train stream, held-out stream): the tokenizer and tokenised splits, built once (each file
    appears atomically) under root/tokenizer and root/data."""
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        console.say("suite", f"training a byte-level BPE tokenizer (vocab {s['vocab_size']})", enabled=show)
        tmp = dirs.fresh_partial_dir(tok_dir)
        tokenizer_lib.build_tokenizer(train_documents(s), tmp, vocab_size=s["vocab_size"],
                                      model_max_length=s["context_len"])
        dirs.replace_dir(tmp, tok_dir)
    tok = tokens.open_tokenizer(tok_dir)
    data = root / "data"
    data.mkdir(exist_ok=True)
    streams = {}
    for split in ("train", "heldout"):
        path = data / f"{split}.npy"
        if not path.is_file():
            docs = train_documents(s) if split == "train" else corpus.load_documents("heldout")
            console.say("suite", f"tokenising the {split} split ({len(docs)} documents)", enabled=show)
            dirs.save_npy(path, token_stream(tok, docs))
        streams[split] = np.load(path)
    return tok_dir, streams["train"], streams["heldout"]


class ChunkSampler:
    """Batch of step s = chunks [B, T] of the stream, chunk order a fresh permutation per epoch from (seed, epoch)."""

    def __init__(self, stream: np.ndarray, context_len: int, batch: int, seed: int):
        self.T, self.B, self.seed = context_len, batch, seed
        self.num_chunks = len(stream) // context_len
        if self.num_chunks < 1:
            raise CrossjaxError(f"The training split has {len(stream)} tokens, fewer than one context of "
                                f"{context_len}; lower suite.context_len or raise suite.max_documents.")
        self.chunks = stream[: self.num_chunks * context_len].reshape(self.num_chunks, context_len)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_chunks)
        return self._perms[epoch]

    def batch(self, step: int) -> np.ndarray:
        """int32 [B, T]: the batch trained on at `step` (0-based)."""
        rows = []
        for i in range(step * self.B, (step + 1) * self.B):
            epoch, j = divmod(i, self.num_chunks)
            rows.append(self.chunks[self._perm(epoch)[j]])
        return np.stack(rows).astype(np.int32)


def eval_sample(stream: np.ndarray, context_len: int, count: int) -> np.ndarray:
    """int32 [C, T]: `count` chunks spread evenly over the stream (fixed for every snapshot)."""
    n = len(stream) // context_len
    if n < 1:
        raise CrossjaxError(f"A split has {len(stream)} tokens, fewer than one context of {context_len}.")
    idx = np.linspace(0, n - 1, min(count, n)).round().astype(int)
    return stream[: n * context_len].reshape(n, context_len)[idx].astype(np.int32)


def unigram_cross_entropy(train: np.ndarray, heldout: np.ndarray, vocab: int) -> float:
    """Held-out cross-entropy (nats) of the add-one unigram distribution of the training stream."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[heldout].mean())
