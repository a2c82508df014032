"""The async Redis backend: FIFO turns across processes and machines.

URLs: ``redis://``, ``rediss://`` (TLS), ``unix://``, ``redis+sentinel://`` and
``redis+cluster://``; or inject a redis-py client (``RedisBackend(client,
sync_client=...)``).

How it keeps the contract (the scripts are in :mod:`._lua`):

- every operation is one Lua script, one round trip, on the keys of one user,
  which share a hash tag (one Cluster slot);
- a key's line is a Redis list; release hands the turn to the first *live*
  waiter in the same script and PUBLISHes the grant on that waiter's process
  channel. Each process holds **one** subscribed connection per event loop
  (and one for its threads): thousands of waiters share it;
- a waiter sleeps until that push. Behind the push is a bounded re-check (at
  most every ``RECHECK_MAX`` seconds, and when the holder's lease would lapse):
  it refreshes the waiter's liveness mark (dead waiters are skipped) and hands
  a lapsed holder's turn to the head of the line. It is a safety net for a
  lost push or a killed holder, never the main wake-up;
- JOIN, RENEW, RELEASE, LEAVE and REFRESH are idempotent, so they are retried
  after a dropped connection without queueing a token twice.

What it does not promise: a Redis primary that fails over to a replica that
missed the last writes, or restarts without persistence, can lose a lease
(two holders for a while). Fences stay increasing then (they follow the
server clock), so a sink that checks fences stays safe. ``diagnose()`` says
which of these a server risks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.exceptions

from inturn._backends._wakeup import closed_while_waiting, raise_if_closing
from inturn._backends.base import (
    ClaimResult,
    Diagnostics,
    Grant,
    Statistics,
)
from inturn._errors import BackendUnavailable, ConfigurationError

from . import _doctor
from ._admin import RedisAdmin
from ._boxes import Mailboxes
from ._closing import CLOSED_ON_LOOP, client_call, leave_at_close, release_after_close
from ._keys import KeySpace
from ._listener import listen_until_closed
from ._mux import Mux
from ._nodes import NodeMuxes, NotHere
from ._release import Releases
from ._shared import (
    CONNECT_TIMEOUT,
    SCRIPTS,
    SHAS,
    SOCKET_TIMEOUT,
    SUPERSEDE_KEEP,
    TIME_UP,
    Call,
    LoopState,
    Outage,
    ProcessChannel,
    ReplicaWait,
    Scripts,
    Waiter,
    alive_ms,
    decode_claim,
    decode_grant,
    holder_of,
    idempotent,
    is_cluster,
    map_errors,
    ms,
    queued,
    text,
    time_up,
    unavailable,
    wake,
)
from ._sync import SyncRedisBackend
from ._urls import aclose_client, factories, masked, replica_wait, wait_options

__all__ = ["RedisBackend"]

logger = logging.getLogger("inturn")

_BACKENDS: weakref.WeakSet[RedisBackend] = weakref.WeakSet()
"""Every async Redis backend of this process: a forked child drops their loops' state."""


def _after_fork_in_child() -> None:
    for backend in list(_BACKENDS):
        backend._forked()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)


