"""The two HTTP dialects the LLM scorer speaks: where a request goes, its headers and body, and where the answer
text sits in the reply.

- "openai": the OpenAI-compatible chat completions API, POST {base_url}/chat/completions with a bearer key
  (OpenAI itself, and servers that copy it: vLLM, llama.cpp, Ollama, OpenRouter, ...).
- "anthropic": the Anthropic Messages API, POST {base_url}/v1/messages with x-api-key and anthropic-version.

A conversation is a system text plus messages [{"role": "user"|"assistant", "content": str}, ...].
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from crossjax.errors import CrossjaxError

ANTHROPIC_VERSION = "2023-06-01"


class ReplyError(ValueError):
    """A 200 reply whose body lacks the answer text where the API puts it."""


@dataclasses.dataclass(frozen=True)
class Api:
    name: str
    default_base_url: str
    default_key_env: str
    path: str  # appended to base_url
    headers: Callable[[str], dict[str, str]]  # key -> headers
    body: Callable[..., dict[str, Any]]  # (model, system, messages, max_tokens, temperature) -> JSON body
    answer_text: Callable[[Any], str]  # reply JSON -> the model's text

    def url(self, base_url: str) -> str:
        return base_url.rstrip("/") + self.path


def _openai_body(model, system, messages, max_tokens, temperature):
    return {"model": model, "messages": [{"role": "system", "content": system}, *messages],
            "max_tokens": max_tokens, "temperature": temperature}


def _openai_text(reply) -> str:
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ReplyError("the reply has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise ReplyError(f"choices[0].message.content is {type(content).__name__}, not text")
    return content


def _anthropic_body(model, system, messages, max_tokens, temperature):
    return {"model": model, "system": system, "messages": list(messages), "max_tokens": max_tokens,
            "temperature": temperature}


def _anthropic_text(reply) -> str:
    blocks = reply.get("content") if isinstance(reply, dict) else None
    if not isinstance(blocks, list):
        raise ReplyError("the reply has no content list")
    texts = [b["text"] for b in blocks
             if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)]
    if not texts:
        raise ReplyError("the reply's content holds no text block")
    return "".join(texts)


OPENAI = Api(
    name="openai", default_base_url="https://api.openai.com/v1", default_key_env="OPENAI_API_KEY",
    path="/chat/completions",
    headers=lambda key: {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    body=_openai_body, answer_text=_openai_text)

ANTHROPIC = Api(
    name="anthropic", default_base_url="https://api.anthropic.com", default_key_env="ANTHROPIC_API_KEY",
    path="/v1/messages",
    headers=lambda key: {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION, "Content-Type": "application/json"},
    body=_anthropic_body, answer_text=_anthropic_text)

APIS = {a.name: a for a in (OPENAI, ANTHROPIC)}


def get(name: str) -> Api:
    if name not in APIS:
        raise CrossjaxError(f"api={name!r} is not one of {sorted(APIS)}: 'openai' for OpenAI-compatible chat "
                            "completions servers, 'anthropic' for the Anthropic Messages API.")
    return APIS[name]
