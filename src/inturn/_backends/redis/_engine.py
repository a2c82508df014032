"""The Redis backend: FIFO turns across processes and machines.

URLs: ``redis://``, ``rediss://`` (TLS), ``unix://``, ``redis+sentinel://`` and
``redis+cluster://``; or inject a redis-py client (``RedisBackend(client,
sync_client=...)``).

How it keeps the contract (the scripts are in :mod:`._redis_lua`):

- every operation is one Lua script, one round trip, on the four keys of one
  user, which share a hash tag (one Cluster slot);
- a key's line is a Redis list; release hands the turn to the first *live*
  waiter in the same script and PUBLISHes the grant on that waiter's process
  channel. Each process holds **one** subscribed connection per event loop
  (and one for its threads): thousands of waiters share it;
- a waiter sleeps until that push. Behind the push is a bounded re-check (at
  most every ``recheck`` seconds, and when the holder's lease would lapse):
  it refreshes the waiter's liveness mark (dead waiters are skipped) and hands
  a lapsed holder's turn to the head of the line. It is a safety net for a
  lost push or a killed holder, never the main wake-up;
- JOIN, RENEW, RELEASE, LEAVE and REFRESH are idempotent, so redis-py retries
  them after a dropped connection without queueing a token twice.

What it does not promise: a Redis primary that fails over to a replica that
missed the last writes, or restarts without persistence, can lose a lease
(two holders for a while). Fences stay increasing then (they follow the
server clock), so a sink that checks fences stays safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import socket
import threading
import time
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..._errors import BackendUnavailable, ConfigurationError
from ..base import ClaimResult, Confirmation, Grant, Taken
from ._keys import KeySpace
from ._lua import (
    ABANDON,
    CLAIM,
    FINISH,
    JOIN,
    LEAVE,
    MB_CLAIM,
    MB_RELEASE_TAKE,
    MB_RENEW,
    MB_RETRY,
    MB_SUBMIT,
    MB_TAKE,
    REFRESH,
    RELEASE,
    RENEW,
    STOP_RUNNING,
    SUPERSEDE,
)

try:
    import redis
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.asyncio.retry
    import redis.cluster
    import redis.exceptions
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "the Redis backend needs redis-py: pip install 'inturn[redis]'"
    ) from exc

from ._mux import Mux, SyncMux, sha1  # imports redis-py, so only once it is known to be there

__all__ = ["RedisBackend", "SyncRedisBackend", "from_url"]

logger = logging.getLogger("inturn")

RECHECK_MAX = 2.0
"""Longest sleep (seconds) of a waiter between two re-checks (the safety net)."""

CONNECT_TIMEOUT = 5.0
MAX_CONNECTIONS = 32
"""Connections per pool (per event loop, and one pool for threads) made by from_url."""
SOCKET_TIMEOUT = 5.0
"""Longest wait (seconds) for one reply; with the retries, a paused server is noticed in ~15 s."""
IDLE_READ = 5.0
"""How long the listener blocks on one read before it checks its connection again."""

_TRANSPORT_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)

_SCRIPTS = {
    "join": JOIN,
    "release": RELEASE,
    "renew": RENEW,
    "leave": LEAVE,
    "refresh": REFRESH,
    "claim": CLAIM,
    "finish": FINISH,
    "abandon": ABANDON,
    "supersede": SUPERSEDE,
    "stop_running": STOP_RUNNING,
    "mb_submit": MB_SUBMIT,
    "mb_take": MB_TAKE,
    "mb_retry": MB_RETRY,
    "mb_claim": MB_CLAIM,
    "mb_renew": MB_RENEW,
    "mb_release_take": MB_RELEASE_TAKE,
}

_SHAS = {name: (sha1(lua), lua) for name, lua in _SCRIPTS.items()}

SUPERSEDE_KEEP = 3600.0
"""Seconds a (user, function) generation counter and running-call record outlive their use."""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _recheck(lease: float) -> float:
    return min(RECHECK_MAX, max(0.05, lease / 3))


def _alive_ms(lease: float) -> int:
    """A waiter is declared dead when it missed three re-checks."""
    return _ms(_recheck(lease) * 3)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _grant(reply: Sequence[Any], sent_at: float, lease: float) -> Grant:
    """A grant from a script's ``{1, fence, pttl_ms}`` reply, with a safe lease start.

    The lease is known to last until ``sent_at + pttl``; counting it from
    ``sent_at + pttl - lease`` never overestimates what is left.
    """
    pttl = int(reply[2]) / 1000
    return Grant(fence=int(reply[1]), granted_at=sent_at + min(pttl, lease) - lease)


def _next_check(reply: Sequence[Any], lease: float) -> float:
    """When a waiter should re-check: at its re-check interval or the holder's lapse."""
    interval = _recheck(lease)
    pttl = int(reply[1]) / 1000 if len(reply) > 1 else -1
    if pttl > 0:
        interval = min(interval, pttl + 0.002)
    return time.monotonic() + interval


def _queued(waiter: _Waiter, reply: Sequence[Any], sent: float) -> None:
    """A JOIN or REFRESH left the waiter in line: when to re-check; whether it is solo."""
    waiter.next_check = _next_check(reply, waiter.lease)
    # The server's mark lasts alive_ms from when the script ran (after `sent`); half of
    # it is the margin for the release that would rely on it.
    waiter.alive_until = sent + _alive_ms(waiter.lease) / 2000
    if len(reply) > 3:  # a JOIN's
        waiter.solo = int(reply[2]) == 1
        waiter.seq = int(reply[3])


def _is_cluster(client: Any) -> bool:
    return isinstance(client, redis.asyncio.cluster.RedisCluster | redis.cluster.RedisCluster)


def _taken(reply: Sequence[Any]) -> Taken:
    status = int(reply[0])
    if status == 1:
        return Taken(messages=tuple(_text(m) for m in reply[1:]))
    if status == 2:
        return Taken(wait=float(_text(reply[1])))
    return Taken(lost_role=status == -1)


def _claimed(reply: Sequence[Any]) -> ClaimResult:
    state = _text(reply[0])
    if state == "done":
        return ClaimResult("done", _text(reply[1]) if reply[1] else None)
    return ClaimResult("new" if state == "new" else "in_progress")


def _unavailable(exc: BaseException, what: str) -> BackendUnavailable:
    return BackendUnavailable(f"Redis did not answer ({what}): {exc}")


def _is_oom(exc: redis.exceptions.ResponseError) -> bool:
    # redis-py parses "-OOM ..." into OutOfMemoryError and drops the code from the text.
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or str(exc).startswith("OOM")


