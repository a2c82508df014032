"""The async backend's wake-up listener: one subscribed connection per event loop."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster

from inturn._backends.redis import _doctor
from inturn._backends.redis._shared import (
    CONNECT_TIMEOUT,
    IDLE_READ,
    LoopState,
    ProcessChannel,
    log_channel_lost,
    text,
    wake,
)
from inturn._backends.redis._urls import aclose_client

__all__ = ["listen_until_closed"]


async def listen_until_closed(process: ProcessChannel, state: LoopState) -> None:
    """Read wake-ups for a loop's waiters until ``state.closing``; reconnect with backoff."""
    backoff = 0.05
    first = True
    attempt = 0
    while not state.closing:
        attempt += 1
        pubsub, node_client = await _open_pubsub(state, attempt)
        try:
            await pubsub.subscribe(state.channel)
            while not state.closing:  # the subscription is confirmed by its first message
                message = await pubsub.get_message(timeout=CONNECT_TIMEOUT)
                if message is not None and message["type"] == "subscribe":
                    break
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
            while not state.closing:
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=IDLE_READ
                )
                if message is not None and message["type"] == "message":
                    _dispatch(process, state, text(message["data"]))
                    # Let the woken waiter start its turn before the next read (which
                    # polls the socket first): a cross-process hand-off ~0.07 ms sooner.
                    await asyncio.sleep(0)
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
            with contextlib.suppress(Exception):
                await asyncio.shield(pubsub.aclose())
                if node_client is not None:
                    await asyncio.shield(aclose_client(node_client))


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


async def _open_pubsub(state: LoopState, attempt: int) -> tuple[Any, Any]:
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


async def _check_eviction(process: ProcessChannel, state: LoopState) -> None:
    try:
        policy = _doctor.policy_of(await state.client.config_get("maxmemory-policy"))
    except Exception:  # CONFIG may be disabled (managed Redis): diagnose() says so
        policy = None
    _doctor.warn_eviction(process, policy)
