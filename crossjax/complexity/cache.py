"""Answers of the LLM scorer on disk, one JSON file per exchange, named by the SHA-256 of (API, model, system
prompt, messages): a rerun with the same prompts reads them back and sends nothing.

    <cache_dir>/<first 2 hex digits>/<sha256>.json   {"api", "model", "system", "messages", "answer"}

Each file is written in one rename (crossjax.files.atomic_write_text), so a killed run leaves whole entries only.
An entry that cannot be read (damaged, or written by something else) counts as absent and is replaced by the next
answer; it is reported, never silently trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from crossjax.console import say
from crossjax.errors import CrossjaxError
from crossjax.files import atomic_write_text


def default_dir() -> Path:
    """$XDG_CACHE_HOME/crossjax/complexity (~/.cache/... when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "crossjax" / "complexity"


def exchange_key(api: str, model: str, system: str, messages: list[dict]) -> str:
    """The SHA-256 naming one exchange: everything the model sees, and which model sees it."""
    text = json.dumps({"api": api, "model": model, "system": system, "messages": messages}, sort_keys=True,
                      ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class AnswerCache:
    def __init__(self, directory: str | os.PathLike, *, stage: str = "complexity"):
        self.dir = Path(directory)
        self.stage = stage
        if self.dir.exists() and not self.dir.is_dir():
            raise CrossjaxError(f"the answer cache {self.dir} is a file: pass a directory as cache_dir.")

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        """The cached answer of this exchange, or None."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            answer = entry["answer"]
            if not isinstance(answer, str):
                raise TypeError("answer is not text")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            say(self.stage, f"cache entry {path} is unreadable ({type(e).__name__}: {e}); asking again and "
                            "replacing it")
            return None
        return answer

    def put(self, key: str, *, api: str, model: str, system: str, messages: list[dict], answer: str) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"api": api, "model": model, "system": system, "messages": messages,
                                                "answer": answer}, ensure_ascii=False, indent=1) + "\n")
        except OSError as e:
            raise CrossjaxError(f"cannot write the answer cache {path} ({e}): pass a writable cache_dir (the "
                                "answers received so far are cached).") from None
