"""Settings, message splitting, the fenced conversation write, the Celery schedule."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import running_bot

import inturn
from ai_bot.__main__ import main
from ai_bot.config import Settings, SettingsError
from ai_bot.responder import split_message
from ai_bot.storage import Incoming, StaleFence, Store, Turn
from tests.fakes.llm import FakeLLM
from tests.fakes.telegram import FakeTelegram


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"BOT_TOKEN": ""}, "BOT_TOKEN is not set"),
        ({"LLM_BASE_URL": "ftp://x"}, "LLM_BASE_URL='ftp://x' is not a URL"),
        ({"INTURN_URL": "mysql://x"}, "INTURN_URL='mysql://x' is not a URL"),
        ({"INTURN_LEASE": "soon"}, "INTURN_LEASE='soon' is not a number"),
    ],
)
def test_bad_settings_are_named_one_per_line(
    make_env: Callable[..., dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    problem: str,
) -> None:
    for name, value in {**make_env(), **env}.items():
        monkeypatch.setenv(name, value)
    assert main([]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith(f"ai_bot: {problem}") for line in lines), lines


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"LLM_BASE_URL": "x://y"})
    assert len(info.value.problems) == 4  # token, URL, key, model


def test_defaults() -> None:
    s = Settings.from_env(
        {"BOT_TOKEN": "1:a", "LLM_BASE_URL": "http://l/v1", "LLM_API_KEY": "k", "LLM_MODEL": "m"}
    )
    assert s.inturn_url == "memory://"
    assert s.database_url.startswith("sqlite+aiosqlite://")
    assert s.broker_url == "memory://"


@pytest.mark.parametrize("size", [0, 1, 4096, 4097, 10_000])
def test_split_keeps_the_text_and_the_limit(size: int) -> None:
    text = ("abc def\n" * size)[:size]
    parts = split_message(text)
    assert "".join(parts) == text
    assert all(len(p.encode("utf-16-le")) // 2 <= 4096 for p in parts)


def test_split_counts_utf16_units() -> None:
    parts = split_message("😀" * 3000)  # 2 units each
    assert [len(p) for p in parts] == [2048, 952]


async def test_a_lower_fence_is_refused_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}")
    try:
        one = [Incoming(1, "hi", 1.0)]
        await store.record(Turn(5, 5, 10, "redis:x", one, "hello"))
        with caplog.at_level(logging.WARNING, "ai_bot.storage"), pytest.raises(StaleFence):
            await store.record(Turn(5, 5, 9, "redis:x", [Incoming(2, "yo", 2.0)], "stale"))
        assert "refused a stale write for user 5: fence 9" in caplog.text
        assert await store.history(5, 10) == [("user", "hi"), ("assistant", "hello")]
        # another fence source (a restarted memory:// process) starts its own sequence
        await store.record(Turn(5, 5, 1, "memory:new", [Incoming(3, "again", 3.0)], "ok"))
        assert await store.count_messages(5) == 4
    finally:
        await store.aclose()


async def test_a_stale_holder_is_refused_by_its_fence(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A holder that lost its turn (its hold ran out while it worked) writes after the next
    holder did: the store refuses the stale write."""
    import asyncio

    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}")
    gate = inturn.Gate.from_url(redis_url, namespace="fence-test")
    try:
        stale_ready = asyncio.Event()

        async def stale() -> None:
            async with gate.turn(5, max_hold=0.3) as turn:
                stale_ready.set()
                await asyncio.sleep(1.0)  # stalls past its hold: the turn goes to `fresh`
                assert turn.lost.is_set()
                await store.record(Turn(5, 5, turn.fence, "redis:t", [], "late"))

        async def fresh() -> None:
            await stale_ready.wait()
            async with gate.turn(5) as turn:
                await store.record(Turn(5, 5, turn.fence, "redis:t", [], "current"))

        with caplog.at_level(logging.WARNING, "ai_bot.storage"):
            results = await asyncio.gather(stale(), fresh(), return_exceptions=True)
        assert isinstance(results[0], StaleFence)
        assert results[1] is None
        assert await store.history(5, 10) == [("assistant", "current")]
        assert "refused a stale write" in caplog.text
    finally:
        await gate.aclose()
        await store.aclose()


async def test_answered_messages_are_not_answered_again_after_the_dedup_window(
    tg: FakeTelegram, llm: FakeLLM, make_env: Callable[..., dict[str, str]]
) -> None:
    """A fresh memory:// process has no dedup marks; the database still knows the message
    was answered (its turn was recorded), so a redelivery gets no second reply."""
    env = make_env()
    async with running_bot(env):
        update = tg.send_text(user_id=1, text="once")
        await tg.wait_for_async(lambda sent: sent, timeout=10)
    async with running_bot(env):
        tg.redeliver(update)
        await tg.wait_for_async(lambda _: tg.polls and not tg.pending, timeout=10)
        import asyncio

        await asyncio.sleep(0.5)
    assert [c.text for c in tg.sent] == ["answer to: once"]
    assert len(llm.requests) == 1


