"""The two phases of pre-training (PAPER.md): first the LM's predictions approach the corpus' unigram, then its
bigram statistics (the statistical learning phase); then features form and the model leaves those statistics.

    stats = ngram_statistics(train_ids, train_mask, vocab_size)       # from the training split
    curves = phase_curves(snapshots, (heldout_ids, heldout_mask), stats)
    curves["step1000"]  # {loss, kl_unigram, kl_bigram, pairs}
    transition(curves)  # {"snapshot": ..., "step": ..., "rule": ...}

Per snapshot, over the next-token pairs (t, t+1) of held-out contexts inside the attention mask (as lm_loss):
- loss: the mean next-token cross-entropy, -log p(x_{t+1} | x_<=t);
- kl_unigram: mean over positions of KL(u || p_t), u the corpus unigram distribution;
- kl_bigram: mean over positions of KL(q(. | x_t) || p_t), q the corpus bigram distribution given the current
  token (a token never seen in the training split backs off to u).
The statistics are the reference distribution of each KL, so it stays finite (the model's softmax is positive
where the counts are not). Statistics are counted over the pairs inside the training contexts' masks.
Transition rule: the snapshot where kl_bigram is smallest, i.e. where the model is closest to the bigram
statistics; before it the KL falls (statistical learning), after it the model departs from them. The snapshot
with the smallest kl_unigram is reported beside it.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from crossjax.errors import CrossjaxError


@dataclasses.dataclass(frozen=True)
class NgramStatistics:
    unigram: np.ndarray               # [V] float64, sums to 1
    bigram: Any                       # scipy.sparse.csr_matrix [V, V]: row a = q(. | a); empty rows back off to u
    unigram_entropy: float            # H(u)
    bigram_entropy: np.ndarray        # [V] H(q(. | a)) (H(u) where the row is empty)

    def rows(self, tokens: np.ndarray) -> np.ndarray:
        """[n] current tokens -> [n, V] dense q(. | token) (u where the token was never seen)."""
        dense = np.asarray(self.bigram[tokens].todense(), np.float64)
        empty = dense.sum(axis=1) == 0
        dense[empty] = self.unigram
        return dense


def ngram_statistics(token_ids: np.ndarray, mask: np.ndarray, vocab_size: int) -> NgramStatistics:
    """Unigram and bigram distributions of the tokens inside `mask` (token_ids, mask [C, T]); a bigram counts
    the pair (x_t, x_{t+1}) when both lie inside the mask."""
    from scipy import sparse
    ids, mask = np.asarray(token_ids), np.asarray(mask, bool)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise CrossjaxError(f"token_ids and mask must be [contexts, tokens] arrays of one shape, got {ids.shape} "
                            f"and {mask.shape}")
    inside = ids[mask]
    if inside.size == 0:
        raise CrossjaxError("no token inside the mask: give the training split's contexts")
    if inside.min() < 0 or inside.max() >= vocab_size:
        raise CrossjaxError(f"token ids in [{inside.min()}, {inside.max()}] do not fit vocab_size {vocab_size}")
    unigram = np.bincount(inside, minlength=vocab_size).astype(np.float64)
    unigram /= unigram.sum()
    pair = mask[:, :-1] & mask[:, 1:]
    a, b = ids[:, :-1][pair], ids[:, 1:][pair]
    counts = sparse.csr_matrix((np.ones(len(a)), (a, b)), shape=(vocab_size, vocab_size))
    counts.sum_duplicates()
    totals = np.asarray(counts.sum(axis=1)).ravel()
    bigram = sparse.diags(np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)) @ counts
    bigram = sparse.csr_matrix(bigram)
    h_uni = float(-np.sum(unigram[unigram > 0] * np.log(unigram[unigram > 0])))
    plogp = bigram.copy()
    plogp.data = bigram.data * np.log(bigram.data)
    h_bi = -np.asarray(plogp.sum(axis=1)).ravel()
    h_bi[totals == 0] = h_uni
    return NgramStatistics(unigram, bigram, h_uni, h_bi)


@functools.lru_cache(maxsize=None)
def _sums_fn():
    import jax
    import jax.numpy as jnp

    @jax.jit
    def sums(logits, ids, mask, q_rows, unigram):
        """Sums over the batch's pairs of (nll, cross-entropy to u, cross-entropy to q): KL = that - entropy."""
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)          # [B, T-1, V]
        pair = (mask[:, :-1] & mask[:, 1:]).astype(jnp.float32)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        ce_u = -jnp.einsum("btv,v->bt", logp, unigram)
        ce_q = -jnp.sum(logp * q_rows, axis=-1)
        return jnp.stack([jnp.sum(nll * pair), jnp.sum(ce_u * pair), jnp.sum(ce_q * pair)])
    return sums