class _Outage:
    """A waiter's re-checks that fail: retried with backoff while Redis may be restarting.

    A waiter rides out a short outage (a restart, a failover) for up to
    ``CONNECT_TIMEOUT`` seconds, never past its own deadline; then the last
    error is raised.
    """

    __slots__ = ("error", "since", "tries")

    def __init__(self) -> None:
        self.since: float | None = None
        self.error: BackendUnavailable | None = None
        self.tries = 0

    def failed(self, exc: BackendUnavailable, now: float, deadline: float | None) -> float:
        """Record a failure; return when to try again, or raise when out of grace."""
        if self.since is None:
            self.since = now
        self.error = exc
        self.tries += 1
        if now - self.since >= CONNECT_TIMEOUT or (deadline is not None and now >= deadline):
            raise exc
        retry_at = now + min(0.05 * 2.0**self.tries, 1.0)
        return retry_at if deadline is None else min(retry_at, deadline)

    def ok(self) -> None:
        self.since, self.error, self.tries = None, None, 0

    def raise_if_down(self) -> None:
        if self.error is not None:
            raise self.error


@dataclass(slots=True)
class _Waiter:
    key: str
    lease: float
    next_check: float = 0.0
    solo: bool = False
    """JOIN said everyone ahead in the line is a waiter of this event loop."""
    alive_until: float = 0.0
    """Until when (monotonic) the server surely still counts this waiter alive."""
    future: asyncio.Future[Grant] | None = None
    event: threading.Event | None = None
    grant: Grant | None = None
    seq: int = 0
    """Its place in the order the line was joined (from JOIN; 0 while unknown)."""


@dataclass(slots=True)
class _Lines:
    """The waiters of one event loop (or of the sync twin's threads), and per key those in
    the key's line, in the server's order: what a release may hand the turn over to."""

    waiters: dict[str, _Waiter] = field(default_factory=dict)
    lines: dict[str, dict[str, _Waiter]] = field(default_factory=dict)
    """Per key, the waiters in line, in the server's order."""
    busy: dict[str, int] = field(default_factory=dict)
    """Per key, calls in flight that change its line (threads only; no hand-over then)."""

    def enlist(self, token: str, waiter: _Waiter) -> None:
        """Register a waiter at the end of its key's line (its JOIN goes out next)."""
        self.waiters[token] = waiter
        self.lines.setdefault(waiter.key, {})[token] = waiter

    def place(self, token: str, waiter: _Waiter) -> None:
        """Put a waiter in its key's line by its join sequence number (threads: JOINs sent
        on several connections reach the server in any order). An unknown number (0) goes
        first: no hand-over passes it."""
        line = self.lines.setdefault(waiter.key, {})
        line.pop(token, None)
        last = next(reversed(line.values()), None)
        line[token] = waiter
        if waiter.seq == 0 or (last is not None and (last.seq == 0 or last.seq > waiter.seq)):
            ordered = sorted(line.items(), key=lambda item: item[1].seq)
            line.clear()
            line.update(ordered)

    def forget(self, token: str) -> _Waiter | None:
        waiter = self.waiters.pop(token, None)
        if waiter is not None:
            line = self.lines.get(waiter.key)
            if line is not None:
                line.pop(token, None)
                if not line:
                    del self.lines[waiter.key]
        return waiter

    def next_solo(self, key: str) -> tuple[str, _Waiter] | None:
        """The waiter a release may hand the turn to at once: the first in the key's line,
        if everyone ahead of it was ours, the server still counts it alive, and no call of
        ours that changes the line is in flight (the release script then confirms exactly
        this grant, and only if the waiter heads the line)."""
        line = self.lines.get(key)
        if not line or self.busy.get(key):
            return None
        token, waiter = next(iter(line.items()))
        if waiter.solo and waiter.grant is None and time.monotonic() < waiter.alive_until:
            return token, waiter
        return None

    def changing(self, key: str, delta: int) -> None:
        """Count a call that changes the key's line in (+1) or out (-1) of flight."""
        count = self.busy.get(key, 0) + delta
        if count:
            self.busy[key] = count
        else:
            self.busy.pop(key, None)


@dataclass(slots=True, kw_only=True)
class _LoopState(_Lines):
    """What the async backend keeps per event loop (redis-py async clients are loop-bound)."""

    client: Any
    scripts: dict[str, Any]
    """redis-py Script objects, on a Cluster only (elsewhere the mux runs the scripts)."""
    channel: str
    """This loop's wake-up channel (pushes for its waiters, cancels for its calls)."""
    mux: Mux | None = None
    """The pipelined connection for scripts (None on a Cluster: its scripts go by slot)."""
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    broken: BaseException | None = None
    listener: asyncio.Task[None] | None = None
    cancels: dict[str, Callable[[], None]] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    """Releases sent again in the background (their first reply was lost)."""
    closing: bool = False


class _Common:
    """Configuration shared by the async backend and its sync twin."""

    def __init__(self, keyspace: KeySpace, channel: str) -> None:
        self.keys = keyspace
        self.channel = channel
        self.checked_eviction = False

    def deliver(
        self, data: bytes | str, waiters: dict[str, _Waiter], granted_at: float | None = None
    ) -> _Waiter | None:
        """Match a grant ("<token>|<fence>") to a waiter of this loop or thread.

        ``granted_at``: a time before the grant, when known (the release that
        handed off was sent then). A push does not say when the grant was made;
        its arrival time is used, which is late by the push's transit (well
        inside the two thirds of a lease that renewal leaves as margin).
        """
        token, _, fence = _text(data).partition("|")
        waiter = waiters.get(token)
        if waiter is not None and waiter.grant is None:
            when = time.monotonic() if granted_at is None else granted_at
            waiter.grant = Grant(fence=int(fence), granted_at=when)
            return waiter
        return None

    def warn_eviction(self, policy: object) -> None:
        self.checked_eviction = True
        if isinstance(policy, dict):
            value = policy.get("maxmemory-policy", policy.get(b"maxmemory-policy"))
            value = _text(value) if value is not None else None
            if value is not None and value != "noeviction":
                logger.warning(
                    "inturn: this Redis evicts keys (maxmemory-policy=%s); an evicted turn "
                    "key breaks mutual exclusion: set maxmemory-policy noeviction",
                    value,
                )


