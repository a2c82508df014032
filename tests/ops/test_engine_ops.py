"""The operators' calls on every engine: forced release, dead letters, forget, sweep.

Each runs against memory://, a real redis-server and a real PostgreSQL; the
gates of one test stand for separate processes (a holder, a waiter, the
operator), except on memory://, whose gates share the process's state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis

import inturn
from inturn._admin import Admin, Letter
from inturn._backends.base import SupersedeBackend
from inturn._keys import new_token
from inturn._message import envelope
from tests.ops import _inspect
from tests.ops.conftest import Engine
from tests.servers import RedisCluster


class FencedSink:
    """A store that keeps the highest fence it has seen and refuses writes below it."""

    def __init__(self) -> None:
        self.highest = 0
        self.values: list[str] = []

    def write(self, fence: int, value: str) -> bool:
        if fence < self.highest:
            return False
        self.highest = fence
        self.values.append(value)
        return True


async def until(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.02)


def kept(engine: Engine, gate: inturn.Gate, key: str) -> int:
    if engine.name == "memory":
        return _inspect.memory_kept(gate, key)
    if engine.name == "redis":
        with redis.Redis.from_url(engine.url) as client:
            return _inspect.redis_kept(client, engine.namespace, key)
    return _inspect.postgres_kept(engine.url, engine.namespace, key)


async def store(gate: inturn.Gate, mailbox: str, key: str, payload: Any) -> None:
    """Queue a message that nobody drains (its drainer role lapses at once)."""
    text = envelope(key, new_token(), None, payload, time.time())
    await gate.backend.mb_submit(  # type: ignore[attr-defined]
        mailbox,
        key,
        text,
        max_pending=100,
        drop_oldest=False,
        token=new_token(),
        lease=0.001,
    )


async def dead_letters(gate: inturn.Gate, mailbox: str, keys: list[str]) -> None:
    """One dead letter per key in ``mailbox``: a handler that always fails, one attempt."""

    async def fail(msg: inturn.Message) -> None:
        raise ValueError(f"cannot answer {msg.key}")

    made: dict[str, inturn.Mailbox] = gate._mailboxes  # type: ignore[attr-defined]
    box = made.get(mailbox) or gate.mailbox(
        mailbox, handler=fail, max_attempts=1, sweep_interval=None
    )
    for key in keys:
        await box.submit(key, {"text": f"hi from {key}"}, id=f"{key}-1")
    assert await box.drained(10)


# -- forced release ---------------------------------------------------------------------


async def test_forced_release_hands_the_turn_to_the_next_waiter(engine: Engine) -> None:
    """The waiter gets the turn at once with a greater fence; the old holder's fenced write
    is refused and its check finds the turn lost."""
    holder, waiter, operator = engine.gate(), engine.gate(), engine.gate()
    admin = Admin(operator.backend)
    sink = FencedSink()
    granted: asyncio.Queue[int] = asyncio.Queue()
    go = asyncio.Event()

    async def wait_in_line() -> None:
        async with waiter.turn("user-1", timeout=30) as turn:
            assert sink.write(turn.fence, "new holder")
            granted.put_nowait(turn.fence)
            await go.wait()

    async with holder.turn("user-1") as old:
        assert sink.write(old.fence, "old holder, before")
        line = asyncio.ensure_future(wait_in_line())

        async def queued() -> bool:
            snap = await operator.statistics("user-1")
            return bool(snap.keys) and snap.keys[0].waiting >= 1

        await until(queued)
        done = await admin.release("user-1", by="the test")
        fence = await asyncio.wait_for(granted.get(), 10)
        assert done.released
        assert done.fence == old.fence
        assert fence > old.fence
        assert done.next_fence in (None, fence)
        assert not sink.write(old.fence, "old holder, after")
        assert not await old.check()
    go.set()
    await line
    assert sink.values == ["old holder, before", "new holder"]
    assert not await operator.is_busy("user-1")


async def test_forced_release_of_a_free_key_releases_nothing(engine: Engine) -> None:
    """Nobody holds the key: nothing released, no error; the key stays free."""
    gate = engine.gate()
    async with gate.turn("free"):
        pass
    done = await Admin(gate.backend).release("free")
    assert not done.released
    assert done.fence is None
    async with gate.turn_nowait("free"):
        pass


async def test_forced_release_logs_key_fence_and_operator(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """One WARNING names the key, the fence ended and who forced it."""
    gate = engine.gate()
    async with gate.turn("logged") as turn:
        with caplog.at_level("WARNING", logger="inturn"):
            await Admin(engine.gate().backend).release("logged", by="ops@host")
    lines = [r.getMessage() for r in caplog.records if "forced release" in r.getMessage()]
    assert len(lines) == 1
    assert "'logged'" in lines[0]
    assert str(turn.fence) in lines[0]
    assert "ops@host" in lines[0]


# -- dead letters -----------------------------------------------------------------------


async def test_dead_letters_are_listed_with_their_story(engine: Engine) -> None:
    """Each letter: an id, its mailbox, key, message id, payload, attempts and error;
    selectable by mailbox, key and id."""
    gate = engine.gate()
    admin = Admin(gate.backend)
    await dead_letters(gate, "replies", ["alice", "bob"])
    await dead_letters(gate, "digest", ["alice"])
    assert await admin.mailboxes() == {"digest": 1, "replies": 2}
    letters = await admin.letters()  # by mailbox; alice and bob drained side by side
    assert sorted((x.mailbox, x.key) for x in letters) == [
        ("digest", "alice"),
        ("replies", "alice"),
        ("replies", "bob"),
    ]
    assert letters[0].mailbox == "digest"
    alice = next(x for x in letters if (x.mailbox, x.key) == ("replies", "alice"))
    assert alice.message_id == "alice-1"
    assert alice.payload == {"text": "hi from alice"}
    assert alice.attempts == 1
    assert alice.error == "ValueError: cannot answer alice"
    assert alice.enqueued_at is not None
    assert alice.failed_at is not None
    assert alice.enqueued_at <= alice.failed_at
    assert len({x.id for x in letters}) == 3
    assert await admin.letters(mailbox="replies", key="alice") == [alice]
    assert await admin.letters(ids=[alice.id]) == [alice]
    assert [x.key for x in await admin.letters(key="alice")] == ["alice", "alice"]


async def test_replay_makes_the_next_drain_handle_the_letter_once(engine: Engine) -> None:
    """A replayed letter is handled once by the next drain (the sweeper of a process with
    the handler), then it is no dead letter any more; replaying it again does nothing."""
    gate = engine.gate()
    admin = Admin(gate.backend)
    broken = [True]
    handled: list[tuple[str, Any, int]] = []

    async def handler(msg: inturn.Message) -> None:
        if broken[0]:
            raise ValueError("the model is down")
        handled.append((msg.key, msg.payload, msg.attempt))

    box = gate.mailbox("replies", handler=handler, max_attempts=1, sweep_interval=None)
    await box.submit("alice", "first", id="a1")
    await box.submit("alice", "second", id="a2")
    await box.submit("bob", "hello", id="b1")
    assert await box.drained(10)
    alice = await admin.letters(key="alice")
    assert [x.payload for x in alice] == ["first", "second"]

    broken[0] = False
    replayed = await admin.replay(list(reversed(alice)))  # the original order is kept
    assert [x.payload for x in replayed] == ["first", "second"]
    assert await admin.replay(alice) == []  # gone from the dead letters: not twice
    assert [x.key for x in await admin.letters()] == ["bob"]

    await asyncio.sleep(0.05)  # the replay's drainer role lapses at once
    assert await box.sweep() == 1
    assert await box.drained(10)
    assert handled == [("alice", "first", 1), ("alice", "second", 1)]
    assert await box.sweep() == 0
    assert await box.drained(10)
    assert len(handled) == 2


async def test_purge_deletes_the_chosen_letters_only(engine: Engine) -> None:
    """Purging by id deletes that letter; purging it again deletes nothing."""
    gate = engine.gate()
    admin = Admin(gate.backend)
    await dead_letters(gate, "replies", ["alice", "bob"])
    alice = await admin.letters(key="alice")
    assert await admin.purge(alice) == 1
    assert await admin.purge(alice) == 0
    assert [x.key for x in await admin.letters()] == ["bob"]
    assert await admin.purge(await admin.letters()) == 1
    assert await admin.mailboxes() == {}


async def test_a_replay_that_cannot_store_keeps_the_letter(engine: Engine) -> None:
    """An unreadable letter is left where it is (nothing to replay)."""
    gate = engine.gate()
    admin = Admin(gate.backend)
    await gate.backend.mb_dead("replies", ["not a letter"])  # type: ignore[attr-defined]
    letters = await admin.letters()
    assert [(x.key, x.error) for x in letters] == [(None, None)]
    assert await admin.replay(letters) == []
    assert [x.text for x in await admin.letters()] == ["not a letter"]


# -- forget -----------------------------------------------------------------------------


async def _leave_traces(gate: inturn.Gate, key: str) -> None:
    """Everything inturn may keep for a user: a past turn, a dedup mark, supersede state,
    queued messages in two mailboxes, a dead letter."""
    async with gate.turn(key):
        pass
    backend: Any = gate.backend
    token = new_token()
    await backend.claim(key, "reply", "m-1", token, fence=None, lease=5, window=60)
    await backend.finish(key, "reply", "m-1", token, '"ok"', window=60)
    if isinstance(backend, SupersedeBackend):
        await backend.supersede(key, "reply", cancel_running=False)
    await store(gate, "replies", key, "one")
    await store(gate, "replies", key, "two")
    await store(gate, "digest", key, "three")
    await dead_letters(gate, "failing", [key])


async def test_forget_erases_one_user_and_leaves_the_others(engine: Engine) -> None:
    """After forget, nothing of the user is stored (scanned Redis keys, counted rows, the
    memory state); another user's state is untouched; a second forget finds nothing."""
    gate = engine.gate()
    admin = Admin(gate.backend)
    for user in ("alice", "bob"):
        await _leave_traces(gate, user)
    await asyncio.sleep(0.05)  # the queued messages' drainer roles lapse
    bob_before = kept(engine, gate, "bob")
    assert kept(engine, gate, "alice") == bob_before > 0

    done = await admin.forget("alice")
    assert done.messages == 3
    assert done.dead_letters == 1
    assert done.marks >= 1
    assert kept(engine, gate, "alice") == 0
    assert kept(engine, gate, "bob") == bob_before
    assert (await admin.forget("alice")).total == 0
    assert await gate.mailbox("replies", handler=lambda m: None).pending("bob") == 2


