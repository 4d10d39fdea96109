"""The offline scorer on hand-built contexts whose ordering is known: one token < one token behind a fixed cue <
many tokens behind a fixed cue < many tokens in unrelated contexts."""
import pytest

from _fake_api import feature
from crossjax.complexity import Context, FeatureContexts
from crossjax.complexity.offline import OfflineScorer, cue, diversity
from crossjax.errors import CrossjaxError

# one token, whatever surrounds it (case and spacing variants are the same token)
ONE_TOKEN = feature(0, ["we saw the", "The", "over the", "and then THE", "is the"])
REPEATED = feature(1, ["cat cat cat", "cat cat", "cat cat cat cat", "cat"])
# one token behind a fixed cue: "York" after "New"
TOKEN_AFTER_CUE = feature(2, ["in New York", "to New York", "New York", "from New York"])
# many tokens behind a fixed cue: whatever follows "of the"
ANY_AFTER_CUE = feature(3, ["king of the hill", "top of the world", "end of the line", "all of the people"],
                        firing=-1)
# many tokens in unrelated contexts: an abstract feature
ABSTRACT = feature(4, ["she felt quite uneasy", "perhaps it might rain", "I doubt whether they", "unclear if the plan",
                       "possibly true maybe"])


def test_known_ordering():
    scores = OfflineScorer().score([ONE_TOKEN, REPEATED, TOKEN_AFTER_CUE, ANY_AFTER_CUE, ABSTRACT])
    assert [s.complexity for s in scores] == [1, 1, 2, 3, 5]
    assert all(s.source == "offline" and s.ok and not s.cached for s in scores)
    assert "5 distinct tokens in 5 contexts" in scores[4].explanation


def test_measures():
    assert diversity(ONE_TOKEN.contexts) == 0.0 and diversity(ABSTRACT.contexts) == 1.0
    assert cue(REPEATED.contexts, 3) == 0.0  # copies of the firing token are no context
    assert cue(TOKEN_AFTER_CUE.contexts, 1) == 1.0
    assert cue(ABSTRACT.contexts, 3) == 0.0
    assert diversity(feature(5, ["a b"]).contexts) == 0.0 and cue(feature(5, ["a b"]).contexts, 3) == 0.0


def test_deterministic_and_per_feature():
    a = OfflineScorer().score([ABSTRACT, ONE_TOKEN])
    b = OfflineScorer().score([ONE_TOKEN, ABSTRACT])
    assert [(s.feature, s.complexity, s.explanation) for s in a] == [(s.feature, s.complexity, s.explanation)
                                                                     for s in reversed(b)]


def test_activation_does_not_change_the_score():
    louder = FeatureContexts(9, tuple(Context(c.tokens, c.firing, c.activation * 10) for c in ANY_AFTER_CUE.contexts))
    assert OfflineScorer().score([louder])[0].complexity == 3


def test_no_contexts_is_a_recorded_failure():
    [s] = OfflineScorer().score([FeatureContexts(3, ())])
    assert s.complexity is None and "no contexts" in s.error


def test_bad_input_is_an_error():
    with pytest.raises(CrossjaxError, match="firing=3 must index one of its 2 tokens"):
        Context(("a", "b"), 3, 1.0)
    with pytest.raises(CrossjaxError, match="activation=nan"):
        Context(("a",), 0, float("nan"))
    with pytest.raises(CrossjaxError, match="strings"):
        Context((1, 2), 0, 1.0)
    with pytest.raises(CrossjaxError, match="more than once"):
        OfflineScorer().score([ONE_TOKEN, ONE_TOKEN])
    with pytest.raises(CrossjaxError, match="expected FeatureContexts"):
        OfflineScorer().score([{"feature": 1}])
    with pytest.raises(CrossjaxError, match="preceding=0"):
        OfflineScorer(preceding=0)