class RedisBackend:
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
        _factory: Any = None,
        _sync_factory: Any = None,
    ) -> None:
        if client is None and _factory is None:
            raise ConfigurationError("RedisBackend needs a redis-py client (or use from_url)")
        process = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._common = _Common(KeySpace(namespace), KeySpace(namespace).channel(process))
        self._client = client
        self._factory = _factory
        self._sync_client = sync_client
        self._sync_factory = _sync_factory
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        self._twin: SyncRedisBackend | None = None
        self._twin_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "default") -> RedisBackend:
        """Build the backend from a ``redis://``, ``rediss://``, ``unix://``,
        ``redis+sentinel://`` or ``redis+cluster://`` URL."""
        make_async, make_sync = _factories(url)
        return cls(namespace=namespace, _factory=make_async, _sync_factory=make_sync)

    # -- per-loop state -------------------------------------------------------------

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            client = self._client if self._client is not None else self._factory()
            scripts: dict[str, Any] = {}
            mux = None
            if _is_cluster(client):  # scripts go by slot, through redis-py
                scripts = {name: client.register_script(lua) for name, lua in _SCRIPTS.items()}
            else:
                pool = client.connection_pool
                timeout = pool.connection_kwargs.get("socket_timeout") or SOCKET_TIMEOUT
                mux = Mux(pool, timeout=timeout, preload=tuple(_SCRIPTS.values()))
            channel = f"{self._common.channel}.{secrets.token_hex(4)}"
            state = _LoopState(client=client, scripts=scripts, channel=channel, mux=mux)
            self._states[loop] = state
        return state

    async def _close_state(self, state: _LoopState) -> None:
        """Close a loop's pipelined connection, and its client if made here."""
        if state.mux is not None:
            await state.mux.aclose()
        if self._client is None:
            await _aclose(state.client)

    async def _listening(self) -> _LoopState:
        """The loop's state, once its wake-up channel is subscribed."""
        state = self._state()
        if state.listener is None or state.listener.done():
            state.listener = asyncio.ensure_future(self._listen(state))
        if not state.subscribed.is_set():
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await state.subscribed.wait()
            except TimeoutError as exc:
                raise _unavailable(state.broken or exc, "subscribe") from state.broken
        return state

    async def _listen(self, state: _LoopState) -> None:
        """Read wake-ups for this loop's waiters; reconnect with backoff.

        Ends when cancelled (``aclose()``, or ``asyncio.run()`` shutting the loop
        down) or when ``state.closing`` is set; either way it closes our client
        while its loop still runs (its connections cannot outlive the loop).
        """
        try:
            await self._listen_until_closed(state)
        finally:
            self._states.pop(asyncio.get_running_loop(), None)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._close_state(state))

    async def _listen_until_closed(self, state: _LoopState) -> None:
        common = self._common
        backoff = 0.05
        first = True
        attempt = 0
        while not state.closing:
            attempt += 1
            pubsub, node_client = await self._open_pubsub(state, attempt)
            try:
                await pubsub.subscribe(state.channel)
                while not state.closing:  # the subscription is confirmed by its first message
                    message = await pubsub.get_message(timeout=CONNECT_TIMEOUT)
                    if message is not None and message["type"] == "subscribe":
                        break
                if not common.checked_eviction:
                    await self._check_eviction(state)
                state.broken = None
                state.subscribed.set()
                backoff = 0.05
                if not first:  # pushes may have been lost while disconnected: re-check all
                    for waiter in state.waiters.values():
                        waiter.next_check = 0.0
                        _wake(waiter)
                first = False
                while not state.closing:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=IDLE_READ
                    )
                    if message is not None and message["type"] == "message":
                        self._dispatch(state, _text(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                state.subscribed.clear()
                state.broken = exc
                _log_channel_lost(exc, backoff)
                for waiter in state.waiters.values():
                    _wake(waiter)  # they re-check, and fail fast while Redis is away
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())
                    if node_client is not None:
                        await asyncio.shield(_aclose(node_client))

    def _dispatch(self, state: _LoopState, data: str) -> None:
        """A push: a grant for one of this loop's waiters, or a cancel for a running call."""
        if data.startswith("cancel|"):
            on_cancel = state.cancels.get(data[7:])
            if on_cancel is not None:
                on_cancel()
            return
        granted = self._common.deliver(data, state.waiters)
        if granted is not None:
            _wake(granted)

    @staticmethod
    async def _open_pubsub(state: _LoopState, attempt: int) -> tuple[Any, Any]:
        """A Pub/Sub object, and the client made for it (Cluster only) to close after.

        On a Cluster, classic PUBLISH reaches subscribers on every node, so the
        listener subscribes on one node (another one after each failure).
        """
        client = state.client
        if not isinstance(client, redis.asyncio.cluster.RedisCluster):
            return client.pubsub(), None
        await client.initialize()
        nodes = client.get_nodes()
        node = nodes[attempt % len(nodes)]
        pool = redis.asyncio.ConnectionPool(
            connection_class=node.connection_class, max_connections=2, **node.connection_kwargs
        )
        node_client = redis.asyncio.Redis(connection_pool=pool)
        return node_client.pubsub(), node_client

    async def _check_eviction(self, state: _LoopState) -> None:
        try:
            policy = await state.client.config_get("maxmemory-policy")
        except Exception as exc:  # CONFIG may be disabled (managed Redis): say nothing
            logger.debug("inturn: could not read maxmemory-policy: %r", exc)
            self._common.checked_eviction = True
            return
        self._common.warn_eviction(policy)

    async def _run(
        self, state: _LoopState, name: str, key: str, args: list[Any], keys: list[str] | None = None
    ) -> Any:
        keys = self._common.keys.turn_keys(key) if keys is None else keys
        try:
            if state.mux is not None:
                sha, lua = _SHAS[name]
                return await state.mux.evalsha(sha, lua, keys, args)
            return await state.scripts[name](keys=keys, args=args)
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, name) from exc
        except redis.exceptions.ResponseError as exc:
            if _is_oom(exc):
                raise BackendUnavailable(f"Redis is out of memory ({name}): {exc}") from exc
            raise

    # -- the Backend protocol -----------------------------------------------------------

    async def join(self, key: str, token: str, lease: float) -> Grant | None:
        state = await self._listening()
        loop = asyncio.get_running_loop()
        # Registered before the script is sent: the push can arrive before its reply, and
        # this loop's waiters of a key are listed in the order their JOINs were sent.
        waiter = _Waiter(key, lease, future=loop.create_future())
        state.enlist(token, waiter)
        sent = time.monotonic()
        args = [token, _ms(lease), _alive_ms(lease), state.channel, "join"]
        try:
            reply = await self._run(state, "join", key, args)
        except BaseException:
            state.forget(token)
            raise
        if reply[0] == 1:
            state.forget(token)
            return _grant(reply, sent, lease)
        _queued(waiter, reply, sent)
        return None

    async def try_acquire(self, key: str, token: str, lease: float) -> Grant | None:
        state = self._state()
        sent = time.monotonic()
        args = [token, _ms(lease), _alive_ms(lease), state.channel, "try"]
        reply = await self._run(state, "join", key, args)
        return _grant(reply, sent, lease) if reply[0] == 1 else None

    async def wait(self, key: str, token: str, timeout: float | None) -> Grant | None:
        state = self._state()
        waiter = state.waiters.get(token)
        if waiter is None or waiter.future is None:
            raise RuntimeError(f"token {token!r} is not waiting for key {key!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        outage = _Outage()
        while True:
            if waiter.grant is not None:
                state.forget(token)
                return waiter.grant
            now = time.monotonic()
            if now >= waiter.next_check:
                try:
                    grant = await self._recheck(state, key, token, waiter)
                except BackendUnavailable as exc:
                    waiter.next_check = outage.failed(exc, now, deadline)
                    continue
                outage.ok()
                if grant is not None:
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
            # Awaited directly: a push resumes this task in one loop step. A timeout
            # cancels the future; the next pass makes a fresh one (wakes come only from
            # this loop's thread, so none can slip in between).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sleep):
                    await waiter.future
            if waiter.future.cancelled():
                waiter.future = asyncio.get_running_loop().create_future()

    async def _recheck(
        self, state: _LoopState, key: str, token: str, waiter: _Waiter
    ) -> Grant | None:
        sent = time.monotonic()
        reply = await self._run(state, "refresh", key, [token, _alive_ms(waiter.lease)])
        if reply[0] == -1:  # we were declared dead (a long pause): join again, at the end
            waiter.solo = False
            if state.forget(token) is not None:
                state.enlist(token, waiter)
            args = [token, _ms(waiter.lease), _alive_ms(waiter.lease), state.channel, "join"]
            sent = time.monotonic()
            reply = await self._run(state, "join", key, args)
        if reply[0] == 1:
            return _grant(reply, sent, waiter.lease)
        _queued(waiter, reply, sent)
        return None

    async def renew(self, key: str, token: str, lease: float) -> bool:
        reply = await self._run(self._state(), "renew", key, [token, _ms(lease)])
        return bool(reply)

    async def release(self, key: str, token: str, *, fence: int | None = None) -> None:
        state = self._state()
        sent = time.monotonic()
        args: list[Any] = [token]
        handed: Grant | None = None
        solo = state.next_solo(key) if fence is not None and state.mux is not None else None
        if fence is not None and solo is not None:
            # Our own first waiter, with nobody from elsewhere ahead of it: start it now,
            # with the next fence; the script confirms exactly this grant.
            handed = _hand_over(solo, fence, sent, asyncio.get_running_loop().create_future())
            args += [solo[0], _ms(solo[1].lease)]
            # Not awaited, and sent at the end of this loop step: the woken waiter starts
            # first, and our next command (a JOIN, often) leaves in the same write. The
            # reply only confirms the grant, or refuses it, and then the new holder is told.
            reply = state.mux.submit(  # type: ignore[union-attr]
                _SHAS["release"][0], self._common.keys.turn_keys(key), args, hold=True
            )
            if reply is not None:
                reply.add_done_callback(partial(self._handed_over, state, key, args, handed))
                return
        try:
            reply = await self._run(state, "release", key, args)
        except BaseException:
            if handed is not None:
                _confirm(handed, None)  # unknown: the new holder's renewal will tell
            raise
        self._released(state, reply, args, handed, sent)

    def _released(
        self,
        state: _LoopState,
        reply: Sequence[Any],
        args: list[Any],
        handed: Grant | None,
        sent: float,
    ) -> None:
        granted = _after_release(self._common, state, reply, args, handed, sent)
        if granted is not None:
            _wake(granted)

    def _handed_over(
        self,
        state: _LoopState,
        key: str,
        args: list[Any],
        handed: Grant,
        reply: asyncio.Future[Any],
    ) -> None:
        """The reply of a RELEASE that was not awaited."""
        if not reply.cancelled() and reply.exception() is None:
            self._released(state, reply.result(), args, handed, handed.granted_at)
            return
        # NOSCRIPT, or the connection dropped: again, with the EVAL fallback and the retries
        # (a RELEASE that ran already confirms its grant again).
        task = asyncio.ensure_future(self._release_again(state, key, args, handed))
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)

    async def _release_again(
        self, state: _LoopState, key: str, args: list[Any], handed: Grant
    ) -> None:
        try:
            reply = await self._run(state, "release", key, args)
        except Exception as exc:
            _confirm(handed, None)
            logger.warning("inturn: release of key %r failed (%r); its lease will lapse", key, exc)
            return
        self._released(state, reply, args, handed, handed.granted_at)

    async def leave(self, key: str, token: str) -> Grant | None:
        state = self._state()
        waiter = state.forget(token)
        sent = time.monotonic()
        reply = await self._run(state, "leave", key, [token])
        if reply[0] == 1:
            return _grant(reply, sent, waiter.lease if waiter else int(reply[2]) / 1000)
        return None

    async def is_held(self, key: str, token: str) -> bool:
        owner = self._common.keys.turn_keys(key)[0]
        try:
            value = await self._state().client.get(owner)
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, "is_held") from exc
        return value is not None and _text(value).partition("|")[0] == token

    async def is_busy(self, key: str) -> bool:
        owner, line, _, _ = self._common.keys.turn_keys(key)
        try:
            return bool(await self._state().client.exists(owner, line))
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, "is_busy") from exc

    async def footprint(self) -> int:
        keys = self._common.keys
        count = 0
        async for name in self._state().client.scan_iter(match=keys.prefix + "*", count=1000):
            if keys.is_turn_state(_text(name)):
                count += 1
        return count

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
        mark = [self._common.keys.mark_key(key, scope, id)]
        args = [token, "" if fence is None else fence, _ms(lease), _ms(window)]
        return _claimed(await self._run(self._state(), "claim", key, args, mark))

    async def finish(
        self, key: str, scope: str, id: str, token: str, result: str | None, *, window: float
    ) -> None:
        mark = [self._common.keys.mark_key(key, scope, id)]
        args = [token, _ms(window)] + ([] if result is None else [result])
        await self._run(self._state(), "finish", key, args, mark)

    async def abandon(self, key: str, scope: str, id: str, token: str) -> None:
        mark = [self._common.keys.mark_key(key, scope, id)]
        await self._run(self._state(), "abandon", key, [token], mark)

    async def supersede(self, key: str, scope: str, *, cancel_running: bool) -> int:
        state = await self._listening() if cancel_running else self._state()
        keys = self._common.keys.supersede_keys(key, scope)
        args = ["1" if cancel_running else "0", _ms(SUPERSEDE_KEEP)]
        return int(await self._run(state, "supersede", key, args, keys))

    async def is_newest(self, key: str, scope: str, generation: int) -> bool:
        counter = self._common.keys.supersede_keys(key, scope)[0]
        try:
            current = await self._state().client.get(counter)
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, "is_newest") from exc
        return current is None or int(current) <= generation

    async def start_running(
        self, key: str, scope: str, token: str, on_cancel: Callable[[], None]
    ) -> None:
        state = await self._listening()
        state.cancels[token] = on_cancel
        running = self._common.keys.supersede_keys(key, scope)[1]
        value = f"{token}|{state.channel}"
        try:
            await state.client.set(running, value, px=_ms(SUPERSEDE_KEEP))
        except _TRANSPORT_ERRORS as exc:
            state.cancels.pop(token, None)
            raise _unavailable(exc, "start_running") from exc

    async def stop_running(self, key: str, scope: str, token: str) -> None:
        state = self._state()
        state.cancels.pop(token, None)
        running = self._common.keys.supersede_keys(key, scope)[1:]
        await self._run(state, "stop_running", key, [token], running)

    # -- mailboxes ----------------------------------------------------------------------

    async def _call(self, what: str, command: Callable[[Any], Awaitable[Any]]) -> Any:
        try:
            return await command(self._state().client)
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, what) from exc

    async def mb_submit(
        self,
        name: str,
        key: str,
        message: str,
        *,
        max_pending: int,
        drop_oldest: bool,
        token: str,
        lease: float,
    ) -> tuple[int, int]:
        status, dropped, _ = await self.mb_submit_take(
            name,
            key,
            message,
            max_pending=max_pending,
            drop_oldest=drop_oldest,
            token=token,
            lease=lease,
            limit=0,
        )
        return status, dropped

    async def mb_submit_take(
        self,
        name: str,
        key: str,
        message: str,
        *,
        max_pending: int,
        drop_oldest: bool,
        token: str,
        lease: float,
        limit: int,
    ) -> tuple[int, int, Taken | None]:
        """``mb_submit``, and when the caller becomes the drainer, its first ``mb_take``
        (up to ``limit`` messages) in the same round trip."""
        state = self._state()
        keys = self._common.keys.mailbox_keys(name, key) + self._hint_key(state, name)
        args = [message, max_pending, "1" if drop_oldest else "0", token, _ms(lease), key]
        args += [limit, repr(time.time())]
        reply = await self._run(state, "mb_submit", key, args, keys)
        taken = _taken(reply[2]) if len(reply) > 2 else None
        return int(reply[0]), int(reply[1]), taken

    async def mb_take(
        self, name: str, key: str, token: str, *, limit: int, lease: float, ack: bool
    ) -> Taken:
        state = self._state()
        keys = self._common.keys.mailbox_keys(name, key) + self._hint_key(state, name)
        args = [token, limit, _ms(lease), "1" if ack else "0", repr(time.time()), key]
        return _taken(await self._run(state, "mb_take", key, args, keys))

    def _hint_key(self, state: _LoopState, name: str) -> list[str]:
        """The hint set, for scripts that keep it (not on Cluster: another slot)."""
        return [] if _is_cluster(state.client) else [self._common.keys.mailbox_index(name)[0]]

    async def mb_release_take(
        self,
        name: str,
        key: str,
        token: str,
        turn_token: str,
        *,
        limit: int,
        lease: float,
        ack: bool,
    ) -> Taken:
        """Release the key's turn held by ``turn_token`` (handing it on) and take the next
        batch, in one round trip: a drained message costs JOIN + this (+ its submit)."""
        state = self._state()
        keys = (
            self._common.keys.turn_keys(key)
            + self._common.keys.mailbox_keys(name, key)
            + self._hint_key(state, name)
        )
        args = [turn_token, token, limit, _ms(lease), "1" if ack else "0", repr(time.time()), key]
        sent = time.monotonic()
        reply = await self._run(state, "mb_release_take", key, args, keys)
        if reply[1]:  # handed off: wake a local waiter now (see release)
            granted = self._common.deliver(f"{_text(reply[1])}|{reply[2]}", state.waiters, sent)
            if granted is not None:
                _wake(granted)
        return _taken(reply[0])

    async def mb_done(self, name: str, key: str, token: str) -> None:
        await self.mb_retry(name, key, token, [])

    async def mb_retry(self, name: str, key: str, token: str, messages: list[str]) -> None:
        keys = self._common.keys.mailbox_keys(name, key)
        await self._run(self._state(), "mb_retry", key, [token, *messages], keys)

    async def mb_claim(self, name: str, key: str, token: str, *, lease: float) -> int:
        keys = self._common.keys.mailbox_keys(name, key)
        return int(await self._run(self._state(), "mb_claim", key, [token, _ms(lease)], keys))

    async def mb_renew(self, name: str, key: str, token: str, *, lease: float) -> bool:
        role = self._common.keys.mailbox_keys(name, key)[2:]
        return bool(await self._run(self._state(), "mb_renew", key, [token, _ms(lease)], role))

    async def mb_pending(self, name: str, key: str) -> int:
        queue = self._common.keys.mailbox_keys(name, key)[0]
        return int(await self._call("mb_pending", lambda c: c.llen(queue)))

    async def mb_draining(self, name: str, key: str) -> bool:
        role = self._common.keys.mailbox_keys(name, key)[2]
        return bool(await self._call("mb_draining", lambda c: c.exists(role)))

    async def mb_hint(self, name: str, key: str, present: bool) -> None:
        if present and not _is_cluster(self._state().client):
            return  # MB_SUBMIT recorded it in the same step (one round trip less)
        hint = self._common.keys.mailbox_index(name)[0]
        await self._call("mb_hint", lambda c: c.sadd(hint, key) if present else c.srem(hint, key))

    async def mb_hinted(self, name: str) -> list[str]:
        hint = self._common.keys.mailbox_index(name)[0]
        return sorted(_text(k) for k in await self._call("mb_hinted", lambda c: c.smembers(hint)))

    async def mb_dead(self, name: str, entries: list[str]) -> None:
        dead = self._common.keys.mailbox_index(name)[1]
        await self._call("mb_dead", lambda c: c.rpush(dead, *entries))

    async def mb_dead_letters(self, name: str, limit: int) -> list[str]:
        dead = self._common.keys.mailbox_index(name)[1]
        return [
            _text(e) for e in await self._call("mb_dead", lambda c: c.lrange(dead, 0, limit - 1))
        ]

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
            self._twin = SyncRedisBackend(client, self._common, owned=self._sync_client is None)
        return self._twin

    async def aclose(self) -> None:
        """Close this loop's listener and client (and the sync twin's).

        The state of other event loops is dropped: their connections belong to
        those loops (closed ones cannot be closed again).
        """
        state = self._states.pop(asyncio.get_running_loop(), None)
        if state is not None:
            state.closing = True
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


