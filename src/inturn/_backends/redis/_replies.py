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
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

import redis.exceptions

hiredis: Any
try:
    import hiredis
except ImportError:  # pragma: no cover - hiredis is in the redis extra
    hiredis = None

__all__ = ["Pending", "Replies", "Then", "can_take_over"]

_MORE = object()
"""hiredis's answer when a reply needs more bytes."""

Pending = collections.deque[tuple[asyncio.Future[Any], float]]
"""Calls in flight on a connection, in send order: each caller's future and the loop time
it was sent."""


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
        self, conn: Any, pending: Pending, on_lost: Callable[[BaseException], None]
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

    @classmethod
    def take_over(
        cls, conn: Any, pending: Pending, on_lost: Callable[[BaseException], None]
    ) -> Replies:
        """Read ``conn`` here from now on. Its writer still writes (keep a reference: the
        caller closes its transport); redis-py lets go of the connection."""
        protocol = cls(conn, pending, on_lost)
        stream = conn._reader
        leftover = bytes(stream._buffer) if stream is not None else b""
        conn._writer.transport.set_protocol(protocol)
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
                future = pending.popleft()[0]
                if future.done():  # its caller was cancelled: the reply is dropped
                    continue
                if isinstance(reply, redis.exceptions.ResponseError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except IndexError:
            self._on_lost(redis.exceptions.ConnectionError("inturn: unexpected reply"))
        except Exception as exc:
            self._on_lost(exc)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
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