async def test_forget_refuses_a_key_at_work_unless_forced(engine: Engine) -> None:
    """A held turn or a working drainer: Busy, with the reason; forced, the stored state
    goes and the turn in progress ends by itself."""
    gate = engine.gate()
    admin = Admin(gate.backend)
    await store(gate, "replies", "carol", "queued")
    await asyncio.sleep(0.05)
    async with gate.turn("carol"):
        with pytest.raises(inturn.Busy, match="turn is held"):
            await admin.forget("carol")
        done = await admin.forget("carol", force=True)
        assert done.messages == 1
    assert kept(engine, gate, "carol") == 0

    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(msg: inturn.Message) -> None:
        started.set()
        await release.wait()

    box = gate.mailbox("replies", handler=slow, sweep_interval=None)
    await box.submit("dan", "working")
    await box.submit("dan", "waiting")
    await asyncio.wait_for(started.wait(), 10)
    with pytest.raises(inturn.Busy, match="replies"):
        await admin.forget("dan")
    assert (await admin.forget("dan", force=True)).messages == 2
    release.set()
    assert await box.drained(10)
    assert await box.pending("dan") == 0


# -- sweep ------------------------------------------------------------------------------


async def test_sweep_counts_undrained_queues_and_never_drains(engine: Engine) -> None:
    """A queue with messages and no live drainer is reported (twice: sweeping drains
    nothing); an idle namespace reports nothing to clean."""
    gate = engine.gate()
    admin = Admin(gate.backend)
    first = await admin.sweep()
    assert first.cleaned == 0
    assert first.undrained == ()
    await store(gate, "replies", "dave", 1)
    await store(gate, "replies", "dave", 2)
    await asyncio.sleep(0.05)
    for _ in range(2):
        report = await admin.sweep()
        assert [(b.mailbox, b.key, b.queued, b.draining) for b in report.undrained] == [
            ("replies", "dave", 2, False)
        ]


