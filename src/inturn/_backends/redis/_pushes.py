"""Reading a subscribed connection's pushes without redis-py's Pub/Sub machinery.

A hand-off between processes ends with one push on the next holder's wake-up
channel. redis-py's ``PubSub.get_message`` reads it through a health check, a
timeout wrapper, a parser and a message dict, and (async) one more task step:
more client time than the push's transit. Here a connection made and
handshaken by redis-py (so TLS, ``unix://``, AUTH, the database and Sentinel's
master discovery work as before) is taken over once it is ready:

- :class:`PushReader` parses the pushes (RESP2 arrays or RESP3 pushes) from
  the bytes as they arrive, split across reads or several in one read;
- :class:`Wakeups` is an asyncio protocol put on the connection's transport:
  it parses in ``data_received`` and hands each push to a callback there,
  which wakes the waiter's future at once;
- :class:`SyncWakeups` reads the socket of a sync connection in a blocking
  loop (the listener thread), with no timeout machinery per push.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any

import redis.exceptions

__all__ = ["PushReader", "SyncWakeups", "Wakeups", "command"]

Push = list[Any]
"""A push: ``[b"message", channel, data]``, ``[b"subscribe", channel, count]``, ..."""

_MORE = object()
"""The parse of an item needs more bytes."""


def command(*args: str) -> bytes:
    """A command in RESP (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class PushReader:
    """Parse pushes from bytes as they arrive (see the module docstring).

    An error reply (``-ERR ...``, say to a SUBSCRIBE that an ACL refuses) is
    returned as a ``redis.exceptions.ResponseError``; bytes that are not RESP
    raise ``redis.exceptions.InvalidResponse``.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Any]:
        """Every item complete once ``data`` is added; the rest waits for more bytes."""
        buffer = self._buffer + data if self._buffer else data
        items: list[Any] = []
        pos = 0
        size = len(buffer)
        while pos < size:
            item, end = _item(buffer, pos)
            if item is _MORE:
                break
            items.append(item)
            pos = end
        self._buffer = buffer[pos:]
        return items


def _item(buffer: bytes, pos: int) -> tuple[Any, int]:
    """The item at ``pos`` and where the next one begins, or (_MORE, pos)."""
    eol = buffer.find(b"\r\n", pos)
    if eol < 0:
        return _MORE, pos
    kind = buffer[pos]
    line = buffer[pos + 1 : eol]
    try:
        if kind == 36:  # "$": a bulk string
            length = int(line)
            if length < 0:
                return None, eol + 2
            start = eol + 2
            stop = start + length
            if len(buffer) < stop + 2:
                return _MORE, pos
            return buffer[start:stop], stop + 2
        if kind == 42 or kind == 62:  # "*" an array, ">" a RESP3 push
            count = int(line)
            items: list[Any] = []
            at = eol + 2
            for _ in range(max(count, 0)):
                item, at = _item(buffer, at)
                if item is _MORE:
                    return _MORE, pos
                items.append(item)
            return (items if count >= 0 else None), at
        if kind == 58:  # ":" an integer
            return int(line), eol + 2
        if kind == 43:  # "+" a simple string
            return line, eol + 2
        if kind == 45:  # "-" an error
            return redis.exceptions.ResponseError(line.decode(errors="replace")), eol + 2
        if kind == 95:  # "_" RESP3 null
            return None, eol + 2
    except ValueError:
        pass
    raise redis.exceptions.InvalidResponse(f"inturn: not a push on the wake-up channel: {line!r}")


OnPush = Callable[[Push], None]


class Wakeups(asyncio.Protocol):
    """The asyncio side: put on a handshaken connection's transport by :meth:`take_over`.

    ``on_push`` runs in ``data_received`` for each push; ``subscribed`` resolves
    (to None) at the first "subscribe" confirmation; ``lost`` resolves to the
    error that ended the connection (both resolve, never fail: no one has to
    retrieve them).
    """

    def __init__(self, on_push: OnPush) -> None:
        loop = asyncio.get_running_loop()
        self._on_push = on_push
        self._reader = PushReader()
        self.transport: asyncio.Transport | None = None
        self._streams: tuple[Any, Any] = (None, None)
        self.subscribed: asyncio.Future[BaseException | None] = loop.create_future()
        self.lost: asyncio.Future[BaseException] = loop.create_future()

    @classmethod
    def take_over(cls, conn: Any, channel: str, on_push: OnPush) -> Wakeups:
        """Read ``conn`` (a connected redis-py async connection) here, and SUBSCRIBE.

        redis-py lets go of the connection: close it with :meth:`close`.
        """
        writer = conn._writer
        transport = writer.transport
        reader = conn._reader
        leftover = bytes(reader._buffer) if reader is not None else b""
        conn._writer = conn._reader = None  # ours now: redis-py must not close it again
        protocol = cls(on_push)
        protocol.transport = transport
        protocol._streams = (writer, reader)  # a StreamWriter closes its transport in __del__
        transport.set_protocol(protocol)
        if leftover:
            protocol.data_received(leftover)
        transport.write(command("SUBSCRIBE", channel))
        return protocol

    def data_received(self, data: bytes) -> None:
        try:
            for push in self._reader.feed(data):
                self._handle(push)
        except Exception as exc:  # a broken stream, or a failing callback: drop the connection
            self._fail(exc)

    def _handle(self, push: Any) -> None:
        if isinstance(push, BaseException):
            raise push
        if not isinstance(push, list) or not push:
            return
        kind = push[0]
        if kind == b"message":
            self._on_push(push)
        elif kind == b"subscribe" and not self.subscribed.done():
            self.subscribed.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if not self.subscribed.done():
            self.subscribed.set_result(exc)
        if not self.lost.done():
            self.lost.set_result(exc)
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        error = exc or redis.exceptions.ConnectionError("inturn: the wake-up channel was closed")
        if not self.subscribed.done():
            self.subscribed.set_result(error)
        if not self.lost.done():
            self.lost.set_result(error)

    def close(self) -> None:
        """Drop the connection now (its pending writes are only a SUBSCRIBE)."""
        if self.transport is not None:
            self.transport.abort()


class SyncWakeups:
    """The sync side: a connected redis-py connection's socket, read in a blocking loop.

    :meth:`close` may be called from another thread: it wakes a blocked read.
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._sock: socket.socket = conn._sock
        self._reader = PushReader()
        self._pending: list[Any] = []
        self._timeout: float | None = None

    def _wait_at_most(self, seconds: float) -> None:
        if seconds != self._timeout:  # settimeout is a system call: not once per push
            self._sock.settimeout(seconds)
            self._timeout = seconds

    def subscribe(self, channel: str, timeout: float) -> None:
        """SUBSCRIBE and wait for its confirmation (pushes read with it are kept)."""
        self._wait_at_most(timeout)
        self._sock.sendall(command("SUBSCRIBE", channel))
        while True:
            items = self._read()
            for at, push in enumerate(items):
                if push and push[0] == b"subscribe":
                    self._pending += items[at + 1 :]  # pushes read with the confirmation
                    return

    def pushes(self, idle: float) -> list[Push]:
        """The next "message" pushes, waiting at most ``idle`` seconds (then [])."""
        if self._pending:
            pending, self._pending = self._pending, []
            return [p for p in pending if p and p[0] == b"message"]
        self._wait_at_most(idle)
        try:
            return [p for p in self._read() if p and p[0] == b"message"]
        except TimeoutError:
            return []

    def _read(self) -> list[Push]:
        while True:
            data = self._sock.recv(65536)
            if not data:
                raise redis.exceptions.ConnectionError("inturn: the wake-up channel was closed")
            items = self._reader.feed(data)
            if items:
                break
        for item in items:
            if isinstance(item, BaseException):
                raise item
        return [item for item in items if isinstance(item, list)]

    def close(self) -> None:
        """Shut the socket (waking a blocked read) and close it; not in a forked child."""
        with contextlib.suppress(Exception):
            self._conn.disconnect()
