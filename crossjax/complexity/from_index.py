"""From a FeatureIndex (crossjax.analysis.lookup) to the plain data the scorers and the correlation take.

Only the index's public surface is used: ``top_examples(i, k, window=...)`` (Examples with the window's token ids,
the firing position and value), ``emergence`` ([F] snapshot index, -1 never) and ``snapshots`` (names).
"""
from __future__ import annotations

from typing import Any, Sequence

from crossjax.complexity import Context, FeatureContexts
from crossjax.errors import CrossjaxError
from crossjax.tokens import open_tokenizer

NO_TOKEN = -1  # a window slot the store holds no row for (BOS, padding, special tokens): left out


def _token_strings(tokenizer):
    """token id -> its text, decoded alone (spaces kept); "<id>" without a tokenizer."""
    memo: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in memo:
            if tokenizer is None:
                memo[token_id] = f"<{token_id}>"
            else:
                try:
                    memo[token_id] = tokenizer.decode([token_id], skip_special_tokens=False)
                except TypeError:  # decoders without the keyword
                    memo[token_id] = tokenizer.decode([token_id])
        return memo[token_id]
    return text


def feature_contexts(index, features: Sequence[int], *, tokenizer: Any = None, k: int | None = None,
                     window: int | None = None) -> list[FeatureContexts]:
    """The top ``k`` contexts (all the index keeps by default) of each feature, ``window`` tokens on each side.

    tokenizer: a tokenizers.Tokenizer, a tokenizer.json path or a snapshot directory. The LLM scorer needs one
    (token ids mean nothing to it); the offline scorer only compares tokens, so ids ("<id>") do without.
    """
    tok = open_tokenizer(tokenizer)
    if tok is not None and not callable(getattr(tok, "decode", None)):
        raise CrossjaxError(f"tokenizer={tokenizer!r} cannot decode: pass a tokenizers.Tokenizer, a tokenizer.json "
                            "path or a snapshot directory holding one.")
    text = _token_strings(tok)
    out = []
    for feature in features:
        contexts = []
        for ex in index.top_examples(int(feature), k, window=window):
            ids = list(ex.tokens)
            slot = ex.position - ex.positions[0]
            ids[slot] = ex.token_id  # the firing token, whatever the window lookup found
            kept = [j for j, t in enumerate(ids) if t != NO_TOKEN]
            contexts.append(Context(tuple(text(int(ids[j])) for j in kept), kept.index(slot), ex.value))
        out.append(FeatureContexts(int(feature), tuple(contexts)))
    return out


def emergence_steps(index) -> dict[int, int | None]:
    """{feature: training step of its emergence snapshot, None if it never emerges}, for every feature.

    Steps come from snapshot names `stepN` (Pythia revisions, the offline suite); with other names the snapshot's
    index stands in for its step, which keeps the order (Spearman's r is unchanged, Pearson's is not in steps).
    """
    from crossjax.analysis.trajectories import training_steps

    names = list(index.snapshots)
    steps = training_steps(names) or list(range(len(names)))
    return {f: (None if s < 0 else int(steps[s])) for f, s in enumerate(int(e) for e in index.emergence)}
