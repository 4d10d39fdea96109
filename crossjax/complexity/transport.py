"""One JSON POST with the retry rules of the LLM scorer, on the standard library alone (urllib.request).

- 5xx, 408, timeouts, refused or dropped connections: retried after backoff_s * 2**attempt (capped at
  max_backoff_s), max_retries times, then SendFailed.
- 429: retried after the server's Retry-After (seconds or an HTTP date) when it sends one, else after the same
  backoff; a Retry-After longer than max_retry_after_s gives up at once (SendFailed) rather than sleep for it.
- any other 4xx: Rejected at once (a bad key, model or URL fails the same way on every retry).
- a 200 reply that is not JSON: ReplyError.
"""
from __future__ import annotations

import dataclasses
import email.utils
import http.client
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from typing import Any

from crossjax.complexity.apis import ReplyError
from crossjax.console import say
from crossjax.errors import CrossjaxError

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504, 529})  # 529: Anthropic's "overloaded"


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    timeout_s: float = 60.0  # per attempt, connect and read
    max_retries: int = 5  # attempts after the first
    backoff_s: float = 1.0  # first wait; doubles with each retry
    max_backoff_s: float = 60.0
    max_retry_after_s: float = 300.0  # the longest Retry-After honoured by waiting

    def __post_init__(self):
        numbers = {"timeout_s": self.timeout_s, "backoff_s": self.backoff_s, "max_backoff_s": self.max_backoff_s,
                   "max_retry_after_s": self.max_retry_after_s}
        bad = [f"{k}={v!r}" for k, v in numbers.items()
               if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0]
        if self.timeout_s == 0:
            bad.append("timeout_s=0")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            bad.append(f"max_retries={self.max_retries!r}")
        if bad:
            raise CrossjaxError(f"RetryPolicy({', '.join(bad)}): timeout_s must be > 0, the other times >= 0 "
                                "seconds, max_retries an integer >= 0.")


class SendFailed(Exception):
    """The request did not get an answer: retries used up, or a rate limit longer than the policy waits."""


class Rejected(Exception):
    """The server refused the request with a 4xx that retrying cannot fix."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A Retry-After header (delay in seconds, or an HTTP date) as seconds from now; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)


def _detail(error: urllib.error.HTTPError) -> str:
    """The server's own words for an error reply, shortened (JSON error bodies: their message)."""
    try:
        raw = error.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        raw = ""
    try:
        body = json.loads(raw)
        message = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(message, dict):
            message = message.get("message", message)
        raw = str(message)
    except json.JSONDecodeError:
        pass
    return " ".join(raw.split())[:300] or str(error.reason)


def post_json(url: str, headers: dict[str, str], body: Any, policy: RetryPolicy, *, stage: str = "complexity") -> Any:
    """POST body as JSON to url and return the reply's JSON, retrying as the module docstring says."""
    host = urllib.parse.urlsplit(url).netloc
    data = json.dumps(body).encode()
    last = ""
    for attempt in range(policy.max_retries + 1):
        wait = None
        try:
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=policy.timeout_s) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as e:
            detail = _detail(e)
            if e.code not in RETRY_STATUS:
                raise Rejected(e.code, detail) from None
            last = f"HTTP {e.code} from {host}: {detail}"
            if e.code == 429:
                wait = retry_after_seconds(e.headers.get("Retry-After"))
                if wait is not None and wait > policy.max_retry_after_s:
                    raise SendFailed(f"{host} is rate limiting and asks to wait {wait:.0f} s, more than "
                                     f"max_retry_after_s={policy.max_retry_after_s:g}") from None
        except urllib.error.URLError as e:
            timed_out = isinstance(e.reason, TimeoutError)
            last = f"no answer from {host} within {policy.timeout_s:g} s" if timed_out else \
                f"cannot reach {host}: {e.reason}"
        except TimeoutError:
            last = f"no answer from {host} within {policy.timeout_s:g} s"
        except (OSError, http.client.HTTPException) as e:  # connection reset, dropped mid-reply
            last = f"the connection to {host} failed: {type(e).__name__}: {e}"
        else:
            try:
                return json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ReplyError(f"{host} answered 200 with a body that is not JSON: {raw[:200]!r}") from None
        if attempt == policy.max_retries:
            break
        if wait is None:
            wait = min(policy.backoff_s * 2 ** attempt, policy.max_backoff_s)
        say(stage, f"{last}; retrying in {wait:.3g} s (attempt {attempt + 2} of {policy.max_retries + 1})")
        time.sleep(wait)
    raise SendFailed(f"{last} (gave up after {policy.max_retries + 1} attempts)")
