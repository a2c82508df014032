"""Dedup rows, supersede and mailboxes on PostgreSQL: what the tables keep, and for how long."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable

import psycopg
import pytest

import inturn
from inturn._backends.base import ResumeStatus, SubmitStatus, Submitted, Taken
from inturn._backends.postgres import PostgresBackend


def _rows(admin: psycopg.Connection, sql: str, namespace: str) -> int:
    row = admin.execute(sql, [namespace]).fetchone()
    assert row is not None
    return int(row[0])


async def _submit(
    store: PostgresBackend, text: str, token: str, *, lease: float = 5.0
) -> tuple[int, int]:
    """Submit to key "u" of mailbox "box"; (status, dropped)."""
    done = await store.mb_submit(
        "box", "u", text, max_pending=10, drop_oldest=False, token=token, lease=lease
    )
    assert done.first is None  # take=0: nothing taken
    return int(done.status), done.dropped


def _backend(gate: inturn.Gate) -> PostgresBackend:
    backend = gate.backend
    assert isinstance(backend, PostgresBackend)
    return backend


async def test_dedup_rows_expire_and_are_purged(
    postgres_dsn: str, admin: psycopg.Connection
) -> None:
    """An expired mark does not count; the purge (periodic, from claims) deletes idle keys' rows."""
    namespace = f"d{secrets.token_hex(4)}"
    gate = inturn.Gate.from_url(postgres_dsn, namespace=namespace)
    store = _backend(gate)
    count = "SELECT count(*) FROM inturn.dedup WHERE namespace = %s"
    for user in range(5):
        found = await store.claim(f"u{user}", "s", "m", "tok", fence=None, lease=5, window=0.2)
        assert found.state == "new"
        await store.finish(f"u{user}", "s", "m", "tok", '"ok"', window=0.2)
    done = await store.claim("u0", "s", "m", "again", fence=None, lease=5, window=0.2)
    assert done == inturn.ClaimResult("done", '"ok"')
    assert _rows(admin, count, namespace) == 5
    await asyncio.sleep(0.3)
    # The expired mark of u0 is not "done" any more: the id runs again (its row is reused).
    again = await store.claim("u0", "s", "m", "again", fence=None, lease=5, window=60)
    assert again.state == "new"
    assert _rows(admin, count, namespace) == 5  # no purge yet: at most every PURGE_INTERVAL
    store._plan.next_purge = 0.0  # the interval has passed
    await store.claim("u9", "s", "m", "tok", fence=None, lease=5, window=60)
    assert _rows(admin, count, namespace) == 2  # u1..u4 purged; u0 (live) and u9 stay
    await gate.aclose()


async def test_a_dead_drainers_in_flight_messages_are_redelivered_first(
    postgres_dsn: str, admin: psycopg.Connection
) -> None:
    """mb_resume after the drainer's lease lapsed: its in-flight message comes first."""
    namespace = f"m{secrets.token_hex(4)}"
    gate = inturn.Gate.from_url(postgres_dsn, namespace=namespace)
    store = _backend(gate)
    sent = [f'{{"n": {n}}}' for n in range(3)]
    assert await _submit(store, sent[0], "dead", lease=0.3) == (1, 0)
    for text in sent[1:]:
        assert await _submit(store, text, "other", lease=0.3) == (0, 0)
    taken = await store.mb_take("box", "u", "dead", limit=1, lease=0.3, ack=False)
    assert taken.messages == (sent[0],)
    assert await store.mb_pending("box", "u") == 2
    # The drainer dies here (no renewal). While its lease lives, nobody else may drain.
    assert await store.mb_resume("box", "u", "sweeper", lease=5) == ResumeStatus.LIVE
    await asyncio.sleep(0.4)
    assert not await store.mb_draining("box", "u")
    assert await store.mb_hinted("box") == ["u"]  # the sweeper finds the key by its rows
    assert await store.mb_resume("box", "u", "sweeper", lease=5) == ResumeStatus.RESUMED
    assert await store.mb_resume("box", "u", "another", lease=5) == ResumeStatus.LIVE
    late = await store.mb_take("box", "u", "dead", limit=1, lease=5, ack=True)
    assert late.lost_role  # the dead drainer's late ack is refused and changes nothing
    got: list[str] = []
    ack = False
    while True:
        taken = await store.mb_take("box", "u", "sweeper", limit=1, lease=5, ack=ack)
        if not taken.messages:
            break
        got.extend(taken.messages)
        ack = True
    assert got == sent
    assert not taken.lost_role
    rows = (
        "SELECT (SELECT count(*) FROM inturn.mb_messages WHERE namespace = %(ns)s)"
        " + (SELECT count(*) FROM inturn.mb_roles WHERE namespace = %(ns)s)"
    )
    row = admin.execute(rows, {"ns": namespace}).fetchone()
    assert row == (0,)  # the empty queue gave its role up: nothing left behind
    assert await store.mb_hinted("box") == []
    assert await store.mb_resume("box", "u", "sweeper", lease=5) == ResumeStatus.IDLE
    assert await store.footprint() == 0
    await gate.aclose()


