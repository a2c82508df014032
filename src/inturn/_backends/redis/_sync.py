"""The sync twin of the Redis backend: the same scripts and keys, driven from threads.

Wake-ups for every thread's waiters arrive on one listener thread per process
(started again in a forked child). Threads send their JOINs on several
connections, so they may reach the server in any order: the line kept here is
ordered by the join sequence number the server hands out, and no turn is
handed over inside the process while a call that changes a key's line is in
flight (see :meth:`SyncRedisBackend.release`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import redis
import redis.cluster
import redis.sentinel

from inturn._backends._wakeup import closed_while_waiting, raise_if_closing
from inturn._backends.base import ClaimResult, Grant, Statistics
from inturn._errors import BackendUnavailable

from . import _doctor
from ._boxes import SyncMailboxes
from ._closing import CLOSED_FOR_THREADS, SharedClient, leave_at_close_sync
from ._mux_sync import SyncMux
from ._nodes import NotHere, SyncNodeMuxes
from ._pushes import SyncWakeups
from ._shared import (
    CONNECT_TIMEOUT,
    IDLE_READ,
    MAX_CONNECTIONS,
    SCRIPTS,
    SHAS,
    Call,
    Lines,
    Outage,
    ProcessChannel,
    ReplicaWait,
    Scripts,
    Signal,
    Waiter,
    after_release,
    alive_ms,
    confirm,
    decode_claim,
    decode_grant,
    hand_over,
    holder_of,
    idempotent,
    is_cluster,
    log_channel_lost,
    map_errors,
    ms,
    queued,
    text,
    unavailable,
    wake,
)

logger = logging.getLogger("inturn")

__all__ = ["SyncRedisBackend"]

_TWINS: weakref.WeakSet[SyncRedisBackend] = weakref.WeakSet()
"""Every sync twin of this process: a forked child remakes their per-process state."""
LISTENER_ENDS = 1.0
"""Seconds close() waits at most for the listener thread to end."""


def _after_fork_in_child() -> None:
    for twin in list(_TWINS):
        twin._forked()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)


class SyncRedisBackend(SyncMailboxes):
    """The sync twin of :class:`RedisBackend`, for threads: same keys, same guarantees.

    One listener thread per process receives the wake-ups of every thread's
    waiters; scripts go through a bounded stack of connections of its own
    (:class:`SyncMux`), or by slot on a Cluster.
    """

    never_blocks = False
    """Every call is a round trip to Redis: the turn layer bounds it in a worker."""

    def __init__(
        self,
        client: Any,
        process: ProcessChannel,
        *,
        owned: bool = False,
        wait: ReplicaWait | None = None,
    ) -> None:
        self._client = client
        self._wait = wait
        self._process = process
        self._calls = Scripts(process.keys, cluster=is_cluster(client))
        self._scripts: dict[str, Any] = {}
        """redis-py Script objects, on a Cluster only (elsewhere the SyncMux runs the scripts)."""
        self._mux: SyncMux | None = None
        self._nodes: SyncNodeMuxes | None = None
        """On a Cluster: a connection stack per master, for scripts (see ``_nodes``)."""
        if is_cluster(client):
            self._scripts = {name: client.register_script(lua) for name, lua in SCRIPTS.items()}
            self._nodes = SyncNodeMuxes(
                client, size=MAX_CONNECTIONS, wait=CONNECT_TIMEOUT, preload=tuple(SCRIPTS.values())
            )
        else:
            pool = client.connection_pool
            master = None
            if isinstance(pool, redis.sentinel.SentinelConnectionPool):
                master = pool.get_master_address
            self._mux = SyncMux(
                pool,
                size=MAX_CONNECTIONS,
                wait=CONNECT_TIMEOUT,
                preload=tuple(SCRIPTS.values()),
                master=master,
            )
        self._stop = threading.Event()
        self._closed = False
        """Set by :meth:`close`: waits end (their tokens left their lines), leaves are done."""
        self._shared = SharedClient(client, owned=owned, closing=lambda: self._closed)
        """The client's own connections, as threads share them and close() closes them."""
        self._forked()
        self._pid = -1
        _TWINS.add(self)

    def _forked(self) -> None:
        """The state of this process's threads: made anew in a forked child.

        A gate made before ``fork()`` (Celery prefork) must not leave its children
        sharing one wake-up channel: each child would take the others' waiters in
        the line for its own and pass the turn among its own threads. Nor may a
        child inherit a lock held at the fork, or the parent's waiters.
        """
        self._channel = f"{self._process.channel}.{os.getpid()}.{secrets.token_hex(3)}"
        """This process's wake-up channel for its threads' waiters."""
        self._lock = threading.Lock()
        self._line = Lines()
        """This process's thread waiters (guarded by ``_lock``)."""
        self._subscribed = threading.Event()
        self._broken: BaseException | None = None
        self._settled = threading.Condition()
        self._attempts = 0
        """Attempts to subscribe that ended (guarded by ``_settled``)."""
        self._again = threading.Event()
        self._ever_subscribed = False
        self._thread: threading.Thread | None = None
        self._wakeups: SyncWakeups | None = None

    def _listening(self) -> None:
        if self._closed:  # its listener is gone for good: refuse rather than time out
            raise CLOSED_FOR_THREADS()
        with self._lock:
            if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
                self._pid = os.getpid()  # threads do not survive fork: start our own
                self._subscribed.clear()
                self._thread = threading.Thread(
                    target=self._listen, name="inturn-redis-wakeups", daemon=True
                )
                self._thread.start()
        if self._subscribed.is_set():
            return
        # As in the async backend: learn the outcome of an attempt made since asking
        # (asking for one now if the last failed), shared by the threads that ask.
        with self._settled:
            if self._closed:  # read under the lock close() ends these waits with
                raise CLOSED_FOR_THREADS()
            seen = self._attempts
            if self._broken is not None:
                self._again.set()
            self._settled.wait_for(lambda: self._attempts > seen, CONNECT_TIMEOUT)
        if self._closed:  # close() ended the wait
            raise CLOSED_FOR_THREADS()
        if not self._subscribed.is_set():
            broken = self._broken or TimeoutError("no answer")
            what = "subscribe" if self._ever_subscribed else "connect"
            raise unavailable(broken, what) from broken

    def _settle(self, broken: BaseException | None) -> None:
        """An attempt to subscribe ended: record how, and wake the threads waiting for it."""
        with self._settled:
            self._broken = broken
            if broken is None:
                self._subscribed.set()
                self._ever_subscribed = True
            else:
                self._subscribed.clear()
                self._again.clear()
            self._attempts += 1
            self._settled.notify_all()

    def _backoff(self, seconds: float) -> None:
        """Sleep between two attempts, cut short by a thread that asks for one now."""
        self._again.wait(seconds)

    def _listen(self) -> None:
        """The listener thread: read this process's wake-ups; reconnect with backoff.

        The subscribed connection's socket is read here directly (see
        :class:`SyncWakeups`): a push is parsed and its waiter woken, and the
        thread is back in ``recv`` (the GIL released) at once.
        """
        process = self._process
        backoff = 0.05
        first = True
        pid = os.getpid()
        attempt = 0
        while not self._stop.is_set() and pid == os.getpid():
            attempt += 1
            try:
                wakeups = self._wakeups = self._open_wakeups(attempt)
            except Exception as exc:
                self._settle(exc)
                self._backoff(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            try:
                wakeups.subscribe(self._channel, CONNECT_TIMEOUT)
                if not process.checked_eviction:
                    try:
                        with self._calling("config get"):
                            reply = self._client.config_get("maxmemory-policy")
                        policy = _doctor.policy_of(reply)
                    except Exception:  # CONFIG may be disabled (managed Redis)
                        policy = None
                    _doctor.warn_eviction(process, policy)
                self._settle(None)
                backoff = 0.05
                if not first:
                    with self._lock:
                        for waiter in self._line.waiters.values():
                            waiter.next_check = 0.0
                            wake(waiter)
                first = False
                lock, waiters = self._lock, self._line.waiters
                while not self._stop.is_set():
                    for push in wakeups.pushes(IDLE_READ):
                        with lock:
                            granted = process.deliver(push[2], waiters)
                        if granted is not None:
                            wake(granted)
            except Exception as exc:
                if self._stop.is_set():
                    return
                ever = self._ever_subscribed
                self._settle(exc)
                log_channel_lost(exc, backoff, ever=ever)
                with self._lock:
                    for waiter in self._line.waiters.values():
                        wake(waiter)
                self._backoff(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                wakeups.close()

    def _open_wakeups(self, attempt: int) -> SyncWakeups:
        """A new connection, handshaken by redis-py, to subscribe on.

        On a Cluster, classic PUBLISH reaches subscribers on every node, so the
        listener subscribes on one node (another one after each failure).
        """
        client = self._client
        if isinstance(client, redis.cluster.RedisCluster):
            nodes = client.get_nodes()  # type: ignore[no-untyped-call]
            client = nodes[attempt % len(nodes)].redis_connection
        pool = client.connection_pool
        conn = pool.connection_class(**pool.connection_kwargs)
        try:
            conn.connect()
        except BaseException:
            with contextlib.suppress(Exception):
                conn.disconnect()
            raise
        return SyncWakeups(conn)

    def _run(
        self,
        name: str,
        key: str,
        args: list[Any],
        keys: list[str] | None = None,
        *,
        timeout: float | None = None,
        wait: ReplicaWait | None = None,
    ) -> Any:
        """Run a script; ``timeout`` bounds the wait for its reply (on a Cluster: unless
        redis-py's client runs it, after a redirection);
        ``wait``: return once replicas have its write (see ReplicaWait)."""
        keys = self._calls.turn_keys(key) if keys is None else keys
        try:
            with map_errors(name):
                runner = self._mux if self._mux is not None else self._nodes
                if runner is not None:
                    sha, lua = SHAS[name]
                    then = None if wait is None else wait.command()
                    try:
                        reply = runner.evalsha(
                            sha,
                            lua,
                            keys,
                            args,
                            timeout=timeout,
                            idempotent=idempotent(name, args),
                            then=then,
                        )
                    except NotHere:  # a Cluster master did not run it: redis-py finds the node
                        pass
                    else:
                        return reply if wait is None else wait.checked(reply, name)
                reply = self._scripts[name](keys=keys, args=args)
                if wait is not None:
                    wait.missed(name)
                return reply
        except Exception as exc:
            raise_if_closing(exc, self._closed, CLOSED_FOR_THREADS)
            raise

    def _calling(self, what: str) -> contextlib.AbstractContextManager[None]:
        """A call through the client's own connections: see :meth:`SharedClient.calling`."""
        return self._shared.calling(what)

    def _script(self, call: Call, key: str, *, durable: bool = False) -> Any:
        """Run a script whose KEYS and ARGV :class:`Scripts` built (``durable``: see
        :meth:`RedisBackend._script`)."""
        name, keys, args = call
        return self._run(name, key, args, keys, wait=self._wait if durable else None)

    @contextlib.contextmanager
    def _changing(self, key: str) -> Iterator[None]:
        """Mark a call that changes the key's line as in flight, for its duration.

        No turn is handed over inside the process meanwhile: our view of the
        line's order may be stale (threads' JOINs use several connections).
        """
        with self._lock:
            self._line.changing(key, 1)
        try:
            yield
        finally:
            with self._lock:
                self._line.changing(key, -1)

    def _record_place(self, token: str, waiter: Waiter, reply: Sequence[Any], sent: float) -> None:
        """Record where a JOIN or REFRESH left the waiter in its key's line.

        Call with ``_lock`` held. A JOIN's reply carries the waiter's sequence
        number, which orders it among this process's other waiters of the key.
        """
        queued(waiter, reply, sent)
        if len(reply) > 3 and token in self._line.waiters:  # a JOIN's: its place
            self._line.place(token, waiter)

    def join(self, key: str, token: str, lease: float) -> Grant | None:
        self._listening()
        waiter = Waiter(key, lease, event=Signal())
        with self._lock:
            self._line.waiters[token] = waiter  # a push may come before the reply
            self._line.changing(key, 1)  # no hand-over for the key until it has its place
        sent = time.monotonic()
        args = [token, ms(lease), alive_ms(lease), self._channel, "join"]
        reply: Sequence[Any] = ()
        try:
            reply = self._run("join", key, args)
        finally:
            with self._lock:
                self._line.changing(key, -1)
                closed = self._closed  # read under the lock close() takes the waiters with
                if reply and reply[0] != 1 and not closed:
                    self._record_place(token, waiter, reply, sent)
                else:  # granted at once, failed, or the twin closed meanwhile
                    self._line.forget(token)
            if closed and not (reply and reply[0] == 1):  # a granted JOIN is held
                # This JOIN may have reached the server after closing's LEAVE.
                self._closed_wait(key, token, again=True)
        return decode_grant(reply, sent, lease) if reply[0] == 1 else None

    def try_acquire(self, key: str, token: str, lease: float) -> Grant | None:
        sent = time.monotonic()
        args = [token, ms(lease), alive_ms(lease), self._channel, "try"]
        reply = self._run("join", key, args)
        return decode_grant(reply, sent, lease) if reply[0] == 1 else None

    def wait(self, key: str, token: str, timeout: float | None) -> Grant | None:
        with self._lock:
            waiter = self._line.waiters.get(token)
        if self._closed:
            self._closed_wait(key, token)
        if waiter is None or waiter.event is None:
            raise RuntimeError(f"token {token!r} is not waiting for key {key!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        outage = Outage()
        while True:
            if self._closed:
                self._closed_wait(key, token)
            if waiter.grant is not None:
                with self._lock:
                    self._line.forget(token)
                return waiter.grant
            now = time.monotonic()
            if now >= waiter.next_check:
                try:
                    limit = None if deadline is None else deadline - now
                    grant = self._refresh(key, token, waiter, limit)
                except BackendUnavailable as exc:
                    waiter.next_check = outage.failed(exc, now, deadline)
                    continue
                outage.ok()
                if grant is not None and not self._closed:  # closing releases it
                    with self._lock:
                        self._line.forget(token)
                    return grant
                continue
            if deadline is not None and now >= deadline:
                outage.raise_if_down()
                return None
            sleep = waiter.next_check - now
            if deadline is not None:
                sleep = min(sleep, deadline - now)
            if waiter.event.wait(sleep) and waiter.grant is None:
                waiter.next_check = 0.0  # woken without a grant (reconnect): re-check now

    def _closed_wait(self, key: str, token: str, *, again: bool = False) -> None:
        """The twin was closed while the token waited: :meth:`close` took the waiters it
        saw out of their lines. One it did not see, or (``again``) one whose JOIN was on
        its way and may have reached the server after closing's LEAVE, leaves now, on a
        connection of its own (a grant that found it is released). Then the wait raises."""
        with self._lock:
            late = self._line.forget(token)
        if late is not None or again:
            try:
                self._after_close_call(key, token, leave=True)
            except BackendUnavailable as exc:
                logger.debug("inturn: closing could not take a waiter out of its line: %r", exc)
        raise closed_while_waiting(key)

    def _run_bounded(self, name: str, key: str, args: list[Any], timeout: float) -> Any:
        return self._run(name, key, args, timeout=timeout)

    def _refresh(self, key: str, token: str, waiter: Waiter, limit: float | None) -> Grant | None:
        """Re-check a waiter on the server (REFRESH; JOIN again if declared dead).

        As :meth:`RedisBackend._refresh`; a reply is not awaited past ``limit``
        seconds (the caller's deadline: the re-check then fails with
        BackendUnavailable).
        """
        with self._changing(key):
            sent = begun = time.monotonic()
            reply = self._run("refresh", key, [token, alive_ms(waiter.lease)], timeout=limit)
            if reply[0] == -1 and self._closed:  # left by close(): not back into the line
                return None
            if reply[0] == -1:  # declared dead: join again, at the end
                with self._lock:
                    waiter.solo = False
                    waiter.seq = 0
                    self._line.place(token, waiter)  # first, unknown: no hand-over passes it
                args = [token, ms(waiter.lease), alive_ms(waiter.lease), self._channel]
                sent = time.monotonic()
                limit = None if limit is None else limit - (sent - begun)
                reply = self._run("join", key, [*args, "join"], timeout=limit)
            if reply[0] == 1:
                return decode_grant(reply, sent, waiter.lease)
            with self._lock:
                self._record_place(token, waiter, reply, sent)
        return None

    def _after_close_call(self, key: str, token: str, *, leave: bool = False) -> None:
        """Release (``leave``: leave the line, or release a grant found) after close()."""
        self._shared.release_after_close(self._calls, key, token, leave=leave)

    def renew(self, key: str, token: str, lease: float) -> bool:
        return bool(self._run("renew", key, [token, ms(lease)]))

    def release(self, key: str, token: str, *, fence: int | None = None) -> None:
        if self._closed:  # a turn held across close(): released on a connection of its own
            self._after_close_call(key, token)
            return
        sent = time.monotonic()
        args: list[Any] = [token]
        handed: Grant | None = None
        if fence is not None:
            with self._lock:
                solo = self._line.next_solo(key)
                if solo is not None:  # see RedisBackend.release; this thread waits for the reply
                    handed = hand_over(solo, fence, sent, concurrent.futures.Future())
                    args += [solo[0], ms(solo[1].lease)]
        try:
            reply = self._run("release", key, args)
        except BaseException:
            if handed is not None:
                confirm(handed, None)
            raise
        with self._lock:
            granted = after_release(self._process, self._line, reply, args, handed, sent)
        if granted is not None:
            wake(granted)

    def leave(self, key: str, token: str) -> Grant | None:
        with self._lock:
            waiter = self._line.forget(token)
        if self._closed:  # close() took the threads' waiters out of their lines
            return None
        sent = time.monotonic()
        with self._changing(key):
            reply = self._run("leave", key, [token])
        if reply[0] == 1:
            return decode_grant(reply, sent, waiter.lease if waiter else int(reply[2]) / 1000)
        return None

    def is_held(self, key: str, token: str) -> bool:
        with self._calling("is_held"):
            return holder_of(self._client.get(self._process.keys.turn_keys(key)[0]), token)

    def is_busy(self, key: str) -> bool:
        owner, line, _, _ = self._process.keys.turn_keys(key)
        with self._calling("is_busy"):
            return bool(self._client.exists(owner, line))

    def footprint(self) -> int:
        keys = self._process.keys
        with self._calling("footprint"):
            return sum(
                1
                for name in self._client.scan_iter(match=keys.prefix + "*", count=1000)
                if keys.is_turn_state(text(name))
            )

    def statistics(self, key: str | None = None, *, limit: int = 1000) -> Statistics:
        """See :meth:`RedisBackend.statistics`."""
        with self._calling("statistics"):
            return _doctor.statistics_sync(self._client, self._process.keys, key, limit)

    # -- dedup and newest-call-wins -----------------------------------------------------

    def claim(
        self,
        key: str,
        scope: str,
        id: str,
        token: str,
        *,
        fence: int | None,
        lease: float,
        window: float,
    ) -> ClaimResult:
        call = self._calls.claim(key, scope, id, token, fence, lease, window)
        return decode_claim(self._script(call, key))

    def finish(
        self, key: str, scope: str, id: str, token: str, result: str | None, *, window: float
    ) -> None:
        self._script(self._calls.finish(key, scope, id, token, result, window), key)

    def abandon(self, key: str, scope: str, id: str, token: str) -> None:
        self._script(self._calls.abandon(key, scope, id, token), key)

    def supersede(self, key: str, scope: str, *, cancel_running: bool) -> int:
        return int(self._script(self._calls.supersede(key, scope, cancel_running), key))

    def is_newest(self, key: str, scope: str, generation: int) -> bool:
        with self._calling("is_newest"):
            current = self._client.get(self._process.keys.supersede_keys(key, scope)[0])
        return current is None or int(current) <= generation

    def close(self) -> None:
        """Take the threads' waiters out of their lines (their waits raise; see
        ``_closing``), then stop the listener thread and close the connections."""
        self._closed = True
        with self._lock:  # out of the local line now: their waits have nothing left to do
            waiters = dict(self._line.waiters)
            for token in waiters:
                self._line.forget(token)
        for waiter in waiters.values():
            wake(waiter)
        if not self._stop.is_set():
            leave_at_close_sync(waiters, self._run_bounded)
        self._stop.set()
        self._again.set()  # a listener in its backoff ends now
        with self._settled:  # so do the threads waiting for the first subscription
            self._attempts += 1
            self._settled.notify_all()
        if self._mux is not None:
            self._mux.close()
        if self._nodes is not None:
            self._nodes.close()
        wakeups = self._wakeups
        if wakeups is not None:  # wakes the listener's blocked read: it sees _stop and ends
            wakeups.close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(LISTENER_ENDS)  # its connection (one it was making, too) is closed
        self._shared.close()