async def _aclose(client: Any) -> None:
    """Close a client made here, with its connection pool(s) and its Sentinel, if any."""
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        await client.aclose()  # closes every node's connections
    else:
        await client.aclose(close_connection_pool=True)
    sentinel = getattr(client, "_inturn_sentinel", None)
    if sentinel is not None:
        await sentinel.aclose()


def _log_channel_lost(exc: BaseException, backoff: float) -> None:
    """WARNING on the first failure, DEBUG while the reconnection keeps failing."""
    level = logging.WARNING if backoff <= 0.05 else logging.DEBUG
    logger.log(level, "inturn: Redis wake-up channel lost (%r); reconnecting", exc)


def _hand_over(
    solo: tuple[str, _Waiter], fence: int, sent: float, confirmed: Confirmation
) -> Grant:
    """Start the releaser's own next waiter now, with the next fence; RELEASE names it."""
    waiter = solo[1]
    waiter.grant = Grant(fence + 1, sent, confirmed)
    _wake(waiter)
    return waiter.grant


def _after_release(
    common: _Common,
    lines: _Lines,
    reply: Sequence[Any],
    args: list[Any],
    handed: Grant | None,
    sent: float,
) -> _Waiter | None:
    """Act on RELEASE's reply: confirm a hand-over, or return the waiter of ours it chose
    (to wake now, not on the push)."""
    if handed is not None:
        # Code 1 naming our waiter with fence + 1: the script made exactly our grant.
        ok = len(reply) == 3 and reply[0] == 1 and _text(reply[1]) == args[1]
        _confirm(handed, ok and int(reply[2]) == handed.fence)
        if ok:
            return None
    if len(reply) == 3:
        return common.deliver(f"{_text(reply[1])}|{reply[2]}", lines.waiters, sent)
    return None