class RedisBackend(Releases, Mailboxes, RedisAdmin):
    """The async Redis backend. See the module docstring for what it guarantees.

    ``client`` is a ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster``;
    ``sync_client`` (``redis.Redis`` / ``redis.cluster.RedisCluster``) serves the
    sync twin (``gate.turn_sync``). With :meth:`from_url` both are made for you,
    one async client per event loop.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        sync_client: Any = None,
        namespace: str = "default",
        wait_replicas: int = 0,
        wait_timeout: float = 0.1,
        _factory: Any = None,
        _sync_factory: Any = None,
    ) -> None:
        if client is None and _factory is None:
            raise ConfigurationError("RedisBackend needs a redis-py client (or use from_url)")
        self._wait = replica_wait(wait_replicas, wait_timeout)
        process = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._process = ProcessChannel(KeySpace(namespace), KeySpace(namespace).channel(process))
        self._url: str | None = None
        self._client = client
        self._factory = _factory
        self._sync_client = sync_client
        self._sync_factory = _sync_factory
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopState] = (
            weakref.WeakKeyDictionary()
        )
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], LoopState] | None = None
        """The loop of the last ``_state()`` call and its state (dropped with the state)."""
        self._closed_on: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        """Loops this backend was closed on: a call there is refused (see ``_state``)."""
        self._twin: SyncRedisBackend | None = None
        self._twin_lock = threading.Lock()
        _BACKENDS.add(self)

    def _forked(self) -> None:
        """In a forked child: the parent's loops, listeners and connections are not ours
        (each loop the child runs makes its own, on a channel of its own)."""
        self._states = weakref.WeakKeyDictionary()
        self._last = None
        self._closed_on = weakref.WeakSet()
        self._twin_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "default") -> RedisBackend:
        """Build the backend from a ``redis://``, ``rediss://``, ``unix://``,
        ``redis+sentinel://`` or ``redis+cluster://`` URL."""
        url, wait = wait_options(url)
        make_async, make_sync = factories(url)
        backend = cls(
            namespace=namespace,
            wait_replicas=wait[0],
            wait_timeout=wait[1],
            _factory=make_async,
            _sync_factory=make_sync,
        )
        backend._url = url
        return backend

    @property
    def ordered_submits(self) -> bool:
        """True when this event loop's mailbox submits reach the server in call order:
        they share one pipelined connection (on Cluster, redis-py's pool sends them)."""
        try:
            return self._state().mux is not None
        except RuntimeError:  # no running event loop
            return False

    # -- per-loop state -------------------------------------------------------------

    def _state(self) -> LoopState:
        """This loop's state, made on first use; raises BackendUnavailable (only) when the
        backend was closed on this loop."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:  # the loop of the last call: most calls
            return last[1]
        state = self._states.get(loop)
        if state is None:
            if loop in self._closed_on:  # a call after aclose(): no new connections (a leak)
                raise CLOSED_ON_LOOP()
            client = self._client if self._client is not None else self._factory()
            scripts: dict[str, Any] = {}
            mux = nodes = None
            if is_cluster(client):  # scripts go by slot: to its master's own connection
                scripts = {name: client.register_script(lua) for name, lua in SCRIPTS.items()}
                kwargs: dict[str, Any] = getattr(client, "get_connection_kwargs", dict)()
                timeout = kwargs.get("socket_timeout") or SOCKET_TIMEOUT
                nodes = NodeMuxes(client, timeout=timeout, preload=tuple(SCRIPTS.values()))
            else:
                pool = client.connection_pool
                timeout = pool.connection_kwargs.get("socket_timeout") or SOCKET_TIMEOUT
                master = None
                if isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool):
                    master = pool.get_master_address
                mux = Mux(pool, timeout=timeout, preload=tuple(SCRIPTS.values()), master=master)
            channel = f"{self._process.channel}.{secrets.token_hex(4)}"
            calls = Scripts(self._process.keys, cluster=is_cluster(client))
            state = LoopState(
                client=client, scripts=scripts, channel=channel, mux=mux, nodes=nodes, calls=calls
            )
            self._states[loop] = state
        self._last = (weakref.ref(loop), state)
        return state

    async def _close_state(self, state: LoopState) -> None:
        """Close a loop's pipelined connection, and its client if made here."""
        if state.mux is not None:
            await state.mux.aclose()
        if state.nodes is not None:
            await state.nodes.aclose()
        state.closed = True  # a client call still in flight closes it again as it ends
        if self._client is None:
            await aclose_client(state.client)

    async def _listening(self) -> LoopState:
        """The loop's state, once its wake-up channel is subscribed."""
        state = self._state()
        if state.listener is None or state.listener.done():
            state.listener = asyncio.ensure_future(self._listen(state))
        if not state.subscribed.is_set():
            # Wait for the listener's attempt in progress, or ask for one now: every
            # caller learns the outcome of an attempt made since it asked (a refused
            # connection, a wrong password), at once, and many callers share one.
            settled = state.settled
            if state.broken is not None:
                state.again.set()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await settled.wait()
            except TimeoutError as exc:
                raise unavailable(state.broken or exc, "subscribe") from state.broken
            if state.closing:  # aclose() ended the wait (see aclose)
                raise CLOSED_ON_LOOP()
            if not state.subscribed.is_set():
                broken = state.broken or ConnectionError("the wake-up channel dropped")
                what = "subscribe" if state.ever_subscribed else "connect"
                raise unavailable(broken, what) from broken
        return state

    async def _listen(self, state: LoopState) -> None:
        """Read wake-ups for this loop's waiters; reconnect with backoff.

        Ends when cancelled (``aclose()``, or ``asyncio.run()`` shutting the loop
        down) or when ``state.closing`` is set; either way it closes our client
        while its loop still runs (its connections cannot outlive the loop).
        """
        try:
            await listen_until_closed(self._process, state)
        finally:
            self._closed_on.add(asyncio.get_running_loop())  # aclose(), or the loop ends
            self._states.pop(asyncio.get_running_loop(), None)
            self._last = None
            with contextlib.suppress(Exception):
                await asyncio.shield(self._close_state(state))

    @staticmethod
    async def _in_order(state: LoopState) -> None:
        """Wait behind a JOIN that waits for this loop's first subscription.

        A JOIN is sent only once the wake-up channel is subscribed; a call made
        after it (a ``turn_nowait``, a claim, a submit) must not reach the server
        first. They all wait on the same event, which resumes them in the order
        they began waiting (and the mux keeps that order on the wire). Only the
        first subscription is waited for: while the channel is being re-made after
        a failure, calls go straight on (and fail, or succeed, on their own).
        """
        if state.subscribed.is_set() or state.broken is not None:
            return
        listener = state.listener
        if listener is None or listener.done():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await state.settled.wait()  # the event the JOINs wait on: same order
        if state.closing:  # aclose() ended the wait (see aclose)
            raise CLOSED_ON_LOOP()

    async def _run(
        self,
        state: LoopState,
        name: str,
        key: str,
        args: list[Any],
        keys: list[str] | None = None,
        *,
        wait: ReplicaWait | None = None,
        hold: bool = False,
        lazy: bool = False,
    ) -> Any:
        """Run a script; with ``wait``, return once replicas have its write (see ReplicaWait);
        with ``hold``, it leaves at the end of this loop step; ``lazy``: its reply may wait
        unread until the loop wakes for something else (``Mux.evalsha``)."""
        keys = state.calls.turn_keys(key) if keys is None else keys
        if not state.subscribed.is_set():
            await self._in_order(state)
        try:
            runner = state.mux if state.mux is not None else state.nodes
            if runner is not None:
                sha, lua = SHAS[name]
                then = None if wait is None else wait.command()
                resend = idempotent(name, args)
                try:
                    reply = await runner.evalsha(
                        sha, lua, keys, args, idempotent=resend, then=then, hold=hold, lazy=lazy
                    )
                except NotHere:  # a Cluster master did not run it: redis-py finds the node
                    pass
                else:
                    return reply if wait is None else wait.checked(reply, name)
            reply = await state.scripts[name](keys=keys, args=args)
            if wait is not None:
                wait.missed(name)
            return reply
        except Exception as exc:  # mapped here, not in a `with` around every call (hot path)
            raise_if_closing(exc, state.closing, CLOSED_ON_LOOP)
            with map_errors(name):
                raise

    def _calling(
        self, what: str, state: LoopState | None = None
    ) -> contextlib.AbstractAsyncContextManager[LoopState]:
        """A call through this loop's client: see :func:`client_call`."""
        return client_call(state or self._state(), what, owned=self._client is None)

    async def _script(
        self,
        call: Call,
        key: str,
        state: LoopState | None = None,
        *,
        durable: bool = False,
        hold: bool = False,
    ) -> Any:
        """Run a script whose KEYS and ARGV :class:`Scripts` built; ``durable``: wait for
        replicas when the backend is configured to (``wait_replicas``); ``hold``: see _run."""
        name, keys, args = call
        wait = self._wait if durable else None
        state = state or self._state()
        return await self._run(state, name, key, args, keys, wait=wait, hold=hold)

    # -- the Backend protocol -----------------------------------------------------------

    async def join(self, key: str, token: str, lease: float) -> Grant | None:
        state = self._state()
        listener = state.listener
        if listener is None or listener.done() or not state.subscribed.is_set():
            state = await self._listening()
        loop = asyncio.get_running_loop()
        # Registered before the script is sent: the push can arrive before its reply, and
        # this loop's waiters of a key are listed in the order their JOINs were sent.
        waiter = Waiter(key, lease, future=loop.create_future())
        # Behind a waiter of this loop's that still waits, the JOIN cannot be granted now:
        # its reply can wait until the loop wakes anyway (it ends no holder's sleep early).
        line = state.lines.get(key)
        behind_ours = line is not None and any(w.grant is None for w in line.values())
        state.enlist(token, waiter)
        sent = time.monotonic()
        args = [token, ms(lease), alive_ms(lease), state.channel, "join"]
        try:
            reply = await self._run(state, "join", key, args, lazy=behind_ours)
        except BaseException:
            state.forget(token)
            raise
        if reply[0] == 1:
            state.forget(token)
            return decode_grant(reply, sent, lease)
        queued(waiter, reply, sent)
        return None

    async def try_acquire(self, key: str, token: str, lease: float) -> Grant | None:
        state = self._state()
        sent = time.monotonic()
        args = [token, ms(lease), alive_ms(lease), state.channel, "try"]
        reply = await self._run(state, "join", key, args)
        return decode_grant(reply, sent, lease) if reply[0] == 1 else None

    async def wait(self, key: str, token: str, timeout: float | None) -> Grant | None:
        try:
            state = self._state()
        except BackendUnavailable as exc:  # closed on this loop (see _state)
            raise closed_while_waiting(key) from exc
        waiter = state.waiters.get(token)
        if waiter is None or waiter.future is None:
            raise RuntimeError(f"token {token!r} is not waiting for key {key!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        outage = Outage()
        while True:
            if state.closing:  # aclose() took the token out of the line (see _closing)
                state.forget(token)
                raise closed_while_waiting(key)
            if waiter.grant is not None:
                state.forget(token)
                return waiter.grant
            now = time.monotonic()
            if now >= waiter.next_check:
                try:
                    grant = await self._refresh(state, key, token, waiter)
                except BackendUnavailable as exc:
                    waiter.next_check = outage.failed(exc, now, deadline)
                    continue
                outage.ok()
                if grant is not None and not state.closing:  # closing releases it
                    state.forget(token)
                    return grant
                continue
            if deadline is not None and now >= deadline:
                outage.raise_if_down()
                return None
            sleep = waiter.next_check - now
            if deadline is not None:
                sleep = min(sleep, deadline - now)
            if waiter.future.done():  # a wake-up without a grant: re-check now
                waiter.future = asyncio.get_running_loop().create_future()
                waiter.next_check = 0.0
                continue
            # Awaited directly: a push resumes this task in one loop step. A timer (cheaper
            # than a timeout scope) resolves the future with TIME_UP; the next pass makes a
            # fresh one (wakes come only from this loop's thread: none slips in between).
            future = waiter.future
            loop = asyncio.get_running_loop()
            timer = loop.call_at(loop.time() + sleep, time_up, future)
            try:
                await future
            finally:
                timer.cancel()
            if future.result() is TIME_UP:
                waiter.future = loop.create_future()

    async def _refresh(
        self, state: LoopState, key: str, token: str, waiter: Waiter
    ) -> Grant | None:
        """Re-check a waiter on the server: REFRESH its liveness mark, or JOIN again.

        A waiter declared dead (it missed its re-checks: a long pause) is out of
        the line; it joins again at the end. Returns the grant if it got one.
        """
        sent = time.monotonic()
        reply = await self._run(state, "refresh", key, [token, alive_ms(waiter.lease)])
        if reply[0] == -1:  # we were declared dead (a long pause): join again, at the end
            waiter.solo = False
            if state.forget(token) is not None:
                state.enlist(token, waiter)
            args = [token, ms(waiter.lease), alive_ms(waiter.lease), state.channel, "join"]
            sent = time.monotonic()
            reply = await self._run(state, "join", key, args)
        if reply[0] == 1:
            return decode_grant(reply, sent, waiter.lease)
        queued(waiter, reply, sent)
        return None

    async def renew(self, key: str, token: str, lease: float) -> bool:
        reply = await self._run(self._state(), "renew", key, [token, ms(lease)])
        return bool(reply)

    async def leave(self, key: str, token: str) -> Grant | None:
        try:
            state = self._state()
        except BackendUnavailable:  # closed on this loop: closing took its waiters out of line
            return None
        waiter = state.forget(token)
        sent = time.monotonic()
        reply = await self._run(state, "leave", key, [token])
        if reply[0] == 1:
            return decode_grant(reply, sent, waiter.lease if waiter else int(reply[2]) / 1000)
        return None

    async def is_held(self, key: str, token: str) -> bool:
        owner = self._process.keys.turn_keys(key)[0]
        async with self._calling("is_held") as state:
            return holder_of(await state.client.get(owner), token)

    async def is_busy(self, key: str) -> bool:
        owner, line, _, _ = self._process.keys.turn_keys(key)
        async with self._calling("is_busy") as state:
            return bool(await state.client.exists(owner, line))

    async def footprint(self) -> int:
        keys = self._process.keys
        count = 0
        async with self._calling("footprint") as state:
            async for name in state.client.scan_iter(match=keys.prefix + "*", count=1000):
                count += keys.is_turn_state(text(name))
        return count

    async def statistics(self, key: str | None = None, *, limit: int = 1000) -> Statistics:
        """See :meth:`Backend.statistics`: a SCAN of the namespace (of every Cluster master)."""
        async with self._calling("statistics") as state:
            return await _doctor.statistics(state.client, self._process.keys, key, limit)

    async def diagnose(self) -> Diagnostics:
        """See :meth:`Backend.diagnose` (version, eviction policy, persistence, rights)."""
        wait = self._wait.replicas if self._wait is not None else 0
        async with self._calling("diagnose") as state:
            server = masked(self._url) if self._url else _doctor.server_of(state.client)
            return await _doctor.diagnose(state.client, server, wait=wait)

    # -- dedup and newest-call-wins -----------------------------------------------------

    async def claim(
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
        state = self._state()
        call = state.calls.claim(key, scope, id, token, fence, lease, window)
        return decode_claim(await self._script(call, key, state))

    async def finish(
        self, key: str, scope: str, id: str, token: str, result: str | None, *, window: float
    ) -> None:
        state = self._state()
        await self._script(state.calls.finish(key, scope, id, token, result, window), key, state)

    async def abandon(self, key: str, scope: str, id: str, token: str) -> None:
        state = self._state()
        await self._script(state.calls.abandon(key, scope, id, token), key, state)

    async def supersede(self, key: str, scope: str, *, cancel_running: bool) -> int:
        state = await self._listening() if cancel_running else self._state()
        return int(
            await self._script(state.calls.supersede(key, scope, cancel_running), key, state)
        )

    async def is_newest(self, key: str, scope: str, generation: int) -> bool:
        counter = self._process.keys.supersede_keys(key, scope)[0]
        async with self._calling("is_newest") as state:
            current = await state.client.get(counter)
        return current is None or int(current) <= generation

    async def start_running(
        self, key: str, scope: str, token: str, on_cancel: Callable[[], None]
    ) -> None:
        state = await self._listening()
        state.cancels[token] = on_cancel
        running = self._process.keys.supersede_keys(key, scope)[1]
        value = f"{token}|{state.channel}"
        try:
            async with self._calling("start_running", state):
                await state.client.set(running, value, px=ms(SUPERSEDE_KEEP))
        except BaseException:
            state.cancels.pop(token, None)
            raise

    async def stop_running(self, key: str, scope: str, token: str) -> None:
        state = self._state()
        state.cancels.pop(token, None)
        running = self._process.keys.supersede_keys(key, scope)[1:]
        await self._run(state, "stop_running", key, [token], running)

    def sync_twin(self) -> SyncRedisBackend:
        with self._twin_lock:  # threads may race to their first turn_sync
            return self._make_twin()

    def _make_twin(self) -> SyncRedisBackend:
        if self._twin is None:
            client = self._sync_client
            if client is None:
                if self._sync_factory is None:
                    raise ConfigurationError(
                        "the sync twin of an injected async Redis client needs "
                        "RedisBackend(client, sync_client=redis.Redis(...))"
                    )
                client = self._sync_factory()
            self._twin = SyncRedisBackend(
                client, self._process, owned=self._sync_client is None, wait=self._wait
            )
        return self._twin

    async def _release_after_close(self, key: str, token: str) -> None:
        """Release a turn held across ``aclose()`` on this loop, on a connection of its own."""
        owned = self._client is None
        client = self._factory() if owned else self._client
        calls = Scripts(self._process.keys, cluster=is_cluster(client))
        await release_after_close(client, owned=owned, calls=calls, key=key, token=token)

    async def aclose(self) -> None:
        """Close this loop's listener and client (and the sync twin's).

        This loop's waiters leave their lines first and their waits raise
        BackendUnavailable (see ``_closing``); a call made on this loop afterwards
        is refused. The state of other event loops is dropped: their connections
        belong to those loops (closed ones cannot be closed again).
        """
        loop = asyncio.get_running_loop()
        self._closed_on.add(loop)
        state = self._states.pop(loop, None)
        self._last = None
        if state is not None:
            state.closing = True
            state.settle()  # calls waiting for the first subscription raise now, too
            for waiter in list(state.waiters.values()):
                wake(waiter)  # each wait sees `closing` and raises
            await leave_at_close(state.waiters, partial(self._run, state))
            listener = state.listener
            if listener is not None and not listener.done():
                # It closes the client on its way out. A cancel that lands while
                # redis-py waits on a stalled handshake can be swallowed; then closing
                # the client's connections under it ends its read.
                listener.cancel()
                done, _ = await asyncio.wait({listener}, timeout=0.5)
                if not done:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(1.0):
                            await self._close_state(state)
                    listener.cancel()
                    done, _ = await asyncio.wait({listener}, timeout=1.0)
                if not done:
                    logger.warning("inturn: the Redis wake-up listener did not stop")
            else:
                await self._close_state(state)
        self._states.clear()
        if self._twin is not None:
            self._twin.close()
