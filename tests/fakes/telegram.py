"""A local fake of the Telegram Bot API, for tests that run real aiogram or python-telegram-bot.

Standard library only: a `ThreadingHTTPServer` on 127.0.0.1 in a background thread, speaking the
Bot API's wire format (`POST /bot<token>/<method>`, JSON, urlencoded or multipart bodies; answers
`{"ok": true, "result": ...}` or `{"ok": false, "error_code": ..., "description": ...}`).

    with FakeTelegram() as tg:
        # aiogram:  Bot(tg.token, session=AiohttpSession(api=TelegramAPIServer.from_base(tg.url)))
        # PTB:      Application.builder().token(tg.token).base_url(f"{tg.url}/bot")
        update_id = tg.send_text(user_id=1, text="hi")
        tg.wait_for(lambda sent: len(sent) == 1)        # from a thread or a sync test
        await tg.wait_for_async(lambda sent: len(sent) == 1)   # from the bot's event loop
        tg.redeliver(update_id)                         # the same update once more

Updates reach the bot by long polling (`getUpdates` with `offset`/`timeout`; an update stays
pending until a later `offset` confirms it, as Telegram does) or, once the bot has called
`setWebhook`, by POSTs to its webhook URL from one delivery thread, in order
(`post_update(update_id, url=...)` does one POST by hand and returns the HTTP status).

Making updates: `send_text(user_id, text, chat_id=None)` (a group when `chat_id` differs),
`send_callback(user_id, data)`, `send_update({...})` for any other kind; each returns its
update_id, and `redeliver(update_id)` hands the same update out once more.

What the bot did: `sent` (sendMessage), `actions` (sendChatAction), `edits`
(editMessageText) and `calls` (everything but getUpdates) are lists of `Call` (method,
params, at = time.monotonic(), chat_id, text, message_id, action); `polls` counts getUpdates
calls, `pending` lists unconfirmed update_ids, `webhook_posts` holds (update_id, status).

Failures: `fail_next(method, status=429, retry_after=1, times=1)` answers the next calls of a
method with Telegram's error body (`parameters.retry_after` for 429). An unknown method gets
a 404 whose description names it.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import itertools
import json
import secrets
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from tests.fakes._http import LoopbackService

__all__ = ["Call", "FakeTelegram"]

BOT_ID = 424242
BOT_USERNAME = "inturn_fake_bot"
_MAX_POLL_TIMEOUT = 50.0


@dataclass(frozen=True)
class Call:
    """One recorded Bot API call the bot made (sendMessage, sendChatAction, editMessageText...)."""

    method: str
    params: dict[str, Any]
    at: float  # time.monotonic() when the fake received it
    chat_id: int | str | None = None
    text: str | None = None
    message_id: int | None = None  # the sent message's id (sendMessage) or the edited one
    action: str | None = None  # sendChatAction's action


@dataclass
class _Failure:
    status: int
    description: str
    retry_after: int | None
    times: int


@dataclass
class _Pending:
    update: dict[str, Any]
    # A redelivery is handed out once whatever the offset says (a bot restarted before it
    # confirmed, or a webhook retry); an ordinary update stays until an offset confirms it.
    forced: bool = False
    seq: int = field(default=0)


def _coerce(value: Any) -> Any:
    """Form fields arrive as strings; numbers, booleans and JSON objects are JSON-encoded."""
    if not isinstance(value, str):
        return value
    stripped = value.strip()
    if stripped[:1] in "{[" or stripped in {"true", "false", "null"}:
        try:
            return json.loads(stripped)
        except ValueError:
            return value
    if stripped.lstrip("-").isdigit():
        return int(stripped)
    return value


def _parse_body(content_type: str, body: bytes, query: str) -> dict[str, Any]:
    params: dict[str, Any] = {k: _coerce(v) for k, v in urllib.parse.parse_qsl(query)}
    ctype = content_type.split(";")[0].strip().lower()
    if not body:
        return params
    if ctype == "application/json":
        loaded = json.loads(body)
        if isinstance(loaded, dict):
            params.update(loaded)
    elif ctype == "application/x-www-form-urlencoded":
        text = body.decode("utf-8")
        params.update({k: _coerce(v) for k, v in urllib.parse.parse_qsl(text)})
    elif ctype == "multipart/form-data":
        head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if not isinstance(name, str):
                continue
            payload = part.get_payload(decode=True)
            raw = payload if isinstance(payload, bytes) else b""
            if part.get_filename() is not None:
                params[name] = raw  # an uploaded file: kept as bytes
            else:
                params[name] = _coerce(raw.decode("utf-8"))
    return params


class FakeTelegram(LoopbackService):
    """A fake Bot API server for one bot token; see the module docstring."""

    _thread_name = "fake-telegram"

    def __init__(self, token: str | None = None) -> None:
        self.token = token or f"{BOT_ID}:{secrets.token_urlsafe(24)}"
        self._cond = threading.Condition()
        self._update_ids = itertools.count(1000)
        self._message_ids = itertools.count(1)
        self._seq = itertools.count()
        self._pending: list[_Pending] = []
        self._failures: dict[str, list[_Failure]] = {}
        self._closed = False
        self.updates: dict[int, dict[str, Any]] = {}  # every update made, by update_id
        self.calls: list[Call] = []  # every call, in arrival order (getUpdates excluded)
        self.sent: list[Call] = []
        self.actions: list[Call] = []
        self.edits: list[Call] = []
        self.webhook_url: str | None = None
        self.webhook_secret: str | None = None
        self.polls = 0  # getUpdates calls served
        self.webhook_posts: list[tuple[int, int]] = []  # (update_id, HTTP status) per POST
        self._outbox: list[tuple[int, str]] = []
        self._poster: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        fake = self

        class Handler(_Handler):
            owner = fake

        return self._serve(_Server(("127.0.0.1", 0), Handler))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._stop()

    @property
    def url(self) -> str:
        """The server's base URL, e.g. http://127.0.0.1:41234 (API calls go to /bot<token>/...)."""
        return self._origin()

    @property
    def bot_user(self) -> dict[str, Any]:
        return {
            "id": BOT_ID,
            "is_bot": True,
            "first_name": "Fake",
            "username": BOT_USERNAME,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }

    # -- making updates ------------------------------------------------------------------

    @staticmethod
    def _user(user_id: int) -> dict[str, Any]:
        return {"id": user_id, "is_bot": False, "first_name": f"User{user_id}"}

    @staticmethod
    def _chat(chat_id: int, user_id: int) -> dict[str, Any]:
        if chat_id == user_id:
            return {"id": chat_id, "type": "private", "first_name": f"User{user_id}"}
        return {"id": chat_id, "type": "group", "title": f"Group{chat_id}"}

    def send_text(self, user_id: int, text: str, *, chat_id: int | None = None) -> int:
        """A user's text message (private chat unless `chat_id` names a group); its update_id."""
        chat = chat_id if chat_id is not None else user_id
        message = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": self._chat(chat, user_id),
            "from": self._user(user_id),
            "text": text,
        }
        if text.startswith("/"):
            command = text.split()[0]
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command)}]
        return self.send_update({"message": message})

    def send_callback(
        self, user_id: int, data: str, *, chat_id: int | None = None, message_id: int = 1
    ) -> int:
        """A press on an inline button carrying `data`; its update_id."""
        chat = chat_id if chat_id is not None else user_id
        query = {
            "id": secrets.token_hex(8),
            "from": self._user(user_id),
            "chat_instance": str(chat),
            "data": data,
            "message": {
                "message_id": message_id,
                "date": int(time.time()),
                "chat": self._chat(chat, user_id),
                "from": self.bot_user,
                "text": "...",
            },
        }
        return self.send_update({"callback_query": query})

    def send_update(self, update: dict[str, Any]) -> int:
        """Queue any update (without `update_id`; one is given); returns the update_id."""
        update_id = next(self._update_ids)
        full = {"update_id": update_id, **update}
        with self._cond:
            self.updates[update_id] = full
        self._deliver(full, forced=False)
        return update_id

    def redeliver(self, update_id: int) -> None:
        """Deliver the same update once more: a re-polled update or a webhook retry."""
        with self._cond:
            update = self.updates[update_id]
        self._deliver(update, forced=True)

    def _deliver(self, update: dict[str, Any], *, forced: bool) -> None:
        with self._cond:
            webhook = self.webhook_url
            if webhook is None:
                self._pending.append(_Pending(update, forced=forced, seq=next(self._seq)))
                self._cond.notify_all()
                return
        # One delivery thread POSTs in order, each after the previous answer (a webhook with
        # max_connections=1): updates reach the bot in the order they were made.
        with self._cond:
            self._outbox.append((update["update_id"], webhook))
            if self._poster is None or not self._poster.is_alive():
                self._poster = threading.Thread(
                    target=self._post_outbox, name="fake-telegram-webhook", daemon=True
                )
                self._poster.start()

    def _post_outbox(self) -> None:
        while True:
            with self._cond:
                if not self._outbox or self._closed:
                    self._poster = None
                    return
                update_id, url = self._outbox.pop(0)
            try:
                self.post_update(update_id, url=url)
            except OSError:  # the bot's server is gone; Telegram would retry, the fake drops it
                with self._cond:
                    self.webhook_posts.append((update_id, 0))

    def post_update(
        self, update_id: int, *, url: str | None = None, secret_token: str | None = None
    ) -> int:
        """POST an update to a webhook (`url`, else the one the bot set); the HTTP status."""
        target = url or self.webhook_url
        if target is None:
            raise RuntimeError("no webhook URL: pass url= or let the bot call setWebhook")
        with self._cond:
            update = self.updates[update_id]
        secret = secret_token if secret_token is not None else self.webhook_secret
        headers = {"Content-Type": "application/json"}
        if secret:
            headers["X-Telegram-Bot-Api-Secret-Token"] = secret
        request = urllib.request.Request(
            target, data=json.dumps(update).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            status = exc.code
        with self._cond:
            self.webhook_posts.append((update_id, status))
            self._cond.notify_all()
        return status

    @property
    def pending(self) -> list[int]:
        """update_ids not yet confirmed by the bot's offset (long polling)."""
        with self._cond:
            return [p.update["update_id"] for p in self._pending]

    # -- failures ------------------------------------------------------------------------

    def fail_next(
        self,
        method: str,
        *,
        status: int = 429,
        retry_after: int | None = 1,
        description: str | None = None,
        times: int = 1,
    ) -> None:
        """The next `times` calls of `method` fail with `status` (429: Telegram's flood wait)."""
        if description is None:
            description = (
                f"Too Many Requests: retry after {retry_after}"
                if status == 429
                else f"Error {status}"
            )
        with self._cond:
            self._failures.setdefault(method.lower(), []).append(
                _Failure(status, description, retry_after if status == 429 else None, times)
            )

    def _take_failure(self, method: str) -> _Failure | None:
        with self._cond:
            queue = self._failures.get(method.lower())
            if not queue:
                return None
            failure = queue[0]
            failure.times -= 1
            if failure.times <= 0:
                queue.pop(0)
            return failure

    # -- waiting -------------------------------------------------------------------------

    def _lists(self, on: str) -> list[Any]:
        lists: dict[str, list[Any]] = {
            "sent": self.sent,
            "actions": self.actions,
            "edits": self.edits,
            "calls": self.calls,
            "webhook_posts": self.webhook_posts,
        }
        return lists[on]

    def _check(self, predicate: Callable[[list[Any]], Any], on: str) -> Any:
        with self._cond:
            snapshot = list(self._lists(on))
        return predicate(snapshot)

    def _timeout_error(self, on: str, timeout: float) -> TimeoutError:
        with self._cond:
            seen = [
                (c.method, c.chat_id, c.text or c.action) if isinstance(c, Call) else c
                for c in self._lists(on)
            ]
        return TimeoutError(f"condition on tg.{on} not met within {timeout}s; recorded: {seen}")

    def wait_for(
        self, predicate: Callable[[list[Any]], Any], timeout: float = 10.0, *, on: str = "sent"
    ) -> Any:
        """Block until `predicate(tg.<on>)` is truthy (a copy of the list); returns its value.

        `on` is "sent" (default), "actions", "edits", "calls" or "webhook_posts".

        For threads and sync tests. Inside the event loop that runs the bot use
        `await wait_for_async(...)`: blocking that loop would stop the bot it waits for.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("tg.wait_for blocks the event loop; use await tg.wait_for_async")
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = predicate(list(self._lists(on)))
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.05))
        raise self._timeout_error(on, timeout)

    async def wait_for_async(
        self, predicate: Callable[[list[Any]], Any], timeout: float = 10.0, *, on: str = "sent"
    ) -> Any:
        """`wait_for` for coroutines: polls every 10 ms without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while True:
            result = self._check(predicate, on)
            if result:
                return result
            if time.monotonic() >= deadline:
                raise self._timeout_error(on, timeout)
            await asyncio.sleep(0.01)

    # -- the API -------------------------------------------------------------------------

    def _record(self, call: Call, into: list[Call] | None) -> None:
        with self._cond:
            self.calls.append(call)
            if into is not None:
                into.append(call)
            self._cond.notify_all()

    def handle(self, method: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Answer one API call: (HTTP status, JSON body)."""
        failure = self._take_failure(method)
        if failure is not None:
            body: dict[str, Any] = {
                "ok": False,
                "error_code": failure.status,
                "description": failure.description,
            }
            if failure.retry_after is not None:
                body["parameters"] = {"retry_after": failure.retry_after}
            return failure.status, body
        if method.lower() in _RECORDED_NOOPS:  # answered True, kept in `calls`
            chat_id = params.get("chat_id")
            self._record(
                Call(
                    _RECORDED_NOOPS[method.lower()],
                    params,
                    time.monotonic(),
                    chat_id=chat_id if isinstance(chat_id, int | str) else None,
                    message_id=params.get("message_id"),
                ),
                None,
            )
            return 200, {"ok": True, "result": True}
        handler = _METHODS.get(method.lower())
        if handler is None:
            return 404, {
                "ok": False,
                "error_code": 404,
                "description": f"Not Found: method {method!r} is not implemented by FakeTelegram",
            }
        try:
            result = handler(self, params)
        except _BadRequest as exc:
            return 400, {"ok": False, "error_code": 400, "description": f"Bad Request: {exc}"}
        return 200, {"ok": True, "result": result}

    def _get_me(self, params: dict[str, Any]) -> Any:
        return self.bot_user

    def _get_updates(self, params: dict[str, Any]) -> Any:
        offset = int(params.get("offset") or 0)
        limit = max(1, min(100, int(params.get("limit") or 100)))
        timeout = min(float(params.get("timeout") or 0), _MAX_POLL_TIMEOUT)
        deadline = time.monotonic() + timeout
        with self._cond:
            if self.webhook_url is not None:
                raise _Conflict
            self.polls += 1
            if offset:
                # Confirm: everything below the offset is gone for good, as on Telegram.
                self._pending = [
                    p for p in self._pending if p.forced or p.update["update_id"] >= offset
                ]
            while True:
                ready = [p for p in self._pending if p.forced or p.update["update_id"] >= offset]
                if ready or self._closed:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = ready[:limit]
            handed = {id(p) for p in batch if p.forced}
            self._pending = [p for p in self._pending if id(p) not in handed]
            return [p.update for p in batch]

    def _chat_id(self, params: dict[str, Any]) -> int | str:
        chat_id = params.get("chat_id")
        if chat_id is None or chat_id == "":
            raise _BadRequest("chat_id is empty")
        return chat_id if isinstance(chat_id, int | str) else str(chat_id)

    def _send_message(self, params: dict[str, Any]) -> Any:
        chat_id = self._chat_id(params)
        text = params.get("text")
        if not text:
            raise _BadRequest("message text is empty")
        message_id = next(self._message_ids)
        self._record(
            Call(
                "sendMessage",
                params,
                time.monotonic(),
                chat_id=chat_id,
                text=str(text),
                message_id=message_id,
            ),
            self.sent,
        )
        chat = (
            {"id": chat_id, "type": "private", "first_name": f"User{chat_id}"}
            if isinstance(chat_id, int) and chat_id > 0
            else {"id": chat_id, "type": "group", "title": f"Group{chat_id}"}
        )
        return {
            "message_id": message_id,
            "date": int(time.time()),
            "chat": chat,
            "from": self.bot_user,
            "text": str(text),
        }

    def _send_chat_action(self, params: dict[str, Any]) -> Any:
        chat_id = self._chat_id(params)
        action = str(params.get("action") or "")
        if not action:
            raise _BadRequest("action is empty")
        self._record(
            Call("sendChatAction", params, time.monotonic(), chat_id=chat_id, action=action),
            self.actions,
        )
        return True

    def _edit_message_text(self, params: dict[str, Any]) -> Any:
        text = params.get("text")
        if not text:
            raise _BadRequest("message text is empty")
        if params.get("inline_message_id"):
            self._record(Call("editMessageText", params, time.monotonic(), text=text), self.edits)
            return True
        chat_id = self._chat_id(params)
        message_id = params.get("message_id")
        if not isinstance(message_id, int):
            raise _BadRequest("message_id is required")
        self._record(
            Call(
                "editMessageText",
                params,
                time.monotonic(),
                chat_id=chat_id,
                text=str(text),
                message_id=message_id,
            ),
            self.edits,
        )
        return {
            "message_id": message_id,
            "date": int(time.time()),
            "edit_date": int(time.time()),
            "chat": {"id": chat_id, "type": "private", "first_name": f"User{chat_id}"},
            "from": self.bot_user,
            "text": str(text),
        }

    def _answer_callback_query(self, params: dict[str, Any]) -> Any:
        self._record(Call("answerCallbackQuery", params, time.monotonic()), None)
        return True

    def _delete_webhook(self, params: dict[str, Any]) -> Any:
        with self._cond:
            self.webhook_url = None
            self.webhook_secret = None
            if params.get("drop_pending_updates"):
                self._pending.clear()
        return True

    def _set_webhook(self, params: dict[str, Any]) -> Any:
        url = params.get("url")
        with self._cond:
            if not url:
                self.webhook_url = None
                self.webhook_secret = None
                return True
            self.webhook_url = str(url)
            secret = params.get("secret_token")
            self.webhook_secret = str(secret) if secret else None
            if params.get("drop_pending_updates"):
                self._pending.clear()
            leftover = [p.update for p in self._pending]
            self._pending.clear()
            self._cond.notify_all()
        for update in leftover:
            self._deliver(update, forced=True)
        return True

    def _get_webhook_info(self, params: dict[str, Any]) -> Any:
        with self._cond:
            return {
                "url": self.webhook_url or "",
                "has_custom_certificate": False,
                "pending_update_count": len(self._pending),
            }

    def _true(self, params: dict[str, Any]) -> Any:
        return True


class _BadRequest(Exception):
    pass


class _Conflict(Exception):
    pass


_METHODS: dict[str, Callable[[FakeTelegram, dict[str, Any]], Any]] = {
    "getme": FakeTelegram._get_me,
    "getupdates": FakeTelegram._get_updates,
    "sendmessage": FakeTelegram._send_message,
    "sendchataction": FakeTelegram._send_chat_action,
    "editmessagetext": FakeTelegram._edit_message_text,
    "answercallbackquery": FakeTelegram._answer_callback_query,
    "deletewebhook": FakeTelegram._delete_webhook,
    "setwebhook": FakeTelegram._set_webhook,
    "getwebhookinfo": FakeTelegram._get_webhook_info,
    "logout": FakeTelegram._true,
    "close": FakeTelegram._true,
    "setmycommands": FakeTelegram._true,
    "deletemycommands": FakeTelegram._true,
}


_RECORDED_NOOPS = {
    name.lower(): name
    for name in (
        "deleteMessage",
        "deleteMessages",
        "editMessageReplyMarkup",
        "setMessageReaction",
        "pinChatMessage",
        "unpinChatMessage",
    )
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # bots open dozens of connections at once (default: 5)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client hung up (a keep-alive connection closed at shutdown)
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    owner: FakeTelegram
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (a poll cut short at shutdown)

    def _dispatch(self) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = [p for p in parsed.path.split("/") if p]
        if len(parts) != 2 or not parts[0].startswith("bot"):
            self._answer(404, {"ok": False, "error_code": 404, "description": "Not Found"})
            return
        token, method = parts[0][3:], parts[1]
        if token != self.owner.token:
            self._answer(401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
            return
        try:
            params = _parse_body(self.headers.get("Content-Type", ""), body, parsed.query)
        except ValueError as exc:
            self._answer(400, {"ok": False, "error_code": 400, "description": f"Bad body: {exc}"})
            return
        try:
            status, answer = self.owner.handle(method, params)
        except _Conflict:
            status, answer = (
                409,
                {
                    "ok": False,
                    "error_code": 409,
                    "description": "Conflict: can't use getUpdates method while webhook is active",
                },
            )
        self._answer(status, answer)

    do_POST = _dispatch
    do_GET = _dispatch


def iter_texts(calls: list[Call], chat_id: int) -> Iterator[str]:
    """The texts sent to one chat, in order."""
    return (c.text or "" for c in calls if c.chat_id == chat_id)