def test_celery_beat_schedules_the_proactive_tick() -> None:
    from ai_bot.proactive_messaging import celery_app, proactive_tick

    schedule = celery_app.conf.beat_schedule["proactive-tick"]
    assert schedule["task"] == proactive_tick.name == "ai_bot.proactive_tick"


def test_celery_task_runs_a_tick(
    tg: FakeTelegram,
    llm: FakeLLM,
    make_env: Callable[..., dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The beat tick sends one ``send_proactive`` task per idle user: an
    ``inturn.contrib.celery`` task in the user's turn, skipped while the turn is busy."""
    import asyncio
    import threading

    import inturn
    from ai_bot.proactive_messaging import celery_app, proactive_tick, send_proactive

    env = make_env(PROACTIVE_IDLE_MINUTES="0")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setitem(celery_app.conf, "task_always_eager", True)  # tasks run inline

    async def converse() -> None:
        async with running_bot(env):
            tg.send_text(user_id=3, text="hello")
            await tg.wait_for_async(lambda sent: sent, timeout=10)

    asyncio.run(converse())
    assert celery_app.conf.inturn_namespace == "ai_bot"  # the bot's namespace: its turns

    # the user's turn is busy (held by another thread, through the same memory://
    # namespace): the task is skipped
    holder = inturn.Gate.from_url(celery_app.conf.inturn_url, namespace="ai_bot")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with holder.turn_sync(3):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(10)
        assert send_proactive.apply(kwargs={"user_id": 3}).get() is None
    finally:
        release.set()
        thread.join(10)
    assert [c.text for c in tg.sent] == ["answer to: hello"]

    assert proactive_tick.apply().get() == {"3": "queued"}
    assert [c.text for c in tg.sent] == ["answer to: hello", "checking in"]
    assert proactive_tick.apply().get() == {}  # once per quiet spell
    holder.close()


async def test_the_store_on_postgresql(postgres_dsn: str) -> None:
    from ai_bot.config import normalize_database_url

    store = await Store.open(normalize_database_url(postgres_dsn))
    try:
        await store.record(Turn(5, 50, 10, "redis:x", [Incoming(1, "hi", 1.0)], "hello"))
        with pytest.raises(StaleFence):
            await store.record(Turn(5, 50, 9, "redis:x", [Incoming(2, "yo", 2.0)], "stale"))
        done, fence, history = await store.load(5, [1, 2], 10)
        assert done == {1}
        assert fence == (10, "redis:x")
        assert history == [("user", "hi"), ("assistant", "hello")]
        assert await store.chat_of(5) == 50
        await store.migrate()  # idempotent
    finally:
        await store.aclose()


async def test_webhook_mode(
    tg: FakeTelegram, llm: FakeLLM, make_env: Callable[..., dict[str, str]]
) -> None:
    import asyncio

    from ai_bot.bot import run_webhook
    from tests.servers import free_port

    port = free_port()
    env = make_env(
        WEBHOOK_URL=f"http://127.0.0.1:{port}/telegram",
        WEBHOOK_HOST="127.0.0.1",
        WEBHOOK_PORT=str(port),
        WEBHOOK_SECRET="s3cret",
    )
    stop = asyncio.Event()
    server = asyncio.create_task(run_webhook(Settings.from_env(env), stop))
    for _ in range(500):
        if tg.webhook_url:
            break
        await asyncio.sleep(0.02)
    assert tg.webhook_secret == "s3cret"
    update = tg.send_text(user_id=4, text="via webhook")
    await tg.wait_for_async(lambda sent: sent, timeout=10)
    tg.redeliver(update)  # a webhook retry
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.wait_for(server, 20)
    assert [c.text for c in tg.sent] == ["answer to: via webhook"]


async def test_fake_llm_streams_and_fails_on_demand() -> None:
    import openai

    with FakeLLM(latency=0.05) as llm:
        client = openai.AsyncOpenAI(base_url=llm.url, api_key="k", max_retries=0)
        try:
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "stream me"}], stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text == "answer to: stream me"
            llm.fail_next(status=503)
            with pytest.raises(openai.APIStatusError):
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "x"}], user="9"
                )
        finally:
            await client.close()
    assert [(r.stream, r.status, r.user) for r in llm.requests] == [
        (True, 200, None),
        (False, 503, "9"),
    ]
    assert all(r.end is not None and r.end - r.start >= 0.05 for r in llm.requests)
