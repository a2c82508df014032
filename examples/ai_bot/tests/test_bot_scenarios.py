"""The bot in-process against the fakes, on memory:// and Redis: bursts, duplicates,
many users, a proactive message during a burst, 429s, model failures, long replies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from bot_checks import all_answered, answered, check_user, replies_to
from conftest import running_bot

from ai_bot.proactive_messaging import Proactive
from ai_bot.responder import APOLOGY
from tests.fakes.llm import FakeLLM
from tests.fakes.telegram import FakeTelegram

USER = 7001


async def send_burst(
    tg: FakeTelegram, user: int, texts: list[str], spread: float
) -> dict[str, float]:
    sent_at: dict[str, float] = {}
    for i, text in enumerate(texts):
        if i:
            await asyncio.sleep(spread / (len(texts) - 1))
        sent_at[text] = time.monotonic()
        tg.send_text(user_id=user, text=text)
    return sent_at


async def test_burst_is_answered_in_turn(
    tg: FakeTelegram, llm: FakeLLM, inturn_url: str, make_env: Callable[..., dict[str, str]]
) -> None:
    llm.latency = 0.3
    texts = [f"m{i}" for i in range(5)]
    async with running_bot(make_env(inturn_url)):
        sent_at = await send_burst(tg, USER, texts, 0.3)
        await tg.wait_for_async(lambda _: all_answered(tg, USER, texts), timeout=15)
        await asyncio.sleep(0.3)  # nothing more comes
    check_user(tg, llm, USER, texts, sent_at)
    assert len(llm.for_user(USER)) < len(texts), "messages during a reply are batched"
    assert tg.actions
    assert all(a.action == "typing" for a in tg.actions)


async def test_same_update_three_times_one_reply(
    tg: FakeTelegram, llm: FakeLLM, inturn_url: str, make_env: Callable[..., dict[str, str]]
) -> None:
    llm.latency = 0.4
    async with running_bot(make_env(inturn_url)):
        update = tg.send_text(user_id=USER, text="hello")
        tg.redeliver(update)  # before its reply
        await asyncio.to_thread(llm.wait_for, lambda reqs: reqs, 10)
        tg.redeliver(update)  # during
        await tg.wait_for_async(lambda sent: replies_to(tg, USER), timeout=10)
        tg.redeliver(update)  # after
        await asyncio.sleep(1.0)
    assert replies_to(tg, USER) == ["answer to: hello"]
    assert len(llm.requests) == 1


async def test_thirty_users_in_parallel(
    tg: FakeTelegram, llm: FakeLLM, inturn_url: str, make_env: Callable[..., dict[str, str]]
) -> None:
    llm.latency = 0.5
    users = list(range(8000, 8030))
    async with running_bot(make_env(inturn_url)):
        started = time.monotonic()
        for user in users:
            tg.send_text(user_id=user, text=f"hi from {user}")
        await tg.wait_for_async(lambda sent: len(sent) >= len(users), timeout=20)
        wall = time.monotonic() - started
    serial = 0.5 * len(users)
    assert wall < serial / 3, f"{wall:.2f}s for 30 users; serially {serial:.1f}s"
    for user in users:
        assert answered(tg, user) == [f"hi from {user}"]


async def test_proactive_during_a_burst_never_overlaps(
    tg: FakeTelegram, llm: FakeLLM, inturn_url: str, make_env: Callable[..., dict[str, str]]
) -> None:
    llm.latency = 0.3
    env = make_env(inturn_url, PROACTIVE_IDLE_MINUTES="0")
    async with running_bot(env) as bot:
        proactive = Proactive(bot.app)
        tg.send_text(user_id=USER, text="first")
        await tg.wait_for_async(lambda _: all_answered(tg, USER, ["first"]), timeout=10)
        texts = [f"b{i}" for i in range(4)]
        burst = asyncio.create_task(send_burst(tg, USER, texts, 0.3))
        await asyncio.to_thread(llm.wait_for, lambda reqs: len(reqs) >= 2, 10)
        outcomes = [await proactive.send(USER, force=True)]
        sent_at = await burst
        await tg.wait_for_async(lambda _: all_answered(tg, USER, ["first", *texts]), 15)
        for _ in range(200):  # the last reply is being recorded
            if not await bot.app.replies.is_draining(USER):
                break
            await asyncio.sleep(0.02)
        outcomes.append(await proactive.send(USER, force=True))  # idle now: it goes out
    assert outcomes == ["skipped", "sent"]
    assert llm.overlaps(USER) == []
    assert answered(tg, USER) == ["first", *texts]
    assert replies_to(tg, USER)[-1] == "checking in"
    proactive_calls = [r for r in llm.for_user(USER) if r.reply == "checking in"]
    assert len(proactive_calls) == 1
    assert proactive_calls[0].answering == []
    check_user(tg, llm, USER, ["first", *texts], {"first": 0.0, **sent_at})


async def test_telegram_429_is_waited_out(
    tg: FakeTelegram, llm: FakeLLM, make_env: Callable[..., dict[str, str]]
) -> None:
    tg.fail_next("sendMessage", status=429, retry_after=1)
    async with running_bot(make_env()):
        sent = time.monotonic()
        tg.send_text(user_id=USER, text="hi")
        await tg.wait_for_async(lambda _: replies_to(tg, USER), timeout=10)
    assert replies_to(tg, USER) == ["answer to: hi"]
    assert tg.sent[0].at - sent >= 1.0


async def test_model_failure_apologises_then_retries(
    tg: FakeTelegram, llm: FakeLLM, make_env: Callable[..., dict[str, str]]
) -> None:
    llm.fail_next(status=500)
    async with running_bot(make_env()):
        tg.send_text(user_id=USER, text="hi")
        await tg.wait_for_async(lambda _: replies_to(tg, USER), timeout=10)
    texts = [c.text for c in tg.sent]
    assert texts == [APOLOGY, "answer to: hi"]
    assert [r.status for r in llm.requests] == [500, 200]


async def test_long_reply_is_split_at_telegram_limit(
    tg: FakeTelegram, make_env: Callable[..., dict[str, str]]
) -> None:
    long = ("word " * 2000).strip() + " " + "x" * 5000
    with FakeLLM(reply=lambda _: long) as llm:
        env = make_env()
        env["LLM_BASE_URL"] = llm.url
        async with running_bot(env):
            tg.send_text(user_id=USER, text="tell me everything")
            await tg.wait_for_async(lambda sent: "".join(c.text for c in sent) == long, 10)
    assert len(tg.sent) == 4
    assert all(len(c.text or "") <= 4096 for c in tg.sent)
