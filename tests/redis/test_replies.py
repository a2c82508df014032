"""The pipelined connection's replies, parsed as the bytes arrive: split anywhere, several
in one read, error replies as redis-py's exceptions, a reply nobody waits for."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions

from inturn._backends.redis._replies import Replies

STREAM = (
    b"*3\r\n:1\r\n:1700000000000001\r\n:30000\r\n-NOSCRIPT No matching script\r\n$5\r\nhello\r\n"
)


async def _replies(pending: Any, lost: list[BaseException]) -> Replies:
    conn = redis.asyncio.Connection()  # never connected: only its parser and encoder are read
    return Replies(conn, pending, lost.append)


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
async def test_replies_split_anywhere_resolve_their_calls_in_order(cut: int) -> None:
    loop = asyncio.get_running_loop()
    pending: deque[tuple[asyncio.Future[Any], float, bool]] = deque(
        (loop.create_future(), 0.0, False) for _ in range(3)
    )
    futures = [f for f, _, _ in pending]
    lost: list[BaseException] = []
    protocol = await _replies(pending, lost)
    protocol.data_received(STREAM[:cut])
    protocol.data_received(STREAM[cut:])
    assert futures[0].result() == [1, 1700000000000001, 30000]
    with pytest.raises(redis.exceptions.NoScriptError):
        futures[1].result()
    assert futures[2].result() == b"hello"
    assert not pending
    assert not lost


async def test_a_reply_nobody_waits_for_drops_the_connection() -> None:
    lost: list[BaseException] = []
    protocol = await _replies(deque(), lost)
    protocol.data_received(b":1\r\n")
    assert isinstance(lost[0], redis.exceptions.ConnectionError)


async def test_bytes_that_are_not_resp_drop_the_connection() -> None:
    loop = asyncio.get_running_loop()
    pending = deque([(loop.create_future(), 0.0, False)])
    lost: list[BaseException] = []
    protocol = await _replies(pending, lost)
    protocol.data_received(b"?garbage\r\n")
    assert lost
    assert not pending[0][0].done()  # its caller fails with the drop (Mux._drop)
