"""Dead-lettering on PostgreSQL is safe to run twice: a letter is stored once per failed
message, also when the first call's reply was lost after the server committed it."""

from __future__ import annotations

import asyncio
import json

import psycopg
import psycopg.conninfo
import pytest

import inturn
from tests.postgres.test_reliability import _Proxy


def _letter(tag: str, at: float, error: str = "ValueError: no") -> str:
    """A dead letter as the mailbox writes it: the failed message, the error, when, attempts."""
    message = {"k": "u", "g": tag, "i": None, "p": f"payload {tag}", "t": 1.0, "a": 2}
    return json.dumps({"m": message, "e": error, "at": at, "n": 3})


async def test_a_dead_lettering_whose_reply_is_lost_stores_each_letter_once(
    postgres_dsn: str,
) -> None:
    """The connection drops after the server committed the dead letters: the call raises
    BackendUnavailable, and its retry stores nothing twice (before: two copies of each)."""
    info = psycopg.conninfo.conninfo_to_dict(postgres_dsn)
    proxy = _Proxy(int(str(info["port"])))
    port = await proxy.start()
    store = inturn.PostgresBackend(conninfo=psycopg.conninfo.make_conninfo(postgres_dsn, port=port))
    await store.migrate()
    letters = [_letter("a", 10.0), _letter("b", 10.0)]
    proxy.marker = b"INSERT INTO inturn.mb_dead"
    with pytest.raises(inturn.BackendUnavailable):
        await store.mb_dead("box", letters)
    assert proxy.dropped == 1
    assert await store.mb_dead_letters("box", 10) == letters  # committed, reply lost
    await store.mb_dead("box", letters)  # the retry
    assert await store.mb_dead_letters("box", 10) == letters
    await store.aclose()
    await proxy.close()


@pytest.mark.parametrize("threads", [False, True])
async def test_a_message_is_dead_lettered_once_however_often_it_is_recorded(
    postgres_dsn: str, threads: bool
) -> None:
    """The same call twice, or the same failed message recorded again later (a redelivery
    after a lost acknowledgement fails again: another failure time), keeps one letter;
    other messages, and texts that are not mailbox letters, are each kept (async and the
    sync twin)."""
    store = inturn.PostgresBackend(conninfo=postgres_dsn)
    twin = store.sync_twin()

    async def dead(entries: list[str]) -> None:
        if threads:
            await asyncio.to_thread(twin.mb_dead, "box", entries)
        else:
            await store.mb_dead("box", entries)

    first = [_letter("a", 10.0), _letter("b", 10.0), "plain text", "plain text"]
    await dead(first)
    await dead(first)
    await dead([_letter("a", 99.0, "ValueError: again"), _letter("c", 99.0), "other text"])
    kept = await store.mb_dead_letters("box", 100)
    old = [_letter("a", 10.0), _letter("b", 10.0), "plain text"]
    assert kept == [*old, _letter("c", 99.0), "other text"]
    assert (await store.statistics()).dead_letters == {"box": 5}
    # A replay takes a letter out; the same message failing again is then stored again.
    await store.mb_dead_remove("box", [_letter("a", 10.0)])
    await dead([_letter("a", 120.0)])
    assert (await store.mb_dead_letters("box", 100))[-1] == _letter("a", 120.0)
    await store.aclose()
