"""The FeatureIndex adapter: top examples -> Contexts (token strings, firing index, value), rows the store does
not hold left out; emergence snapshots -> training steps."""
import inspect

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from crossjax.analysis.lookup import Example, FeatureIndex
from crossjax.complexity import OfflineScorer
from crossjax.complexity.from_index import emergence_steps, feature_contexts
from crossjax.errors import CrossjaxError

VOCAB = {"<bos>": 0, "the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5}


class IndexLike:
    """FeatureIndex's public surface that the adapter reads: top_examples, emergence, snapshots."""

    def __init__(self, snapshots, emergence, examples):
        self.snapshots, self.emergence, self._examples = tuple(snapshots), np.asarray(emergence), examples
        self.calls = []

    def top_examples(self, i, k=None, tokenizer=None, window=None, marks=("[[", "]]")):
        self.calls.append((i, k, window))
        return self._examples[i][:k]


def example(tokens, position, positions, token_id, value):
    return Example(row=0, value=value, token_id=token_id, context_id=0, position=position,
                   positions=tuple(positions), tokens=tuple(tokens), text=None)


EXAMPLES = {
    # positions 0..4 of a context whose position 0 is BOS (not stored: -1); the feature fires on "cat" at 2
    2: [example([-1, 1, 2, 3, 4], 2, range(0, 5), 2, 4.5), example([1, 2, 3], 5, range(4, 7), 2, 3.0)],
    3: [],
}


def word_tokenizer():
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<bos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_examples_become_contexts():
    index = IndexLike(["step0", "step10"], [0, 1, -1, 0], EXAMPLES)
    a, b = feature_contexts(index, [2, 3], tokenizer=word_tokenizer(), k=2, window=2)
    assert index.calls == [(2, 2, 2), (3, 2, 2)]
    assert a.feature == 2 and b.feature == 3 and b.contexts == ()
    first, second = a.contexts
    assert first.tokens == ("the", "cat", "sat", "on") and first.firing == 1 and first.activation == 4.5
    assert second.tokens == ("the", "cat", "sat") and second.firing_token == "cat"
    [ids] = feature_contexts(index, [2], k=1)  # without a tokenizer: ids, enough for the offline scorer
    assert ids.contexts[0].tokens == ("<1>", "<2>", "<3>", "<4>")
    assert OfflineScorer().score([a])[0].complexity == 2  # one token behind a fixed cue ("the")


def test_emergence_steps_from_snapshot_names():
    assert emergence_steps(IndexLike(["step0", "step10", "step1000"], [2, 0, -1], {})) == {0: 1000, 1: 0, 2: None}
    # names without steps: the snapshot index keeps the order
    assert emergence_steps(IndexLike(["init", "mid", "final"], [2, -1], {})) == {0: 2, 1: None}


def test_the_adapter_matches_feature_index():
    params = inspect.signature(FeatureIndex.top_examples).parameters
    assert list(params)[:2] == ["self", "i"] and {"k", "window"} <= set(params)
    assert {f.name for f in Example.__dataclass_fields__.values()} >= {"value", "token_id", "position", "positions",
                                                                        "tokens"}


def test_a_tokenizer_that_cannot_decode_is_an_error():
    with pytest.raises(CrossjaxError, match="cannot decode"):
        feature_contexts(IndexLike(["step0"], [0], EXAMPLES), [2], tokenizer=object())
