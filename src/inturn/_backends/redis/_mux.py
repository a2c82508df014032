"""One pipelined connection per event loop for the turn's hot-path scripts.

redis-py sends a command by taking a connection from its pool, writing under a
``wait_for`` (a new task per command when ``socket_timeout`` is set), reading
under a timeout and putting the connection back. For two tiny scripts per turn
that bookkeeping costs more client CPU than the round trips themselves.

:class:`Mux` keeps one connection (made and handshaken by redis-py, so TLS,
``unix://``, AUTH, the database and Sentinel's master discovery all work as
before) and *pipelines* on it: a call writes its command to the transport
(which never blocks) and parks a future; replies are matched to the futures
in order as they arrive (with hiredis, in the transport's ``data_received``:
see ``_replies``; without it, by a reader task). Many tasks of one loop share
the connection. A command may be held back to the end of the loop step
(``submit(hold=True)``): the tasks it woke run first, and commands sent after
it in that step join its write.

Failure handling keeps redis-py's promises and adds one:

- a dropped connection fails every call in flight with ``ConnectionError``;
  calls are retried (``RETRIES`` times, with backoff) on a new connection, as
  redis-py's ``Retry`` did, when they are idempotent (most scripts are); one
  that is not (SUPERSEDE, a take that acknowledges) is retried only if it was
  never written;
- a server that stops answering (paused, overloaded) is noticed by a watchdog:
  when the oldest call in flight waited ``timeout`` seconds, the connection is
  dropped and its calls fail with ``TimeoutError`` (not retried: a stalled
  server would stall the retry too);
- a cancelled caller does not poison the connection: its reply is read and
  dropped (redis-py must close a connection whose reply was abandoned).

:class:`SyncMux` is the same idea for threads, without the pipelining: a
bounded stack of connections of its own, each used by one thread at a time
for one EVALSHA and its reply. It skips redis-py's pool, retry wrapper,
health checks and per-command instrumentation, which cost a thread more than
the round trip. A dropped connection is retried as above; a read that times
out (``socket_timeout``) is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.exceptions
import redis.retry
from redis.backoff import NoBackoff

from ._replies import Pending, Replies, Then, can_take_over

_Pack = Callable[[tuple[Any, ...]], Any]
_hiredis_pack: _Pack | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is in the redis extra
    _hiredis_pack = None

__all__ = ["Mux", "SyncMux"]

RETRIES = 2
"""Retries of a call whose connection dropped (the first on a new connection)."""
WATCH_EVERY = 1.0
"""Seconds between two checks of the watchdog, while calls are in flight."""
DRAIN = 0.25
"""Seconds ``aclose`` waits for the replies of calls in flight."""
MASTER_CHECK = 0.5
"""Seconds between two checks, behind Sentinel, that a connection still goes to the master.