def phase_curves(snapshots: Mapping[str, Any], contexts: tuple[np.ndarray, np.ndarray], stats: NgramStatistics, *,
                 batch_size: int = 8) -> dict[str, dict]:
    """{snapshot name: {loss, kl_unigram, kl_bigram, pairs}} on contexts (input_ids [C,T], attention mask [C,T]);
    snapshots: name -> LoadedSnapshot or snapshot directory, one model in memory at a time."""
    import jax.numpy as jnp
    from crossjax.models.load import LoadedSnapshot, load_snapshot
    from crossjax.models.runner import Runner
    ids, mask = (np.asarray(a) for a in contexts)
    mask = mask.astype(bool)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise CrossjaxError(f"contexts must be (input_ids [C,T], attention_mask [C,T]), got {ids.shape}, {mask.shape}")
    pair = mask[:, :-1] & mask[:, 1:]
    pairs = int(pair.sum())
    if pairs == 0:
        raise CrossjaxError("the contexts hold no next-token pair inside the attention mask: give longer contexts")
    vocab = len(stats.unigram)
    h_q = float(np.sum(stats.bigram_entropy[ids[:, :-1]] * pair))             # sum of H(q(.|x_t)) over pairs
    unigram = jnp.asarray(stats.unigram, jnp.float32)
    out = {}
    for name, snap in snapshots.items():
        loaded = snap if isinstance(snap, LoadedSnapshot) else load_snapshot(os.fspath(snap))
        if loaded.config.vocab_size < vocab:
            raise CrossjaxError(f"snapshot {name!r} has vocab_size {loaded.config.vocab_size} but the statistics "
                                f"cover {vocab} tokens: count them with the snapshots' tokenizer")
        runner = Runner(loaded.model)
        total = np.zeros(3, np.float64)
        for a in range(0, len(ids), batch_size):
            sl = slice(a, a + batch_size)
            logits = runner.logits(ids[sl], mask[sl])[..., :vocab]
            q = stats.rows(ids[sl, :-1].reshape(-1)).reshape(ids[sl, :-1].shape + (vocab,))
            total += np.asarray(_sums_fn()(logits, jnp.asarray(ids[sl]), jnp.asarray(mask[sl]),
                                           jnp.asarray(q, jnp.float32), unigram), np.float64)
        loss, ce_u, ce_q = total / pairs
        out[name] = {"loss": float(loss), "kl_unigram": float(ce_u - stats.unigram_entropy),
                     "kl_bigram": float(ce_q - h_q / pairs), "pairs": pairs}
        del loaded, runner
    return out


def transition(curves: Mapping[str, dict]) -> dict:
    """The statistical-to-feature transition by the module docstring's rule, with its training step when the
    snapshot names carry it (stepN)."""
    from crossjax.analysis.trajectories import training_steps
    names = list(curves)
    if not names:
        raise CrossjaxError("no snapshot curves given")
    steps = training_steps(names)
    best_bi = min(range(len(names)), key=lambda i: curves[names[i]]["kl_bigram"])
    best_uni = min(range(len(names)), key=lambda i: curves[names[i]]["kl_unigram"])
    return {"snapshot": names[best_bi], "step": None if steps is None else steps[best_bi],
            "closest_to_unigram": names[best_uni],
            "rule": "the snapshot with the smallest KL(bigram || model) on held-out tokens"}