async def test_sweep_hands_on_a_lapsed_holders_turn(engines: Any) -> None:
    """memory and Redis: a holder that stopped renewing; the sweep gives the turn to the
    live waiter behind it (the waiter is not polling: the sweep did it)."""
    for name in ("memory", "redis"):
        gate = engines(name).gate()
        backend: Any = gate.backend
        assert await backend.join("erin", "old", 0.05) is not None
        assert await backend.join("erin", "next", 30.0) is None
        await asyncio.sleep(0.3)
        report = await Admin(backend).sweep()
        assert (name, report.expired_leases, report.dead_waiters) == (name, 1, 0)
        grant = await backend.wait("erin", "next", 5.0)
        assert grant is not None
        assert await backend.is_held("erin", "next")
        await backend.release("erin", "next")
        assert await backend.footprint() == 0


async def test_sweep_on_redis(engines: Any) -> None:
    """Redis: dead waiters leave the line, stale hints and retry times of empty queues go;
    dedup marks expire by their TTL (nothing for the sweep)."""
    engine = engines("redis")
    gate = engine.gate()
    backend: Any = gate.backend
    assert await backend.join("fay", "holder", 30.0) is not None
    assert await backend.join("fay", "dead", 0.1) is None
    assert await backend.join("fay", "live", 30.0) is None
    space = backend._process.keys
    with redis.Redis.from_url(engine.url) as client:
        client.sadd(space.mailbox_index("replies")[0], "ghost")
        client.set(space.mailbox_keys("replies", "gone")[3], "1")
    await asyncio.sleep(0.5)
    report = await Admin(backend).sweep()
    assert report.dead_waiters == 1
    assert report.stale_hints == 1
    assert report.idle_rows == 1
    assert report.expired_leases == 0
    await backend.release("fay", "holder")
    assert await backend.is_held("fay", "live")  # the hand-off skipped nobody alive
    await backend.release("fay", "live")
    await asyncio.sleep(0)
    assert (await Admin(backend).sweep()).cleaned == 0