A master that was paused and came back still takes writes until Sentinel demotes it
(seconds later): a holder renewing there, or a waiter joining there, would not learn
that the new master gave the key to someone else. A connection to an address that
Sentinel no longer names is dropped; its calls go again to the new master."""


def sha1(lua: str) -> str:
    """The SHA1 Redis files a script under (EVALSHA's argument)."""
    return hashlib.sha1(lua.encode()).hexdigest()


class _Link:
    """One connection and its calls in flight."""

    __slots__ = ("conn", "dropped", "held", "pending", "reader", "replies", "watcher", "writer")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.writer: asyncio.StreamWriter = conn._writer  # made by redis-py's connect()
        self.dropped = False
        self.pending: Pending = deque()
        self.reader: asyncio.Task[None] | None = None
        """The task that reads replies, unless ``replies`` does (see ``_replies``)."""
        self.replies: Replies | None = None
        self.watcher: asyncio.Task[None] | None = None
        """Behind Sentinel: checks that the connection still goes to the master."""
        self.held: list[bytes] | None = None
        """Commands held back until the end of this loop step (see ``Mux.submit``)."""


class Mux:
    """Pipelined EVALSHA calls on one connection of ``pool`` (see the module docstring).

    Bound to the event loop it is first used in, like redis-py's async clients.
    """

    def __init__(
        self,
        pool: redis.asyncio.ConnectionPool,
        *,
        timeout: float,
        preload: Sequence[str] = (),
        master: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self._pool = pool
        self._master = master
        """Behind Sentinel: the master's current (host, port) (see ``MASTER_CHECK``)."""
        self._timeout = timeout
        self._preload = tuple(preload)
        self._link: _Link | None = None
        self._connecting = asyncio.Lock()  # fair: callers get the connection in call order
        self._awaiting_link = 0
        self._watch: asyncio.TimerHandle | None = None
        self._closed = False

    async def evalsha(
        self,
        sha: str,
        lua: str,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        idempotent: bool = True,
        then: tuple[Any, ...] | None = None,
        hold: bool = False,
        lazy: bool = False,
    ) -> Any:
        """Run a script by its SHA (loading it by EVAL when the server lacks it).

        ``hold``: send it at the end of this loop step, with the commands sent after
        it (see :meth:`submit`): one write for the calls of many tasks. ``lazy``: its
        reply may wait unread until the loop wakes for something else (see ``_replies``).

        Raises redis-py's exceptions: ``ConnectionError`` (after the retries),
        ``TimeoutError`` and ``ResponseError``. A call that is not ``idempotent``
        is retried only if it never left (the connection was gone before it was
        written): once written, its connection may drop after the server ran it,
        and the ``ConnectionError`` goes to the caller, who knows how to ask again.

        ``then``: a command sent right behind the script on the same connection (a
        ``WAIT`` for replicas, which counts this connection's writes); the reply is
        then the pair (script's reply, its reply).
        """
        tries = 0
        while True:
            link = self._link
            if link is None or self._awaiting_link:
                # Behind every call already waiting for the connection, so that calls leave
                # in the order they were made (a loop's JOINs must reach the server in the
                # order its line was built). A failed connect is not retried: a caller in
                # line re-checks on its own schedule.
                self._awaiting_link += 1
                try:
                    link = await self._connect()
                finally:
                    self._awaiting_link -= 1
            written = False
            try:
                try:
                    command = ("EVALSHA", sha, len(keys), *keys, *args)
                    reply = self._send(link, command, hold=hold, lazy=lazy and then is None)
                    if then is None:  # the common case: no wrapper coroutine
                        written = True
                        return await reply
                    after = self._send(link, then)
                    written = True
                    return await _both(reply, after)
                except redis.exceptions.NoScriptError:
                    written = False
                    reply = self._send(link, ("EVAL", lua, len(keys), *keys, *args))
                    later = None if then is None else self._send(link, then)
                    written = True
                    return await _both(reply, later)
            except redis.exceptions.TimeoutError:
                raise
            except (redis.exceptions.ConnectionError, OSError):
                tries += 1
                if tries > RETRIES or self._closed or (written and not idempotent):
                    raise
                await asyncio.sleep(min(0.5, 0.05 * 2**tries))

    async def aclose(self) -> None:
        """Drop the connection, after the replies of calls in flight (a release that was
        not awaited, say) had up to ``DRAIN`` seconds to arrive; calls still in flight
        then fail with ``ConnectionError``."""
        self._closed = True
        link = self._link
        if link is not None:
            self._flush(link)
            if link.replies is not None:
                link.replies.wake()
            if link.pending and not link.dropped:
                last = link.pending[-1][0]
                with contextlib.suppress(Exception):
                    await asyncio.wait([last], timeout=DRAIN)
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        link = self._link
        if link is not None:
            self._drop(link, redis.exceptions.ConnectionError("inturn: the client was closed"))
            if link.reader is not None:
                with contextlib.suppress(BaseException):
                    await link.reader

    # -- sending and reading ------------------------------------------------------------

    def submit(
        self,
        sha: str,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        hold: bool = False,
        then: Callable[[asyncio.Future[Any]], None] | None = None,
        lazy: bool = False,
    ) -> asyncio.Future[Any] | None:
        """Send EVALSHA now and return the future of its reply (None when not connected).

        No retry and no EVAL fallback: the future fails with redis-py's exception.
        With ``hold``, the command leaves at the end of this loop step (with any
        sent after it), so that tasks woken in this step run first. ``then(future)``
        runs as soon as the reply (or the failure) is in. A ``lazy`` reply may wait
        unread until the loop wakes for something else (see ``_replies``).
        """
        link = self._link
        if link is None or link.dropped or self._awaiting_link:
            return None
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        return self._send(link, command, hold=hold, then=then, lazy=lazy)

    def catch_up(self, *, resume: bool = False) -> None:
        """Read now the replies that came while reading waited (see ``_replies``); with
        ``resume``, read them as they come again (someone waits for one of them now)."""
        replies = None if self._link is None else self._link.replies
        if replies is not None and resume:
            replies.hasten()
        elif replies is not None:
            replies.catch_up()

    def _send(
        self,
        link: _Link,
        command: tuple[Any, ...],
        *,
        hold: bool = False,
        then: Callable[[asyncio.Future[Any]], None] | None = None,
        lazy: bool = False,
    ) -> asyncio.Future[Any]:
        if link.dropped:
            raise redis.exceptions.ConnectionError("inturn: the connection was dropped")
        if link.writer.transport.is_closing():
            # The server went away and the reader has not noticed yet: writing to the
            # dead transport would only make asyncio log "socket.send() raised exception."
            # once per call.
            error = redis.exceptions.ConnectionError("inturn: the connection was lost")
            self._drop(link, error)
            raise error
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future() if then is None else Then(loop, then)
        replies = link.replies
        if replies is not None and not lazy:
            replies.wake()  # read as usual: its caller waits for the reply now
            replies.urgent += 1
        # Registered and written with no await between: replies come back in this order.
        link.pending.append((future, loop.time(), lazy))
        if self._watch is None:
            self._watch = loop.call_later(WATCH_EVERY, self._watchdog)
        pack = _hiredis_pack
        packed = pack(command) if pack is not None else link.conn.pack_command(*command)
        if link.held is not None:
            link.held.append(packed)
        elif hold:
            link.held = [packed]
            loop.call_soon(self._flush, link)
        else:
            self._write(link, packed)
        return future

    def _flush(self, link: _Link) -> None:
        """Write the commands held back in this loop step, in one write."""
        held, link.held = link.held, None
        if held and not link.dropped:
            self._write(link, b"".join(held))

    def _write(self, link: _Link, data: bytes) -> None:
        # The transport sends at once or buffers; it never blocks. A failed send closes
        # it, and the reader then fails the calls in flight.
        try:
            link.writer.write(data)
        except BaseException as exc:
            self._drop(link, exc)
            raise
        if link.replies is not None:
            link.replies.settle()

    async def _connect(self) -> _Link:
        async with self._connecting:
            if self._closed:
                raise redis.exceptions.ConnectionError("inturn: the client was closed")
            if self._link is not None:
                return self._link
            conn = self._pool.make_connection()  # type: ignore[no-untyped-call]
            # One attempt: a caller that waits in line re-checks on its own schedule, and a
            # connect retried inside the call could run past the caller's deadline.
            conn.retry = redis.asyncio.retry.Retry(NoBackoff(), 0)
            try:
                await conn.connect()  # the handshake still runs under socket_timeout
                await self._load_scripts(conn)
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
                raise
            # Reads now wait as long as they must: the watchdog bounds a call instead.
            conn.socket_timeout = None
            link = self._link = _Link(conn)
            if can_take_over(conn):  # replies resolve their calls as the bytes arrive
                link.replies = Replies.take_over(conn, link.pending, partial(self._drop, link))
            else:
                link.reader = asyncio.ensure_future(self._read(link))
            if self._master is not None:
                link.watcher = asyncio.ensure_future(self._watch_master(link, self._master))
            return link

    async def _watch_master(self, link: _Link, master: Callable[[], Awaitable[Any]]) -> None:
        """Drop the connection once Sentinel names another master (see ``MASTER_CHECK``)."""
        while not link.dropped:
            await asyncio.sleep(MASTER_CHECK)
            try:
                async with asyncio.timeout(MASTER_CHECK * 2):
                    host, port = await master()
            except Exception:  # Sentinel unreachable: the connection's own errors still count
                continue
            if (str(host), int(port)) != (str(link.conn.host), int(link.conn.port)):
                error = redis.exceptions.ConnectionError(
                    f"inturn: Sentinel names another master ({host}:{port})"
                )
                self._drop(link, error)

    async def _load_scripts(self, conn: Any) -> None:
        """Load the scripts on a new connection (one round trip), so that EVALSHA finds
        them: a NOSCRIPT retry goes out later than calls made after it, out of order."""
        if not self._preload:
            return
        commands = [("SCRIPT", "LOAD", lua) for lua in self._preload]
        await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        for _ in commands:
            # A refused load (a full server: OOM) is not fatal: EVALSHA falls back to EVAL.
            with contextlib.suppress(redis.exceptions.ResponseError):
                await conn.read_response()

    async def _read(self, link: _Link) -> None:
        """Match each reply to the oldest call in flight, until the connection fails."""
        conn, pending = link.conn, link.pending
        try:
            while True:
                try:
                    reply = await conn.read_response(disconnect_on_error=False)
                except redis.exceptions.ResponseError as error:
                    future = pending.popleft()[0]
                    if not future.done():
                        future.set_exception(error)
                    continue
                future = pending.popleft()[0]
                if not future.done():
                    future.set_result(reply)
        except IndexError:  # a reply nobody asked for: the stream is out of step
            self._drop(link, redis.exceptions.ConnectionError("inturn: unexpected reply"))
        except asyncio.CancelledError:  # dropped, closed, or the loop is shutting down
            self._drop(link, redis.exceptions.ConnectionError("inturn: the reader was stopped"))
        except Exception as exc:
            self._drop(link, exc)
        finally:
            with contextlib.suppress(BaseException):
                await conn.disconnect(nowait=True)

    def _drop(self, link: _Link, exc: BaseException) -> None:
        """Retire a connection: its calls in flight fail with ``exc`` (as a redis error)."""
        if link.dropped:
            return
        link.dropped = True
        if not isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            exc = redis.exceptions.ConnectionError(f"inturn: the connection failed: {exc!r}")
        if self._link is link:
            self._link = None
        while link.pending:
            future = link.pending.popleft()[0]
            if not future.done():
                future.set_exception(exc)
        watcher = link.watcher
        if watcher is not None and watcher is not asyncio.current_task() and not watcher.done():
            watcher.cancel()
        reader = link.reader  # it disconnects on its way out
        if reader is not None and reader is not asyncio.current_task() and not reader.done():
            reader.cancel()
        if link.replies is not None:  # read here: close the connection now
            link.writer.transport.abort()

    def _watchdog(self) -> None:
        """Drop a connection whose oldest call in flight has waited ``timeout`` seconds."""
        self._watch = None
        link = self._link
        if link is None or not link.pending:
            return  # idle: the next call starts the watchdog again
        loop = asyncio.get_running_loop()
        if loop.time() - link.pending[0][1] >= self._timeout:
            error = redis.exceptions.TimeoutError(
                f"inturn: Redis did not answer within {self._timeout:g}s"
            )
            self._drop(link, error)
            return
        self._watch = loop.call_later(WATCH_EVERY, self._watchdog)


class SyncMux:
    """EVALSHA calls from threads on connections of ``pool``'s kind (see the module docstring).

    At most ``size`` connections; a thread that finds them all busy waits up to
    ``wait`` seconds for one. After a fork the child makes its own (the parent's
    are left alone: closing them would cut the parent's connections too).
    """

    def __init__(
        self,
        pool: redis.ConnectionPool,
        *,
        size: int,
        wait: float,
        preload: Sequence[str] = (),
        master: Callable[[], Any] | None = None,
    ) -> None:
        self._pool = pool
        self._master = master
        """Behind Sentinel: the master's current (host, port) (see ``MASTER_CHECK``)."""
        self._address: tuple[str, int] | None = None
        self._checked = 0.0
        self._size = size
        self._wait = wait
        self._preload = tuple(preload)
        self._idle: list[Any] = []
        self._count = 0
        """Connections made (or being made) and not retired."""
        self._free = threading.Condition()
        self._pid = os.getpid()
        self._closed = False

    def evalsha(
        self,
        sha: str,
        lua: str,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        timeout: float | None = None,
        idempotent: bool = True,
        then: tuple[Any, ...] | None = None,
    ) -> Any:
        """Run a script by its SHA (loading it by EVAL when the server lacks it).

        ``timeout``: the longest wait for the reply (default: the socket timeout).
        Raises redis-py's exceptions: ``ConnectionError`` (after the retries),
        ``TimeoutError`` and ``ResponseError``. A call that is not ``idempotent``
        is not sent again once it was written (see :meth:`Mux.evalsha`).
        """
        tries = 0
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            conn = self._take(until)
            written = [False]
            try:
                try:
                    command = ("EVALSHA", sha, len(keys), *keys, *args)
                    reply = self._call(conn, command, until, written)
                except redis.exceptions.NoScriptError:
                    written[0] = False
                    command = ("EVAL", lua, len(keys), *keys, *args)
                    reply = self._call(conn, command, until, written)
                if then is not None:  # on the same connection: a WAIT counts its writes
                    reply = (reply, self._call(conn, then, until, [True]))
            except redis.exceptions.ResponseError:
                self._give(conn)  # an error reply leaves the connection in step
                raise
            except (redis.exceptions.ConnectionError, OSError):
                self._retire(conn)
                tries += 1
                if tries > RETRIES or self._closed or (written[0] and not idempotent):
                    raise
                time.sleep(min(0.5, 0.05 * 2**tries))
                continue
            except BaseException:
                self._retire(conn)  # a timeout, or interrupted: its reply may still come
                raise
            self._give(conn)
            return reply

    def close(self) -> None:
        """Close the idle connections; those in use are closed when given back."""
        with self._free:
            self._closed = True
            idle, self._idle = self._idle, []
            self._free.notify_all()
        if self._pid == os.getpid():
            for conn in idle:
                with contextlib.suppress(Exception):
                    conn.disconnect()

    @staticmethod
    def _call(conn: Any, command: tuple[Any, ...], until: float | None, written: list[bool]) -> Any:
        pack = _hiredis_pack
        packed = pack(command) if pack is not None else conn.pack_command(*command)
        conn.send_packed_command([packed], check_health=False)
        written[0] = True  # all of it reached the socket: the server may run it
        if until is None:
            return conn.read_response()
        return conn.read_response(timeout=_left(until))

    def _check_master(self) -> None:
        """Behind Sentinel, at most every ``MASTER_CHECK`` s: once Sentinel names another
        master, connections to the old one are closed (idle) or retired (when given back)."""
        with self._free:
            if self._master is None or time.monotonic() - self._checked < MASTER_CHECK:
                return
            self._checked = time.monotonic()  # one thread asks; the others go on
        try:
            host, port = self._master()
        except Exception:  # Sentinel unreachable: the connections' own errors still count
            return
        address = (str(host), int(port))
        with self._free:
            if self._address is None or address == self._address:
                self._address = address
                return
            self._address = address
            stale = [c for c in self._idle if (str(c.host), int(c.port)) != address]
            self._idle = [c for c in self._idle if c not in stale]
        for conn in stale:
            self._retire(conn)

    def _take(self, until: float | None) -> Any:
        if self._master is not None:
            self._check_master()
        with self._free:
            if self._pid != os.getpid():  # forked: the parent's connections are not ours
                self._pid, self._idle, self._count = os.getpid(), [], 0
            deadline = time.monotonic() + self._wait
            if until is not None:
                deadline = min(deadline, until)
            while not self._idle and self._count >= self._size:
                left = deadline - time.monotonic()
                if self._closed or left <= 0 or not self._free.wait(left):
                    break
            if self._closed:
                raise redis.exceptions.ConnectionError("inturn: the client was closed")
            if self._idle:
                return self._idle.pop()
            if self._count >= self._size:
                raise redis.exceptions.ConnectionError(
                    f"inturn: no free Redis connection within {self._wait:g}s"
                )
            self._count += 1
        try:
            return self._connect(until)
        except BaseException:
            self._retire(None)
            raise

    def _connect(self, until: float | None) -> Any:
        pool = self._pool
        conn = pool.connection_class(**pool.connection_kwargs)
        # One attempt: the caller's own schedule (re-checks, timeouts) decides what follows.
        conn.retry = redis.retry.Retry(NoBackoff(), 0)
        timeouts = (conn.socket_connect_timeout, conn.socket_timeout)
        if until is not None:  # the connect and its handshake end by the caller's deadline too
            conn.socket_connect_timeout = min(timeouts[0] or _left(until), _left(until))
            conn.socket_timeout = min(timeouts[1] or _left(until), _left(until))
        try:
            conn.connect()
            if self._preload:  # one round trip; a refused load (OOM) falls back to EVAL
                commands = [("SCRIPT", "LOAD", lua) for lua in self._preload]
                conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                for _ in commands:
                    with contextlib.suppress(redis.exceptions.ResponseError):
                        conn.read_response()
            conn.socket_connect_timeout, conn.socket_timeout = timeouts
            conn._sock.settimeout(timeouts[1])  # what connect() gave the socket, as configured
        except BaseException:
            with contextlib.suppress(Exception):
                conn.disconnect()
            raise
        return conn

    def _give(self, conn: Any) -> None:
        address = self._address
        moved = address is not None and (str(conn.host), int(conn.port)) != address
        with self._free:
            if not self._closed and self._pid == os.getpid() and not moved:
                self._idle.append(conn)
                self._free.notify()
                return
        self._retire(conn)

    def _retire(self, conn: Any) -> None:
        if conn is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                conn.disconnect()
        with self._free:
            self._count = max(0, self._count - 1)
            self._free.notify()


async def _both(reply: asyncio.Future[Any], after: asyncio.Future[Any] | None) -> Any:
    """A script's reply, or (its reply, the reply of the command sent behind it)."""
    try:
        result = await reply
    except BaseException:
        if after is not None:  # its failure is the same as the script's: not reported twice
            after.add_done_callback(_retrieve)
        raise
    if after is None:
        return result
    return result, await after


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _left(until: float) -> float:
    """Seconds until a monotonic deadline (a little more than none: a socket needs some)."""
    return max(until - time.monotonic(), 0.001)