def _confirm(grant: Grant, ok: bool | None) -> None:
    """Resolve a handed-over grant's ``confirmed``: True, False (refused) or unknown."""
    confirmed = grant.confirmed
    if confirmed is not None and not confirmed.done():
        if ok is None:
            confirmed.cancel()
        else:
            confirmed.set_result(ok)


def _wake(waiter: _Waiter) -> None:
    if waiter.future is not None and not waiter.future.done():
        waiter.future.set_result(waiter.grant)  # type: ignore[arg-type]
    if waiter.event is not None:
        waiter.event.set()


class SyncRedisBackend:
    """The sync twin of :class:`RedisBackend`: one listener thread per process for wake-ups."""

    def __init__(self, client: Any, common: _Common, *, owned: bool = False) -> None:
        self._client = client
        self._common = common
        self._owned = owned
        self._scripts: dict[str, Any] = {}
        """redis-py Script objects, on a Cluster only (elsewhere the SyncMux runs the scripts)."""
        self._mux: SyncMux | None = None
        if _is_cluster(client):
            self._scripts = {name: client.register_script(lua) for name, lua in _SCRIPTS.items()}
        else:
            pool = client.connection_pool
            self._mux = SyncMux(
                pool, size=MAX_CONNECTIONS, wait=CONNECT_TIMEOUT, preload=tuple(_SCRIPTS.values())
            )
        self._lock = threading.Lock()
        self._line = _Lines()
        """This process's thread waiters (guarded by ``_lock``)."""
        self._subscribed = threading.Event()
        self._broken: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._pid = -1
        self._stop = threading.Event()
        self._pubsub: Any = None

    def _listening(self) -> None:
        with self._lock:
            if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
                self._pid = os.getpid()  # threads do not survive fork: start our own
                self._subscribed.clear()
                self._thread = threading.Thread(
                    target=self._listen, name="inturn-redis-wakeups", daemon=True
                )
                self._thread.start()
        if not self._subscribed.wait(CONNECT_TIMEOUT):
            raise _unavailable(self._broken or TimeoutError("no answer"), "subscribe")

    def _listen(self) -> None:
        common = self._common
        backoff = 0.05
        first = True
        pid = os.getpid()
        attempt = 0
        while not self._stop.is_set() and pid == os.getpid():
            attempt += 1
            try:
                pubsub = self._pubsub = self._open_pubsub(attempt)
            except Exception as exc:
                self._broken = exc
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            try:
                pubsub.subscribe(common.channel)
                while True:
                    message = pubsub.get_message(timeout=CONNECT_TIMEOUT)
                    if message is not None and message["type"] == "subscribe":
                        break
                if not common.checked_eviction:
                    try:
                        common.warn_eviction(self._client.config_get("maxmemory-policy"))
                    except Exception as exc:
                        logger.debug("inturn: could not read maxmemory-policy: %r", exc)
                        common.checked_eviction = True
                self._broken = None
                self._subscribed.set()
                backoff = 0.05
                if not first:
                    with self._lock:
                        for waiter in self._line.waiters.values():
                            waiter.next_check = 0.0
                            _wake(waiter)
                first = False
                while not self._stop.is_set():
                    message = pubsub.get_message(ignore_subscribe_messages=True, timeout=IDLE_READ)
                    if message is not None and message["type"] == "message":
                        with self._lock:
                            granted = common.deliver(message["data"], self._line.waiters)
                        if granted is not None:
                            _wake(granted)
            except Exception as exc:
                if self._stop.is_set():
                    return
                self._subscribed.clear()
                self._broken = exc
                _log_channel_lost(exc, backoff)
                with self._lock:
                    for waiter in self._line.waiters.values():
                        _wake(waiter)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def _open_pubsub(self, attempt: int) -> Any:
        client = self._client
        if isinstance(client, redis.cluster.RedisCluster):  # see RedisBackend._open_pubsub
            nodes = client.get_nodes()  # type: ignore[no-untyped-call]
            client = nodes[attempt % len(nodes)].redis_connection
        return client.pubsub()

    def _run(
        self,
        name: str,
        key: str,
        args: list[Any],
        keys: list[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run a script; ``timeout`` bounds the wait for its reply (not on a Cluster)."""
        keys = self._common.keys.turn_keys(key) if keys is None else keys
        try:
            if self._mux is not None:
                sha, lua = _SHAS[name]
                return self._mux.evalsha(sha, lua, keys, args, timeout=timeout)
            return self._scripts[name](keys=keys, args=args)
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, name) from exc
        except redis.exceptions.ResponseError as exc:
            if _is_oom(exc):
                raise BackendUnavailable(f"Redis is out of memory ({name}): {exc}") from exc
            raise

    @contextlib.contextmanager
    def _changing(self, key: str) -> Iterator[None]:
        """While a call that changes the key's line is in flight, no hand-over for it: our
        view of the line's order may be stale (threads' JOINs use several connections)."""
        with self._lock:
            self._line.changing(key, 1)
        try:
            yield
        finally:
            with self._lock:
                self._line.changing(key, -1)

    def _settle(self, token: str, waiter: _Waiter, reply: Sequence[Any], sent: float) -> None:
        """A JOIN or REFRESH left the waiter in line (call with ``_lock`` held)."""
        _queued(waiter, reply, sent)
        if len(reply) > 3 and token in self._line.waiters:  # a JOIN's: its place
            self._line.place(token, waiter)

    def join(self, key: str, token: str, lease: float) -> Grant | None:
        self._listening()
        waiter = _Waiter(key, lease, event=threading.Event())
        with self._lock:
            self._line.waiters[token] = waiter  # a push may come before the reply
            self._line.changing(key, 1)  # no hand-over for the key until it has its place
        sent = time.monotonic()
        args = [token, _ms(lease), _alive_ms(lease), self._common.channel, "join"]
        reply: Sequence[Any] = ()
        try:
            reply = self._run("join", key, args)
        finally:
            with self._lock:
                self._line.changing(key, -1)
                if reply and reply[0] != 1:
                    self._settle(token, waiter, reply, sent)
                else:  # granted at once, or failed
                    self._line.forget(token)
        return _grant(reply, sent, lease) if reply[0] == 1 else None

    def try_acquire(self, key: str, token: str, lease: float) -> Grant | None:
        sent = time.monotonic()
        args = [token, _ms(lease), _alive_ms(lease), self._common.channel, "try"]
        reply = self._run("join", key, args)
        return _grant(reply, sent, lease) if reply[0] == 1 else None

    def wait(self, key: str, token: str, timeout: float | None) -> Grant | None:
        with self._lock:
            waiter = self._line.waiters.get(token)
        if waiter is None or waiter.event is None:
            raise RuntimeError(f"token {token!r} is not waiting for key {key!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        outage = _Outage()
        while True:
            if waiter.grant is not None:
                with self._lock:
                    self._line.forget(token)
                return waiter.grant
            now = time.monotonic()
            if now >= waiter.next_check:
                try:
                    limit = None if deadline is None else deadline - now
                    grant = self._recheck(key, token, waiter, limit)
                except BackendUnavailable as exc:
                    waiter.next_check = outage.failed(exc, now, deadline)
                    continue
                outage.ok()
                if grant is not None:
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
                waiter.event.clear()  # woken without a grant (reconnect): re-check now
                waiter.next_check = 0.0

    def _recheck(self, key: str, token: str, waiter: _Waiter, limit: float | None) -> Grant | None:
        """See RedisBackend._recheck; a reply is not awaited past ``limit`` seconds (the
        caller's deadline: the re-check then fails with BackendUnavailable)."""
        with self._changing(key):
            sent = begun = time.monotonic()
            reply = self._run("refresh", key, [token, _alive_ms(waiter.lease)], timeout=limit)
            if reply[0] == -1:  # declared dead: join again, at the end
                with self._lock:
                    waiter.solo = False
                    waiter.seq = 0
                    self._line.place(token, waiter)  # first, unknown: no hand-over passes it
                args = [token, _ms(waiter.lease), _alive_ms(waiter.lease), self._common.channel]
                sent = time.monotonic()
                limit = None if limit is None else limit - (sent - begun)
                reply = self._run("join", key, [*args, "join"], timeout=limit)
            if reply[0] == 1:
                return _grant(reply, sent, waiter.lease)
            with self._lock:
                self._settle(token, waiter, reply, sent)
        return None

    def renew(self, key: str, token: str, lease: float) -> bool:
        return bool(self._run("renew", key, [token, _ms(lease)]))

    def release(self, key: str, token: str, *, fence: int | None = None) -> None:
        sent = time.monotonic()
        args: list[Any] = [token]
        handed: Grant | None = None
        if fence is not None:
            with self._lock:
                solo = self._line.next_solo(key)
                if solo is not None:  # see RedisBackend.release; this thread waits for the reply
                    handed = _hand_over(solo, fence, sent, concurrent.futures.Future())
                    args += [solo[0], _ms(solo[1].lease)]
        try:
            reply = self._run("release", key, args)
        except BaseException:
            if handed is not None:
                _confirm(handed, None)
            raise
        with self._lock:
            granted = _after_release(self._common, self._line, reply, args, handed, sent)
        if granted is not None:
            _wake(granted)

    def leave(self, key: str, token: str) -> Grant | None:
        with self._lock:
            waiter = self._line.forget(token)
        sent = time.monotonic()
        with self._changing(key):
            reply = self._run("leave", key, [token])
        if reply[0] == 1:
            return _grant(reply, sent, waiter.lease if waiter else int(reply[2]) / 1000)
        return None

    def is_held(self, key: str, token: str) -> bool:
        try:
            value = self._client.get(self._common.keys.turn_keys(key)[0])
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, "is_held") from exc
        return value is not None and _text(value).partition("|")[0] == token

    def is_busy(self, key: str) -> bool:
        owner, line, _, _ = self._common.keys.turn_keys(key)
        try:
            return bool(self._client.exists(owner, line))
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, "is_busy") from exc

    def footprint(self) -> int:
        keys = self._common.keys
        return sum(
            1
            for name in self._client.scan_iter(match=keys.prefix + "*", count=1000)
            if keys.is_turn_state(_text(name))
        )

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
        mark = [self._common.keys.mark_key(key, scope, id)]
        args = [token, "" if fence is None else fence, _ms(lease), _ms(window)]
        return _claimed(self._run("claim", key, args, mark))

    def finish(
        self, key: str, scope: str, id: str, token: str, result: str | None, *, window: float
    ) -> None:
        mark = [self._common.keys.mark_key(key, scope, id)]
        self._run("finish", key, [token, _ms(window)] + ([] if result is None else [result]), mark)

    def abandon(self, key: str, scope: str, id: str, token: str) -> None:
        self._run("abandon", key, [token], [self._common.keys.mark_key(key, scope, id)])

    def supersede(self, key: str, scope: str, *, cancel_running: bool) -> int:
        keys = self._common.keys.supersede_keys(key, scope)
        args = ["1" if cancel_running else "0", _ms(SUPERSEDE_KEEP)]
        return int(self._run("supersede", key, args, keys))

    def is_newest(self, key: str, scope: str, generation: int) -> bool:
        try:
            current = self._client.get(self._common.keys.supersede_keys(key, scope)[0])
        except _TRANSPORT_ERRORS as exc:
            raise _unavailable(exc, "is_newest") from exc
        return current is None or int(current) <= generation

    def close(self) -> None:
        self._stop.set()
        if self._mux is not None:
            self._mux.close()
        pubsub = self._pubsub
        if pubsub is not None:  # wakes the listener's blocked read: it sees _stop and ends
            with contextlib.suppress(Exception):
                pubsub.close()
        if self._owned:
            client = self._client
            if isinstance(client, redis.cluster.RedisCluster):  # one pool per node
                for node in client.get_nodes():  # type: ignore[no-untyped-call]
                    if node.redis_connection is not None:
                        node.redis_connection.connection_pool.disconnect()
            else:
                client.connection_pool.disconnect()
            client.close()
            sentinel = getattr(client, "_inturn_sentinel", None)
            if sentinel is not None:
                sentinel.close()


