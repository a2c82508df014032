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

Threads have their own: :class:`~inturn._backends.redis._mux_sync.SyncMux`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.exceptions
from redis.backoff import NoBackoff

from ._errors import ClientClosed
from ._replies import Pending, Replies, Then, can_take_over

_Pack = Callable[[tuple[Any, ...]], Any]
_hiredis_pack: _Pack | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is in the redis extra
    _hiredis_pack = None

__all__ = ["MASTER_CHECK", "RETRIES", "Mux", "sha1"]

RETRIES = 2
"""Retries of a call whose connection dropped (the first on a new connection)."""
WATCH_EVERY = 1.0
"""Seconds between two checks of the watchdog, while calls are in flight."""
DRAIN = 0.25
"""Seconds ``aclose`` waits for the replies of calls in flight."""
MASTER_CHECK = 0.5
"""Seconds between two checks, behind Sentinel, that a connection still goes to the master.

A master that was paused and came back still takes writes until Sentinel demotes it
(seconds later): a holder renewing or a waiter joining there would not learn that the new
master gave the key to someone else. A connection to an address Sentinel no longer names
is dropped; its calls go again to the new master."""


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
            self._drop(link, ClientClosed())
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
                raise ClientClosed()
            if self._link is not None:
                return self._link
            conn = self._pool.make_connection()  # type: ignore[no-untyped-call]
            # One attempt: a caller that waits in line re-checks on its own schedule, and a
            # connect retried inside the call could run past the caller's deadline.
            conn.retry = redis.asyncio.retry.Retry(NoBackoff(), 0)
            try:
                await conn.connect()  # the handshake still runs under socket_timeout
                await self._load_scripts(conn)
                if self._closed:  # aclose() came meanwhile: this one would stay open
                    raise ClientClosed()
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
            late = f"inturn: Redis did not answer within {self._timeout:g}s"
            self._drop(link, redis.exceptions.TimeoutError(late))
            return
        self._watch = loop.call_later(WATCH_EVERY, self._watchdog)


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