async def test_retry_goes_back_to_the_head_and_waits(
    postgres_dsn: str, admin: psycopg.Connection
) -> None:
    """mb_retry puts the batch back before newer messages; its not_before (a column of its
    own, the text is never parsed) makes take wait."""
    namespace = f"r{secrets.token_hex(4)}"
    gate = inturn.Gate.from_url(postgres_dsn, namespace=namespace)
    store = _backend(gate)
    await _submit(store, "zero", "t")
    await _submit(store, "one", "t")
    taken = await store.mb_take("box", "u", "t", limit=1, lease=5, ack=False)
    assert taken.messages == ("zero",)
    not_before = time.time() + 0.3
    await store.mb_retry("box", "u", "t", ["zero again"], not_before=not_before)
    stored = admin.execute(
        "SELECT body, not_before FROM inturn.mb_messages WHERE namespace = %s ORDER BY seq",
        [namespace],
    ).fetchall()
    assert stored == [("zero again", not_before), ("one", 0.0)]
    waiting = await store.mb_take("box", "u", "t", limit=5, lease=5, ack=False)
    assert waiting.messages == ()
    assert not waiting.lost_role
    assert 0.1 < waiting.retry_in <= 0.3
    await asyncio.sleep(waiting.retry_in)
    both = await store.mb_take("box", "u", "t", limit=5, lease=5, ack=False)
    assert both.messages == ("zero again", "one")
    await store.mb_done("box", "u", "t")
    assert (await store.mb_take("box", "u", "t", limit=5, lease=5, ack=False)).messages == ()
    assert await store.footprint() == 0
    await gate.aclose()


async def test_submit_takes_in_the_same_call_and_release_take_composes(
    postgres_dsn: str,
) -> None:
    """mb_submit(take=n) gives the new drainer its first batch; a queued submit gets none;
    mb_release_take acknowledges and takes, then releases the turn."""
    gate = inturn.Gate.from_url(postgres_dsn, namespace=f"s{secrets.token_hex(4)}")
    store = _backend(gate)

    async def submit(text: str, token: str) -> Submitted:
        return await store.mb_submit(
            "box", "u", text, max_pending=10, drop_oldest=False, token=token, lease=5, take=5
        )

    first = await submit("a", "d")
    assert first.status == SubmitStatus.DRAINER
    assert first.first == Taken(messages=("a",))
    queued = await submit("b", "x")
    assert queued == Submitted(SubmitStatus.QUEUED)
    assert await store.join("u", "turn", 5.0) is not None
    nxt = await store.mb_release_take("box", "u", "d", "turn", limit=5, lease=5, ack=True)
    assert nxt.messages == ("b",)
    assert not await store.is_busy("u")  # the turn was released
    assert (await store.mb_take("box", "u", "d", limit=5, lease=5, ack=True)).messages == ()
    assert await store.footprint() == 0
    await gate.aclose()


def test_the_sync_twin_runs_a_mailbox_end_to_end(postgres_dsn: str) -> None:
    """Every mb_* of SyncPostgresBackend, as a Celery prefork worker would use them."""
    backend = PostgresBackend.from_url(postgres_dsn, namespace=f"y{secrets.token_hex(4)}")
    sync = backend.sync_twin()
    assert sync.never_blocks is False

    def submit(text: str, token: str, take: int = 0) -> Submitted:
        return sync.mb_submit(
            "box", "u", text, max_pending=1, drop_oldest=True, token=token, lease=0.3, take=take
        )

    got = submit("a", "d", take=1)
    assert got.status == SubmitStatus.DRAINER
    assert got.first == Taken(messages=("a",))
    assert submit("b", "x").status == SubmitStatus.QUEUED
    dropped = submit("c", "x")
    assert dropped == Submitted(SubmitStatus.QUEUED, dropped=1)  # "b" made room for "c"
    assert sync.mb_pending("box", "u") == 1
    assert sync.mb_draining("box", "u")
    assert sync.mb_renew("box", "u", "d", lease=0.3)
    assert not sync.mb_renew("box", "u", "x", lease=0.3)
    sync.mb_retry("box", "u", "d", ["a"], not_before=time.time() + 0.2)
    assert sync.mb_take("box", "u", "d", limit=5, lease=0.3, ack=False).retry_in > 0.1
    sync.mb_hint("box", "u", True)
    assert sync.mb_hinted("box") == ["u"]
    time.sleep(0.4)  # the drainer dies; the retry time passes
    assert sync.mb_resume("box", "u", "s", lease=5) == ResumeStatus.RESUMED
    assert sync.mb_take("box", "u", "s", limit=5, lease=5, ack=False).messages == ("a", "c")
    sync.mb_dead("box", ["a"])
    sync.mb_done("box", "u", "s")
    assert sync.mb_dead_letters("box", 10) == ["a"]
    assert sync.mb_take("box", "u", "s", limit=5, lease=5, ack=True) == Taken()
    assert sync.mb_take("box", "u", "s", limit=5, lease=5, ack=True).lost_role
    assert sync.footprint() == 0
    sync.close()


async def test_cancel_reaches_a_running_call_of_another_backend(postgres_dsn: str) -> None:
    """on_busy="cancel" across two gates (as two processes would): NOTIFY cancels the old call."""
    namespace = f"c{secrets.token_hex(4)}"
    gates = [inturn.Gate.from_url(postgres_dsn, namespace=namespace) for _ in range(2)]
    started = asyncio.Event()

    def make(gate: inturn.Gate) -> Callable[[str, str], Awaitable[str]]:
        @gate.serialize(key="user", on_busy="cancel", name="answer")
        async def answer(user: str, text: str) -> str:
            started.set()
            await asyncio.sleep(0 if text == "fixed" else 30)
            return text

        return answer

    first_fn, second_fn = (make(g) for g in gates)
    first = asyncio.ensure_future(first_fn("u", "typo"))
    await asyncio.wait_for(started.wait(), 5)
    assert await asyncio.wait_for(second_fn("u", "fixed"), 5) == "fixed"
    with pytest.raises(inturn.Superseded):
        await asyncio.wait_for(first, 5)
    for gate in gates:
        await gate.aclose()
