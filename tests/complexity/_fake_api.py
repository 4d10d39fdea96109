"""A fake LLM API on 127.0.0.1 (http.server in a thread) that speaks the OpenAI chat completions or the Anthropic
Messages format, serves a script of replies (errors, delays, malformed answers) and records every request; and
features built from short texts."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from crossjax.complexity import Context, FeatureContexts

GOOD = json.dumps({"explanation": "the token 'cat'", "complexity": 3})


def reply(text: str = GOOD):
    """A 200 reply whose answer text is `text`, in the server's dialect."""
    return ("reply", text)


def error(status: int, headers: dict | None = None, body: dict | None = None):
    return ("error", status, headers or {}, body or {"error": {"message": f"fake error {status}"}})


def slow(seconds: float, then=None):
    """Wait `seconds` before answering (longer than the client's timeout: a timed-out request)."""
    return ("slow", seconds, then or reply())


def _wrap(dialect: str, text: str) -> dict:
    if dialect == "openai":
        return {"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
    return {"id": "x", "type": "message", "role": "assistant", "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn"}


class FakeApi:
    def __init__(self, dialect: str):
        self.dialect = dialect
        self.script: list = []  # served in order; when empty, every request gets reply()
        self.requests: list[dict] = []  # {"path", "headers", "body", "time"}
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                          "time": time.monotonic()})
                    step = fake.script.pop(0) if fake.script else reply()
                try:
                    self._serve(step)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def _serve(self, step):
                if step[0] == "slow":
                    time.sleep(step[1])
                    step = step[2]
                if step[0] == "reply":
                    status, headers, payload = 200, {}, _wrap(fake.dialect, step[1])
                else:
                    _, status, headers, payload = step
                data = json.dumps(payload).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        # OpenAI-compatible servers put the API under /v1; the Anthropic path carries its own /v1
        return f"http://127.0.0.1:{self.port}" + ("/v1" if self.dialect == "openai" else "")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def feature(feature: int, texts: list[str], firing: int = -1, activation: float = 2.0) -> FeatureContexts:
    """A feature from texts split at spaces (tokens after the first keep their leading space, as decoded BPE
    tokens do), firing on token `firing` of each (default: the last)."""
    cs = []
    for t in texts:
        words = t.split()
        toks = [w if i == 0 else " " + w for i, w in enumerate(words)]
        cs.append(Context(tuple(toks), firing % len(toks), activation))
    return FeatureContexts(feature, tuple(cs))