# -- URLs -------------------------------------------------------------------------------


def _client_options(*, asynchronous: bool, cluster: bool = False) -> dict[str, Any]:
    # Each flavour needs its own Retry class: the sync one, given to an async client,
    # "succeeds" at once with an un-awaited coroutine, so nothing would ever be retried.
    retry_class = redis.asyncio.retry.Retry if asynchronous else Retry
    options: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_keepalive": True,
        "retry": retry_class(ExponentialBackoff(cap=0.5, base=0.05), 2),
        "retry_on_error": [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    }
    if not cluster:  # cluster clients do not take it
        options["health_check_interval"] = 30
    return options


def _hosts(netloc: str, scheme: str) -> tuple[str | None, list[tuple[str, int]]]:
    password = None
    if "@" in netloc:
        auth, _, netloc = netloc.rpartition("@")
        password = urllib.parse.unquote(auth.partition(":")[2] or auth) or None
    hosts = []
    for part in netloc.split(","):
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        if not host:
            raise ConfigurationError(f"{scheme}:// needs host:port[,host:port...], got {part!r}")
        try:
            hosts.append((host.strip("[]"), int(port or (26379 if "sentinel" in scheme else 6379))))
        except ValueError as exc:
            raise ConfigurationError(f"bad port in {part!r}") from exc
    return password, hosts


