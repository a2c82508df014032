"""Replies of a pipelined connection, matched to their calls as the bytes arrive.

The pipelined connection (:class:`~inturn._backends.redis._mux.Mux`) once read
its replies in a task of its own through redis-py's stream reader: each reply
then took three turns of the event loop (the bytes wake the stream, the stream
wakes the reader task, the task wakes the caller). :class:`Replies` is an
asyncio protocol put on the connection's transport once redis-py has made and
handshaken it (TLS, ``unix://``, AUTH, the database, the protocol version all
stay redis-py's): it parses with hiredis in ``data_received`` and resolves the
caller's future there, so the caller runs in the next turn. An uncontended
turn is two replies: four turns of the loop fewer.

A reply nobody waits for at the moment (a *lazy* call: the confirmation of a
release that already woke its next holder, the JOIN of a task that queues
behind one of this loop's own) need not wake the loop. While every call in
flight is lazy, :class:`Replies` stops reading (``settle``) and reads what came
when the next urgent call is made, when a release looks at the line
(``catch_up``), or ``QUIET_FOR`` seconds after it last looked, at the latest.
Why it matters: a reply that lands in the middle of a holder's ``await
asyncio.sleep(...)`` wakes the loop, and the loop then sleeps the rest rounded
up to whole milliseconds (epoll's unit), so each such reply stretched the
holder's turn by a fraction of a millisecond.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Callable
from typing import Any

import redis.exceptions

hiredis: Any
try:
    import hiredis
except ImportError:  # pragma: no cover - hiredis is in the redis extra
    hiredis = None

__all__ = ["QUIET_FOR", "Pending", "Replies", "Then", "can_take_over"]

QUIET_FOR = 0.1
"""Seconds at most that lazy replies stay unread after the connection was last looked at."""
_CHUNK = 65536

_MORE = object()
"""hiredis's answer when a reply needs more bytes."""

Pending = collections.deque[tuple[asyncio.Future[Any], float, bool]]
"""Calls in flight on a connection, in send order: each caller's future, the loop time it
was sent, and whether it is lazy (see the module docstring)."""


def can_take_over(conn: Any) -> bool:
    """Whether ``conn`` (a connected redis-py async connection) can be read here."""
    writer = getattr(conn, "_writer", None)
    return hiredis is not None and writer is not None and hasattr(writer, "transport")