async def test_sweep_on_postgres(engines: Any) -> None:
    """PostgreSQL: the audit row of a holder whose session the server ended, expired dedup
    marks, and lapsed roles of empty queues are dropped."""
    engine = engines("postgres")
    gate = engine.gate()
    backend: Any = gate.backend
    assert await backend.join("gus", "stalled", 0.2) is not None  # the server ends it
    token = new_token()
    await backend.claim("gus", "reply", "m", token, fence=None, lease=1, window=0.05)
    await store(gate, "replies", "gus", "x")
    import psycopg

    with psycopg.connect(engine.url.split("?")[0], autocommit=True) as conn:
        conn.execute("DELETE FROM inturn.mb_messages WHERE key = 'gus'")
    await asyncio.sleep(1.0)
    report = await Admin(backend).sweep()
    assert report.expired_leases == 1
    assert report.expired_marks == 1
    assert report.idle_rows == 1
    assert (await Admin(backend).sweep()).cleaned == 0
    assert not await backend.renew("gus", "stalled", 5.0)
    await backend.release("gus", "stalled")


async def test_sweep_on_memory_drops_expired_marks(engines: Any) -> None:
    """memory: dedup marks past their window are dropped (not only on the next claims)."""
    gate = engines("memory").gate()
    backend: Any = gate.backend
    token = new_token()
    await backend.claim("hal", "reply", "m", token, fence=None, lease=1, window=0.05)
    await asyncio.sleep(0.1)
    assert (await Admin(backend).sweep()).expired_marks == 1
    assert _inspect.memory_kept(gate, "hal") == 0


# -- Redis Cluster ------------------------------------------------------------------------


async def test_on_a_redis_cluster(redis_cluster: RedisCluster) -> None:
    """The key layout holds on a Cluster: each script stays in the user's slot, the indexes
    (hints, dead letters) in theirs; forget leaves no key of the user on any master."""
    nodes = ",".join(f"{h}:{p}" for h, p in redis_cluster.startup_nodes)
    engine = Engine("redis", f"redis+cluster://{nodes}")
    try:
        holder, waiter = engine.gate(), engine.gate()
        admin = Admin(engine.gate().backend)
        async with holder.turn("user:{1}") as old:
            line = asyncio.ensure_future(_take(waiter, "user:{1}"))
            await asyncio.sleep(0.3)
            done = await admin.release("user:{1}")
            assert done.released
            assert done.fence == old.fence
            assert await asyncio.wait_for(line, 10) > old.fence
        for user in ("user:{1}", "other"):
            await _leave_traces(holder, user)
        await asyncio.sleep(0.05)
        assert [x.key for x in await admin.letters()] == ["user:{1}", "other"]
        assert len((await admin.sweep()).undrained) == 4
        host, port = redis_cluster.startup_nodes[0]
        client = redis.RedisCluster(host=host, port=port)
        try:
            other = _inspect.redis_kept(client, engine.namespace, "other")
            assert _inspect.redis_kept(client, engine.namespace, "user:{1}") == other > 0
            done_forget = await admin.forget("user:{1}")
            assert done_forget.messages == 3
            assert _inspect.redis_kept(client, engine.namespace, "user:{1}") == 0
            assert _inspect.redis_kept(client, engine.namespace, "other") == other
        finally:
            client.close()
    finally:
        for gate in engine.gates:
            await gate.aclose()


async def _take(gate: inturn.Gate, key: str) -> int:
    async with gate.turn(key, timeout=30) as turn:
        return turn.fence


def test_letters_are_plain_data() -> None:
    """A Letter prints without its stored text."""
    letter = Letter("abc", "m", "k", None, 1, 0.0, 1, "E", 1.0, "{}")
    assert "text" not in letter.shown()
