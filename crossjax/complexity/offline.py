"""A deterministic complexity score computed from a feature's contexts alone, for tests and offline runs.

Two measures over the n contexts (tokens compared after stripping spaces and lowercasing, so " The" and "the" are
one token, as on the paper's scale where level 1 is a single token up to case and spacing):

- diversity D = (u - 1) / (n - 1), u the number of distinct firing tokens (0 with one context): 0 when the feature
  fires on one token, 1 when every context fires on a different one.
- cue A = how far the contexts agree on a token before the firing one: at each offset 1..`preceding` before it,
  (m - 1) / (n - 1) with m the number of contexts holding that offset's most common token (copies of the firing
  token itself do not count: repeating a token is no context), and A the largest over the offsets (0 with one
  context). A token feature with unrelated surroundings, or a repeated token, has A near 0; a feature that fires
  after one cue word ("York" after "New", anything after "of the") has A near 1.

    c = D * (1 - A / 2) + (1 - D) * A / 4          in [0, 1]
    complexity = floor(1 + 4c + 1/2)               in 1..5

so one token in unrelated contexts scores 1, one token behind a fixed cue 2, many tokens behind a fixed cue 3, and
many tokens in unrelated contexts 5 (an abstract feature, or a polysemantic one: this proxy cannot tell them
apart, which is why the LLM scorer exists).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from crossjax.complexity import MAX_COMPLEXITY, MIN_COMPLEXITY, Context, FeatureContexts, Score, check_features
from crossjax.errors import CrossjaxError

SOURCE = "offline"


def _norm(token: str) -> str:
    return token.strip().lower() or token  # a token of whitespace alone keeps its own form


def diversity(contexts: Sequence[Context]) -> float:
    """D: (distinct firing tokens - 1) / (contexts - 1), 0 for one context."""
    if len(contexts) < 2:
        return 0.0
    distinct = len({_norm(c.firing_token) for c in contexts})
    return (distinct - 1) / (len(contexts) - 1)


def cue(contexts: Sequence[Context], preceding: int) -> float:
    """A: the largest agreement (m - 1) / (n - 1) on one token at an offset 1..preceding before the firing one."""
    n = len(contexts)
    if n < 2:
        return 0.0
    best = 0
    for offset in range(1, preceding + 1):
        seen = Counter(_norm(c.tokens[c.firing - offset]) for c in contexts
                       if c.firing - offset >= 0 and _norm(c.tokens[c.firing - offset]) != _norm(c.firing_token))
        best = max(best, max(seen.values(), default=0))
    return max(0, best - 1) / (n - 1)


class OfflineScorer:
    """Scores from the contexts themselves (module docstring); `preceding`: how many tokens before the firing
    one count as the feature's context."""

    def __init__(self, preceding: int = 3):
        if isinstance(preceding, bool) or not isinstance(preceding, int) or preceding < 1:
            raise CrossjaxError(f"preceding={preceding!r} must be an integer >= 1 (tokens before the firing one).")
        self.preceding = preceding

    def score(self, features: Sequence[FeatureContexts]) -> list[Score]:
        return [self._score_one(f) for f in check_features(features, "OfflineScorer.score")]

    def _score_one(self, feature: FeatureContexts) -> Score:
        contexts = feature.contexts
        if not contexts:
            return Score(feature.feature, None, "", SOURCE,
                         error="no contexts to score: the feature never fired on the scanned rows")
        d, a = diversity(contexts), cue(contexts, self.preceding)
        c = d * (1 - a / 2) + (1 - d) * a / 4
        complexity = min(MAX_COMPLEXITY, max(MIN_COMPLEXITY, math.floor(1 + 4 * c + 0.5)))
        distinct = len({_norm(x.firing_token) for x in contexts})
        explanation = (f"fires on {distinct} distinct token{'s' if distinct != 1 else ''} in {len(contexts)} "
                       f"context{'s' if len(contexts) != 1 else ''} (diversity {d:.2f}); shared cue within "
                       f"{self.preceding} tokens before it {a:.2f}; c = {c:.2f}")
        return Score(feature.feature, complexity, explanation, SOURCE)
