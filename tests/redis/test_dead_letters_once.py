"""Dead-lettering on Redis is safe to run twice: a letter is stored once per failed
message, also when the first call's reply was lost after the server ran it."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable

import pytest

from inturn import RedisBackend
from tests.postgres.test_dead_letters_once import _letter
from tests.redis.test_reliability import LosingProxy, proxy  # noqa: F401  (a fixture)


async def test_a_dead_lettering_whose_reply_is_lost_stores_each_letter_once(
    proxy: Callable[[bytes], LosingProxy],  # noqa: F811
) -> None:
    """The reply is dropped after the server ran the call, and the client sends it again:
    each letter is stored once (before: a plain RPUSH stored two copies of each)."""
    lossy = proxy(b"payload lost-1")
    backend = RedisBackend.from_url(lossy.url(), namespace=f"d{secrets.token_hex(3)}")
    try:
        letters = [_letter("lost-1", 10.0), _letter("lost-2", 10.0)]
        await backend.mb_dead("box", letters)
        assert lossy.lost.is_set()
        assert await backend.mb_dead_letters("box", 10) == letters
    finally:
        await backend.aclose()


@pytest.mark.parametrize("threads", [False, True])
async def test_a_message_is_dead_lettered_once_however_often_it_is_recorded(
    redis_url: str, threads: bool
) -> None:
    """The same call twice, or the same failed message recorded again later (another
    failure time), keeps one letter; other messages and texts that are not mailbox letters
    are each kept once; a replay takes a letter out, and the message may then be stored
    again (async and the sync twin)."""
    backend = RedisBackend.from_url(redis_url, namespace=f"d{secrets.token_hex(3)}")
    twin = backend.sync_twin()

    async def dead(entries: list[str]) -> None:
        if threads:
            await asyncio.to_thread(twin.mb_dead, "box", entries)
        else:
            await backend.mb_dead("box", entries)

    try:
        first = [_letter("a", 10.0), _letter("b", 10.0), "plain text", "plain text"]
        await dead(first)
        await dead(first)
        await dead([_letter("a", 99.0, "ValueError: again"), _letter("c", 99.0), "other text"])
        old = [_letter("a", 10.0), _letter("b", 10.0), "plain text"]
        kept = await backend.mb_dead_letters("box", 100)
        assert kept == [*old, _letter("c", 99.0), "other text"]
        assert await backend.mb_dead_remove("box", [_letter("a", 10.0)]) == 1  # type: ignore[attr-defined]
        await dead([_letter("a", 120.0)])
        assert (await backend.mb_dead_letters("box", 100))[-1] == _letter("a", 120.0)
    finally:
        twin.close()
        await backend.aclose()