def _factories(url: str) -> tuple[Any, Any]:
    """Two zero-argument factories (async client, sync client) for a URL."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    options = _client_options(asynchronous=False)
    async_options = _client_options(asynchronous=True)
    if scheme == "unix":  # a unix socket connection takes no TCP keepalive
        del options["socket_keepalive"], async_options["socket_keepalive"]
    if scheme in ("redis", "rediss", "unix"):
        try:
            redis.Redis.from_url(url)  # validate now, not on first use
        except ValueError as exc:
            raise ConfigurationError(f"bad Redis URL {url!r}: {exc}") from exc

        # Blocking pools: a burst of requests waits for one of MAX_CONNECTIONS connections
        # instead of failing ("Too many connections"); waiting itself holds no connection.
        def make_async_client() -> Any:
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                url, max_connections=MAX_CONNECTIONS, timeout=CONNECT_TIMEOUT, **async_options
            )
            return redis.asyncio.Redis(connection_pool=pool)

        def make_sync_client() -> Any:
            pool = redis.BlockingConnectionPool.from_url(
                url, max_connections=MAX_CONNECTIONS, timeout=CONNECT_TIMEOUT, **options
            )
            return redis.Redis(connection_pool=pool)

        return make_async_client, make_sync_client
    if scheme == "redis+cluster":
        password, hosts = _hosts(parts.netloc, scheme)
        cluster_options = _client_options(asynchronous=False, cluster=True)
        async_cluster_options = _client_options(asynchronous=True, cluster=True)

        def make_async() -> Any:
            nodes = [redis.asyncio.cluster.ClusterNode(h, p) for h, p in hosts]
            return redis.asyncio.cluster.RedisCluster(
                startup_nodes=nodes, password=password, **async_cluster_options
            )

        def make_sync() -> Any:
            nodes = [redis.cluster.ClusterNode(h, p) for h, p in hosts]  # type: ignore[no-untyped-call]
            return redis.cluster.RedisCluster(
                startup_nodes=nodes, password=password, **cluster_options
            )

        return make_async, make_sync
    if scheme == "redis+sentinel":
        password, hosts = _hosts(parts.netloc, scheme)
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ConfigurationError(
                "redis+sentinel:// needs a service name: redis+sentinel://host:26379/mymaster[/db]"
            )
        service = path[0]
        db = int(path[1]) if len(path) > 1 else 0

        def make_async_sentinel() -> Any:
            import redis.asyncio.sentinel

            sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
                hosts, socket_connect_timeout=CONNECT_TIMEOUT
            )
            client = sentinel.master_for(service, db=db, password=password, **async_options)
            client._inturn_sentinel = sentinel  # closed with the client: see _aclose
            return client

        def make_sync_sentinel() -> Any:
            import redis.sentinel

            sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
                hosts, socket_connect_timeout=CONNECT_TIMEOUT
            )
            client = sentinel.master_for(  # type: ignore[no-untyped-call]
                service, db=db, password=password, **options
            )
            client._inturn_sentinel = sentinel  # closed with the client: see close()
            return client

        return make_async_sentinel, make_sync_sentinel
    raise ConfigurationError(f"not a Redis URL: {url!r}")


def from_url(url: str, *, namespace: str) -> RedisBackend:
    """Build the backend for a Redis URL (the gate's scheme registry calls this)."""
    return RedisBackend.from_url(url, namespace=namespace)