class Replies(asyncio.Protocol):
    """Resolve the oldest call in flight with each reply, in ``data_received``.

    An error reply fails that call with redis-py's exception for it
    (``NoScriptError``, ``MovedError``, ...); bytes that are not RESP, a reply
    that no call waits for, or the end of the connection call ``on_lost``,
    which fails every call in flight.
    """

    def __init__(
        self,
        conn: Any,
        pending: Pending,
        on_lost: Callable[[BaseException], None],
        transport: asyncio.Transport | None = None,
    ) -> None:
        self._pending = pending
        self._on_lost = on_lost
        options: dict[str, Any] = {
            "protocolError": redis.exceptions.InvalidResponse,
            "replyError": type(conn._parser).parse_error,
            "notEnoughData": _MORE,
        }
        if conn.encoder.decode_responses:
            options["encoding"] = conn.encoder.encoding
            options["errors"] = conn.encoder.encoding_errors
        self._reader = hiredis.Reader(**options)
        self._push = getattr(hiredis, "PushNotification", None)
        self.urgent = 0
        """Calls in flight that are not lazy (the sender counts them in)."""
        self._hastened = False
        """Someone waits for a lazy reply now: read as usual until every call is answered."""
        self._transport = transport
        self._fd = -1
        """The socket, when it can be read past its transport (TLS bytes need the transport)."""
        if transport is not None and transport.get_extra_info("sslcontext") is None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                self._fd = sock.fileno()
        self._quiet: asyncio.TimerHandle | None = None
        """While reading is paused: the timer that ends the pause."""

    @classmethod
    def take_over(
        cls, conn: Any, pending: Pending, on_lost: Callable[[BaseException], None]
    ) -> Replies:
        """Read ``conn`` here from now on. Its writer still writes (keep a reference: the
        caller closes its transport); redis-py lets go of the connection."""
        transport = conn._writer.transport
        protocol = cls(conn, pending, on_lost, transport)
        stream = conn._reader
        leftover = bytes(stream._buffer) if stream is not None else b""
        transport.set_protocol(protocol)
        conn._writer = conn._reader = None  # not redis-py's to close any more
        if leftover:
            protocol.data_received(leftover)
        return protocol

    def data_received(self, data: bytes) -> None:
        reader, pending = self._reader, self._pending
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not _MORE:
                if self._push is not None and isinstance(reply, self._push):
                    continue  # a RESP3 push (client tracking, say): no call's reply
                future, _, lazy = pending.popleft()
                if not lazy:
                    self.urgent -= 1
                if future.done():  # its caller was cancelled: the reply is dropped
                    continue
                if isinstance(reply, redis.exceptions.ResponseError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
            if not pending:
                self._hastened = False
        except IndexError:
            self._on_lost(redis.exceptions.ConnectionError("inturn: unexpected reply"))
        except Exception as exc:
            self._on_lost(exc)

    def settle(self) -> None:
        """After a write: stop reading while every call in flight is lazy."""
        transport = self._transport
        if self.urgent or self._hastened or self._quiet is not None or self._fd < 0:
            return
        if not self._pending:
            return
        assert transport is not None  # a readable fd came from it
        transport.pause_reading()
        self._quiet = asyncio.get_running_loop().call_later(QUIET_FOR, self.wake)

    def catch_up(self) -> None:
        """Take in the replies that have arrived (reading stays as it is)."""
        quiet = self._quiet
        if quiet is None or not self._pending:  # reading, or nothing to read
            return
        # The backstop counts from the last catch-up: while releases keep catching up, it
        # never fires (a timer would wake the loop in some holder's sleep, as a reply did).
        quiet.cancel()
        self._quiet = asyncio.get_running_loop().call_later(QUIET_FOR, self.wake)
        data, ended = self._arrived()
        self._take_in(data)
        if ended:  # the transport is to see the end (or the failure) and report it
            self.wake()

    def hasten(self) -> None:
        """Someone waits for a lazy reply now (it may not even have left yet): read the
        replies as they come until every call in flight is answered."""
        self._hastened = bool(self._pending)
        self.wake()

    def wake(self) -> None:
        """Read as the bytes come again, after taking in those that came."""
        quiet, self._quiet = self._quiet, None
        if quiet is None:
            return
        quiet.cancel()
        arrived, _ = self._arrived()
        if self._transport is not None:  # it paused: the fd came from it
            self._transport.resume_reading()  # an end of the stream is the transport's to see
        self._take_in(arrived)

    def _arrived(self) -> tuple[bytes, bool]:
        """What the socket holds now, read past the paused transport, and whether the
        stream ended or failed (the transport then reads the end again, and reports it)."""
        chunks = []
        ended = False
        try:
            while chunk := os.read(self._fd, _CHUNK):
                chunks.append(chunk)
                if len(chunk) < _CHUNK:
                    break
            else:
                ended = True
        except BlockingIOError:  # nothing (more) for now
            pass
        except OSError:
            ended = True
        return b"".join(chunks), ended

    def _take_in(self, data: bytes) -> None:
        if data:
            self.data_received(data)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._quiet is not None:
            self._quiet.cancel()
            self._quiet = None
        self._on_lost(exc or redis.exceptions.ConnectionError("inturn: the server closed it"))


class Then(asyncio.Future[Any]):
    """A reply's future that runs ``then(future)`` the moment it is resolved: a done
    callback would run one loop step later (a step more before the loop sleeps again)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, then: Callable[[asyncio.Future[Any]], None]
    ) -> None:
        super().__init__(loop=loop)
        self._then = then

    def set_result(self, result: Any) -> None:
        super().set_result(result)
        self._done()

    def set_exception(self, exception: type | BaseException) -> None:
        super().set_exception(exception)
        self._done()

    def cancel(self, msg: Any | None = None) -> bool:
        cancelled = super().cancel(msg)
        if cancelled:
            self._done()
        return cancelled

    def _done(self) -> None:
        try:
            self._then(self)
        except Exception as exc:  # never into the reader: it would drop the connection
            self.get_loop().call_exception_handler(
                {"message": "inturn: a reply's handler failed", "exception": exc, "future": self}
            )
