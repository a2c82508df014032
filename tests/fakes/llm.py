"""A local fake of an OpenAI-compatible chat API, for tests that run the real ``openai`` client.

Standard library only: a ``ThreadingHTTPServer`` on 127.0.0.1 in a background thread that
answers ``POST /v1/chat/completions`` (plain JSON, or server-sent events with ``"stream":
true``) after a controllable latency, and records every request.

    with FakeLLM(latency=0.3) as llm:
        client = openai.AsyncOpenAI(base_url=llm.url, api_key="test")
        ...
        llm.wait_for(lambda reqs: len(reqs) == 2)
        assert not llm.overlaps()                 # no two calls for one user at once
        llm.fail_next(status=500)                 # the next call fails
        llm.latency = lambda req: 5.0             # a callable: per request

The default answer is ``"answer to: <the user messages after the last assistant line,
joined by ' + '>"`` (``"checking in"`` for a prompt that ends with a system line), so a
test can read from a reply which messages it answered; ``reply=`` replaces it.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from tests.fakes._http import LoopbackService

__all__ = ["FakeLLM", "Request", "answered_texts"]


@dataclass
class Request:
    """One chat completion request: who (the ``user`` field), the prompt, when."""

    id: int
    user: str | None
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    start: float  # time.monotonic() when it arrived
    end: float | None = None  # when the answer (or the failure) was sent
    status: int = 200
    reply: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def user_texts(self) -> list[str]:
        """The user lines of the prompt, in order."""
        return [str(m.get("content")) for m in self.messages if m.get("role") == "user"]

    @property
    def answering(self) -> list[str]:
        """The user lines after the last assistant line: what this call answers."""
        out: list[str] = []
        for m in self.messages:
            if m.get("role") == "assistant":
                out = []
            elif m.get("role") == "user":
                out.append(str(m.get("content")))
        return out


def default_reply(request: Request) -> str:
    if request.messages and request.messages[-1].get("role") == "system":
        return "checking in"
    return "answer to: " + " + ".join(request.answering)


def answered_texts(reply: str) -> list[str]:
    """The user messages a default reply answered."""
    prefix = "answer to: "
    return reply[len(prefix) :].split(" + ") if reply.startswith(prefix) else []


@dataclass
class _Failure:
    status: int
    times: int
    message: str


Latency = float | Callable[[Request], float]


class FakeLLM(LoopbackService):
    """A fake OpenAI-compatible server; see the module docstring."""

    _thread_name = "fake-llm"

    def __init__(
        self,
        *,
        latency: Latency = 0.0,
        reply: Callable[[Request], str] = default_reply,
        model: str = "fake-model",
    ) -> None:
        self.latency: Latency = latency
        self.reply = reply
        self.model = model
        self.requests: list[Request] = []
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._failures: list[_Failure] = []
        self._closed = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        fake = self

        class Handler(_Handler):
            owner = fake

        return self._serve(_Server(("127.0.0.1", 0), Handler))

    def close(self) -> None:
        self._closed.set()
        self._stop()

    @property
    def url(self) -> str:
        """The base URL for the client, e.g. http://127.0.0.1:41234/v1."""
        return f"{self._origin()}/v1"

    # -- control -------------------------------------------------------------------------

    def fail_next(self, *, status: int = 500, times: int = 1, message: str = "boom") -> None:
        """The next ``times`` requests fail with ``status`` (after their latency)."""
        with self._cond:
            self._failures.append(_Failure(status, times, message))

    def _take_failure(self) -> _Failure | None:
        with self._cond:
            if not self._failures:
                return None
            failure = self._failures[0]
            failure.times -= 1
            if failure.times <= 0:
                self._failures.pop(0)
            return failure

    # -- reading -------------------------------------------------------------------------

    def for_user(self, user: int | str) -> list[Request]:
        with self._cond:
            return [r for r in self.requests if r.user == str(user)]

    def overlaps(self, user: int | str | None = None) -> list[tuple[Request, Request]]:
        """Pairs of calls for one user whose [start, end] intervals overlap (should be [])."""
        with self._cond:
            reqs = list(self.requests)
        by_user: dict[str | None, list[Request]] = {}
        for r in reqs:
            if user is None or r.user == str(user):
                by_user.setdefault(r.user, []).append(r)
        found = []
        for calls in by_user.values():
            calls.sort(key=lambda r: r.start)
            for a, b in itertools.pairwise(calls):
                if a.end is None or b.start < a.end:
                    found.append((a, b))
        return found

    def wait_for(self, predicate: Callable[[list[Request]], Any], timeout: float = 5.0) -> Any:
        """Block until ``predicate(requests)`` is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = predicate(list(self.requests))
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"condition on llm.requests not met within {timeout}s; "
                        f"recorded: {[(r.user, r.answering, r.status) for r in self.requests]}"
                    )
                self._cond.wait(min(left, 0.05))

    # -- serving -------------------------------------------------------------------------

    def _handle(self, body: dict[str, Any]) -> tuple[Request, _Failure | None]:
        request = Request(
            id=next(self._ids),
            user=None if body.get("user") is None else str(body["user"]),
            model=str(body.get("model", "")),
            messages=list(body.get("messages") or []),
            stream=bool(body.get("stream")),
            start=time.monotonic(),
        )
        with self._cond:
            self.requests.append(request)
            self._cond.notify_all()
        latency = self.latency(request) if callable(self.latency) else self.latency
        if latency > 0:
            self._closed.wait(latency)
        failure = self._take_failure()
        if failure is None:
            request.reply = self.reply(request)
        else:
            request.status = failure.status
        return request, failure

    def _finish(self, request: Request) -> None:
        with self._cond:
            request.end = time.monotonic()
            self._cond.notify_all()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that went away
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    owner: FakeLLM
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._json(400, {"error": {"message": "bad JSON", "type": "invalid_request_error"}})
            return
        owner = self.owner
        request, failure = owner._handle(body)
        try:
            if failure is not None:
                self._json(
                    failure.status,
                    {"error": {"message": failure.message, "type": "server_error", "code": None}},
                )
            elif request.stream:
                self._stream(request)
            else:
                self._json(200, self._completion(request))
        finally:
            owner._finish(request)

    def _completion(self, request: Request) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{request.id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model or self.owner.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": request.reply},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    def _stream(self, request: Request) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        text = request.reply or ""
        pieces = [text[i : i + 16] for i in range(0, len(text), 16)] or [""]
        base = {
            "id": f"chatcmpl-{request.id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": request.model or self.owner.model,
        }
        for i, piece in enumerate(pieces):
            delta: dict[str, Any] = {"content": piece}
            if i == 0:
                delta["role"] = "assistant"
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        self.wfile.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
        self.wfile.flush()
        self.close_connection = True
