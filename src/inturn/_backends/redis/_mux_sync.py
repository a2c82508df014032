"""EVALSHA calls from threads, on connections of their own (the sync twin's hot path).

:class:`SyncMux` is :class:`~inturn._backends.redis._mux.Mux`'s idea for threads,
without the pipelining: a bounded stack of connections of its own, each used by
one thread at a time for one EVALSHA and its reply. It skips redis-py's pool,
retry wrapper, health checks and per-command instrumentation, which cost a
thread more than the round trip. A dropped connection is retried as the
pipelined one's calls are; a read that times out (``socket_timeout``) is not.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
import redis.exceptions
import redis.retry
from redis.backoff import NoBackoff

from ._errors import ClientClosed
from ._mux import MASTER_CHECK, RETRIES

_Pack = Callable[[tuple[Any, ...]], Any]
_hiredis_pack: _Pack | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is in the redis extra
    _hiredis_pack = None

__all__ = ["SyncMux"]


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
                raise ClientClosed()
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


def _left(until: float) -> float:
    """Seconds until a monotonic deadline (a little more than none: a socket needs some)."""
    return max(until - time.monotonic(), 0.001)
