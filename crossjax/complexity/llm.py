"""The LLM scorer: each feature's top contexts go to a chat model (OpenAI-compatible or Anthropic API) that
answers with an explanation and a 1-5 complexity score as JSON (prompts.py holds the prompt and the scale).

    scorer = LLMScorer("anthropic", "claude-haiku-4-5", allow_network=True)     # key from $ANTHROPIC_API_KEY
    scorer = LLMScorer("openai", "llama3", base_url="http://127.0.0.1:8000/v1", key_env="LOCAL_KEY",
                       allow_network=True)
    scores = scorer.score(contexts)

Nothing leaves the machine unless ``allow_network=True``: every answer is first looked up in the on-disk cache
(cache.py), a line says how many prompts would go to which host and how many are cached, and without the flag a
feature that needs the network is an error naming the flag. Per feature: one prompt; an unusable answer
(malformed JSON, a score outside 1..5) gets one follow-up with a firmer instruction, then is recorded as a failed
Score (complexity None, error set), never an exception. HTTP retries and rate limits: transport.py. A bad key,
model or URL (4xx) stops the run at once with a CrossjaxError, as do max_consecutive_failures prompts in a row
without an answer; answers already received stay cached, so a rerun sends only the rest.
"""
from __future__ import annotations

import ipaddress
import os
import urllib.parse
from typing import Sequence

from crossjax.complexity import FeatureContexts, Score, apis, check_features, prompts
from crossjax.complexity.cache import AnswerCache, default_dir, exchange_key
from crossjax.complexity.transport import Rejected, RetryPolicy, SendFailed, post_json
from crossjax.console import progress, say
from crossjax.errors import CrossjaxError

