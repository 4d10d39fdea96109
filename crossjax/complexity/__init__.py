"""How complex is a crosscoder feature: scorers that rate a feature's top contexts from 1 to 5, and the
correlation between a feature's emergence step and its complexity (the paper's late-forming features are the
complex ones).

    from crossjax.complexity import FeatureContexts, Context, OfflineScorer, LLMScorer, correlate
    from crossjax.complexity.from_index import feature_contexts, emergence_steps
    contexts = feature_contexts(index, features, tokenizer="snapshots/step143000")   # from a FeatureIndex
    scores = OfflineScorer().score(contexts)                                           # no network
    scores = LLMScorer("openai", "gpt-4o-mini", allow_network=True).score(contexts)   # sends prompts
    correlate(emergence_steps(index), scores)      # {"pearson_r", "pearson_p", "spearman_r", ..., "features"}

Modules: prompts (the 1-5 scale, the prompt, the answer parser), apis (the OpenAI and Anthropic request formats),
transport (one POST with retries and rate limits), cache (answers on disk), llm (LLMScorer), offline
(OfflineScorer and its formula), correlation (correlate), from_index (the FeatureIndex adapter). ``make_scorer``
picks a scorer by name ("offline", "openai", "anthropic"), as a config or command line gives it.

A scorer is any object with ``score(features: list[FeatureContexts]) -> list[Score]`` (one Score per feature, in
order). The data types here are plain: nothing in this package needs JAX, and the LLM scorer uses only the
standard library for HTTP.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import operator
from typing import Protocol, Sequence

from crossjax.errors import CrossjaxError

MIN_COMPLEXITY, MAX_COMPLEXITY = 1, 5


@dataclasses.dataclass(frozen=True)
class Context:
    """One activating context of a feature: its tokens as strings (decoded one by one, spaces kept), the index in
    ``tokens`` of the token the feature fires on, and the activation there."""

    tokens: tuple[str, ...]
    firing: int
    activation: float

    def __post_init__(self):
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if not all(isinstance(t, str) for t in self.tokens):
            raise CrossjaxError(f"Context.tokens must be strings (decoded tokens), got {self.tokens!r}.")
        try:
            firing = None if isinstance(self.firing, bool) else operator.index(self.firing)
        except TypeError:
            firing = None
        if firing is None or not 0 <= firing < len(self.tokens):
            raise CrossjaxError(f"Context.firing={self.firing!r} must index one of its {len(self.tokens)} tokens.")
        object.__setattr__(self, "firing", firing)
        try:
            activation = float(self.activation)
        except (TypeError, ValueError):
            activation = math.nan
        if not math.isfinite(activation):
            raise CrossjaxError(f"Context.activation={self.activation!r} must be a finite number.")
        object.__setattr__(self, "activation", activation)

    @property
    def firing_token(self) -> str:
        return self.tokens[self.firing]


@dataclasses.dataclass(frozen=True)
class FeatureContexts:
    """A feature id and its top contexts (largest activation first, as FeatureIndex.top_examples gives them)."""

    feature: int
    contexts: tuple[Context, ...]

    def __post_init__(self):
        try:
            feature = None if isinstance(self.feature, bool) else operator.index(self.feature)
        except TypeError:
            feature = None
        if feature is None or feature < 0:
            raise CrossjaxError(f"FeatureContexts.feature={self.feature!r} must be a feature id (an integer >= 0).")
        object.__setattr__(self, "feature", feature)
        object.__setattr__(self, "contexts", tuple(self.contexts))
        if not all(isinstance(c, Context) for c in self.contexts):
            raise CrossjaxError(f"FeatureContexts.contexts of feature {self.feature} must be Context objects.")


@dataclasses.dataclass(frozen=True)
class Score:
    """A feature's complexity (1..5; None when scoring failed, ``error`` then says why), the explanation the scorer
    gave, and where it came from: ``source`` names the scorer ("offline", or "<api>:<model>"), ``cached`` says the
    answer was read from the on-disk cache rather than asked for now."""

    feature: int
    complexity: int | None
    explanation: str
    source: str
    cached: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.complexity is not None


class Scorer(Protocol):
    def score(self, features: Sequence[FeatureContexts]) -> list[Score]:
        """One Score per feature, in the order given."""
        ...


def check_features(features, where: str) -> list[FeatureContexts]:
    """The features argument of a scorer as a list, each a FeatureContexts, ids distinct."""
    features = list(features)
    bad = [f for f in features if not isinstance(f, FeatureContexts)]
    if bad:
        raise CrossjaxError(f"{where}: expected FeatureContexts, got {type(bad[0]).__name__}; build them with "
                            "crossjax.complexity.from_index.feature_contexts(index, features).")
    ids = [f.feature for f in features]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise CrossjaxError(f"{where}: features {twice} are given more than once; pass each feature once.")
    return features


def make_scorer(name: str, *, model: str = "", base_url: str = "", key_env: str = "", allow_network: bool = False,
                cache_dir=None, show_progress: bool = True) -> Scorer:
    """A scorer by name, as a config or command line gives it: "offline", or "openai"/"anthropic" (an LLMScorer
    with ``model``; empty strings take the API's defaults for base_url and key_env)."""
    if name == "offline":
        from crossjax.complexity.offline import OfflineScorer
        return OfflineScorer()
    from crossjax.complexity import apis
    from crossjax.complexity.llm import LLMScorer
    if name not in apis.APIS:
        raise CrossjaxError(f"complexity scorer {name!r} is not one of {['offline', *sorted(apis.APIS)]}.")
    return LLMScorer(name, model, base_url=base_url or None, key_env=key_env or None, allow_network=allow_network,
                     cache_dir=cache_dir, show_progress=show_progress)


_LAZY = {
    "OfflineScorer": "crossjax.complexity.offline",
    "LLMScorer": "crossjax.complexity.llm",
    "correlate": "crossjax.complexity.correlation",
}

__all__ = ["Context", "FeatureContexts", "Score", "Scorer", "MIN_COMPLEXITY", "MAX_COMPLEXITY", "make_scorer",
           "check_features", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crossjax.complexity' has no attribute {name!r}")
