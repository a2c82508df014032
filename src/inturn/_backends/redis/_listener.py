"""The async backend's wake-up listener: one subscribed connection per event loop."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio.cluster

from inturn._backends.redis import _doctor
from inturn._backends.redis._pushes import Wakeups
from inturn._backends.redis._shared import (
    CONNECT_TIMEOUT,
    LoopState,
    ProcessChannel,
    log_channel_lost,
    text,
    wake,
)

__all__ = ["listen_until_closed"]


async def listen_until_closed(process: ProcessChannel, state: LoopState) -> None:
    """Read wake-ups for a loop's waiters until ``state.closing``; reconnect with backoff.

    The subscribed connection is read by a :class:`Wakeups` protocol: a push wakes
    its waiter's future from ``data_received``, with no task step in between.
    """
    backoff = 0.05
    first = True
    attempt = 0
    while not state.closing:
        attempt += 1
        wakeups: Wakeups | None = None
        try:
            wakeups = await _subscribe(process, state, attempt)
            if not process.checked_eviction:
                await _check_eviction(process, state)
            state.broken = None
            state.subscribed.set()
            state.ever_subscribed = True
            state.settle()
            backoff = 0.05
            if not first:  # pushes may have been lost while disconnected: re-check all
                for waiter in state.waiters.values():
                    waiter.next_check = 0.0
                    wake(waiter)
            first = False
            raise await wakeups.lost
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            state.subscribed.clear()
            state.broken = exc
            state.again.clear()
            state.settle()
            log_channel_lost(exc, backoff, ever=state.ever_subscribed)
            for waiter in state.waiters.values():
                wake(waiter)  # they re-check, and fail fast while Redis is away
            # A caller that finds the channel broken asks for the next attempt at once.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await state.again.wait()
            backoff = min(backoff * 2, 2.0)
        finally:
            if wakeups is not None:
                wakeups.close()


async def _subscribe(process: ProcessChannel, state: LoopState, attempt: int) -> Wakeups:
    """A new connection, handshaken by redis-py, read by :class:`Wakeups` and subscribed.

    On a Cluster, classic PUBLISH reaches subscribers on every node, so the
    listener subscribes on one node (another one after each failure).
    """
    client = state.client
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        await client.initialize()
        nodes = client.get_nodes()
        node = nodes[attempt % len(nodes)]
        conn = node.connection_class(**node.connection_kwargs)
    else:
        conn = client.connection_pool.make_connection()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await conn.connect()  # type: ignore[no-untyped-call]
    except BaseException:
        with contextlib.suppress(Exception):
            await conn.disconnect(nowait=True)
        raise

    def on_push(push: list[Any]) -> None:
        _dispatch(process, state, text(push[2]))

    wakeups = Wakeups.take_over(conn, state.channel, on_push)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):  # confirmed before waiters rely on it
            refused = await wakeups.subscribed
    except BaseException:
        wakeups.close()
        raise
    if refused is not None:
        wakeups.close()
        raise refused
    return wakeups


def _dispatch(process: ProcessChannel, state: LoopState, data: str) -> None:
    """A push: a grant for one of this loop's waiters, or a cancel for a running call."""
    if data.startswith("cancel|"):
        on_cancel = state.cancels.get(data[7:])
        if on_cancel is not None:
            on_cancel()
        return
    granted = process.deliver(data, state.waiters)
    if granted is not None:
        wake(granted)


async def _check_eviction(process: ProcessChannel, state: LoopState) -> None:
    try:
        policy = _doctor.policy_of(await state.client.config_get("maxmemory-policy"))
    except Exception:  # CONFIG may be disabled (managed Redis): diagnose() says so
        policy = None
    _doctor.warn_eviction(process, policy)