STAGE = "complexity"


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LLMScorer:
    """Scores features with a chat model. api: "openai" or "anthropic"; model: the API's model name.

    base_url: the API root (default https://api.openai.com/v1 or https://api.anthropic.com); key_env: the
    environment variable holding the key (default OPENAI_API_KEY or ANTHROPIC_API_KEY), read only when something
    is sent; cache_dir: where answers are kept (default $XDG_CACHE_HOME/crossjax/complexity).
    """

    def __init__(self, api: str, model: str, *, base_url: str | None = None, key_env: str | None = None,
                 allow_network: bool = False, cache_dir: str | os.PathLike | None = None, max_tokens: int = 300,
                 temperature: float = 0.0, retry: RetryPolicy | None = None, max_consecutive_failures: int = 3,
                 show_progress: bool = True):
        self.api = apis.get(api)
        if not isinstance(model, str) or not model.strip():
            raise CrossjaxError(f"model={model!r}: name the {api} model that scores the features, e.g. "
                                "LLMScorer('openai', 'gpt-4o-mini').")
        self.model = model.strip()
        self.base_url = (base_url or self.api.default_base_url).rstrip("/")
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CrossjaxError(f"base_url={base_url!r} is not an http(s) URL: give the API root, e.g. "
                                f"{self.api.default_base_url}.")
        self.host, self._plain_http_remote = parts.netloc, parts.scheme == "http" and not _is_loopback(parts.hostname)
        self.key_env = key_env or self.api.default_key_env
        if not isinstance(self.key_env, str) or not self.key_env.strip():
            raise CrossjaxError(f"key_env={key_env!r} must name an environment variable.")
        if not isinstance(allow_network, bool):
            raise CrossjaxError(f"allow_network={allow_network!r} must be True or False.")
        self.allow_network = allow_network
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 16:
            raise CrossjaxError(f"max_tokens={max_tokens!r} must be an integer >= 16 (room for the JSON answer).")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise CrossjaxError(f"temperature={temperature!r} must be a number in [0, 2].")
        if isinstance(max_consecutive_failures, bool) or not isinstance(max_consecutive_failures, int) \
                or max_consecutive_failures < 1:
            raise CrossjaxError(f"max_consecutive_failures={max_consecutive_failures!r} must be an integer >= 1.")
        self.max_tokens, self.temperature = max_tokens, float(temperature)
        self.retry = retry or RetryPolicy()
        self.max_consecutive_failures = max_consecutive_failures
        self.cache = AnswerCache(default_dir() if cache_dir is None else cache_dir, stage=STAGE)
        self.show_progress = show_progress
        self.source = f"{self.api.name}:{self.model}"

    # ---- the public call -----------------------------------------------------------------------------------

    def score(self, features: Sequence[FeatureContexts]) -> list[Score]:
        """One Score per feature, in order: from the cache, else (allow_network=True only) from the API."""
        features = check_features(features, "LLMScorer.score")
        scores: list[Score | None] = [self._score_one(f, key=None) for f in features]  # the cache alone
        todo = [i for i, s in enumerate(scores) if s is None]
        cached = sum(1 for s in scores if s is not None and s.cached)
        say(STAGE, f"{len(todo)} prompts to send to {self.host} ({self.api.name} API, model {self.model}), one per "
                   f"feature not in the cache (an unusable answer adds one follow-up); {cached} of {len(features)} "
                   f"features answered from the cache {self.cache.dir}")
        if todo and not self.allow_network:
            raise CrossjaxError(
                f"{len(todo)} features are not in the answer cache and sending is off: pass allow_network=True "
                f"(--allow_network on the command line) to send their prompts to {self.host}, or score offline "
                "with crossjax.complexity.OfflineScorer.")
        if not todo:
            return scores
        key = self._key()
        if self._plain_http_remote:
            say(STAGE, f"warning: {self.base_url} is plain http to another machine: the key in ${self.key_env} "
                       "travels unencrypted")
        in_a_row = 0
        with progress(STAGE, total=len(todo), unit="feature", enabled=self.show_progress) as bar:
            for i in todo:
                try:
                    scores[i] = self._score_one(features[i], key=key)
                    in_a_row = 0
                except SendFailed as e:
                    in_a_row += 1
                    scores[i] = self._failed(features[i], f"no answer from the API: {e}")
                    if in_a_row >= self.max_consecutive_failures:
                        raise CrossjaxError(
                            f"{in_a_row} features in a row got no answer from {self.host} (last: {e}). Answers "
                            f"received so far are cached in {self.cache.dir}: rerun later and only the rest is "
                            "sent, or allow more retries with retry=RetryPolicy(...).") from None
                except apis.ReplyError as e:
                    scores[i] = self._failed(features[i], f"unusable reply from {self.host}: {e}")
                except Rejected as e:
                    raise CrossjaxError(self._rejected(e)) from None
                bar.update(1)
        failed = sum(1 for s in scores if not s.ok)
        if failed:
            say(STAGE, f"{failed} of {len(features)} features could not be scored (Score.error says why)")
        return scores

    # ---- one feature ---------------------------------------------------------------------------------------

    def _score_one(self, feature: FeatureContexts, *, key: str | None) -> Score | None:
        """The feature's Score; None when key is None (cache only) and an answer it needs is not cached."""
        if not feature.contexts:
            return self._failed(feature, "no contexts to show: the feature never fired on the scanned rows")
        messages = [{"role": "user", "content": prompts.describe(feature)}]
        answer, from_cache = self._answer(messages, key)
        if answer is None:
            return None
        try:
            return self._scored(feature, prompts.parse_answer(answer), from_cache)
        except prompts.AnswerError as first:
            messages = [*messages, {"role": "assistant", "content": answer.strip() or "(no answer)"},
                        {"role": "user", "content": prompts.firmer(str(first))}]
            again, again_cached = self._answer(messages, key)
            if again is None:
                return None
            try:
                return self._scored(feature, prompts.parse_answer(again), from_cache and again_cached)
            except prompts.AnswerError as second:
                return self._failed(feature, f"unusable answer ({first}), and again after a firmer instruction "
                                             f"({second})", cached=from_cache and again_cached)

    def _answer(self, messages: list[dict], key: str | None) -> tuple[str | None, bool]:
        """(answer text, whether it came from the cache); (None, False) on a cache miss without a key."""
        cache_key = exchange_key(self.api.name, self.model, prompts.SYSTEM, messages)
        hit = self.cache.get(cache_key)
        if hit is not None:
            return hit, True
        if key is None:
            return None, False
        body = self.api.body(self.model, prompts.SYSTEM, messages, self.max_tokens, self.temperature)
        reply = post_json(self.api.url(self.base_url), self.api.headers(key), body, self.retry, stage=STAGE)
        text = self.api.answer_text(reply)
        self.cache.put(cache_key, api=self.api.name, model=self.model, system=prompts.SYSTEM, messages=messages,
                       answer=text)
        return text, False

    def _scored(self, feature: FeatureContexts, parsed: tuple[int, str], cached: bool) -> Score:
        complexity, explanation = parsed
        return Score(feature.feature, complexity, explanation, self.source, cached=cached)

    def _failed(self, feature: FeatureContexts, why: str, *, cached: bool = False) -> Score:
        return Score(feature.feature, None, "", self.source, cached=cached, error=why)

    # ---- keys and refusals ---------------------------------------------------------------------------------

    def _key(self) -> str:
        key = os.environ.get(self.key_env, "").strip()
        if not key:
            raise CrossjaxError(f"no API key: the {self.api.name} scorer reads it from the environment variable "
                                f"{self.key_env}, which is not set; export {self.key_env}=<your key> (or name "
                                "another variable with key_env=...).")
        return key

    def _rejected(self, e: Rejected) -> str:
        kept = f"Answers received so far are cached in {self.cache.dir}."
        if e.status in (401, 403):
            return (f"{self.host} refused the key in ${self.key_env} ({e}): set {self.key_env} to a valid "
                    f"{self.api.name} API key. {kept}")
        return (f"{self.host} rejected the request ({e}): check model={self.model!r} and base_url={self.base_url!r} "
                f"(requests go to {self.api.url(self.base_url)}). {kept}")
