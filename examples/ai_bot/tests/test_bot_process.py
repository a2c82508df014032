"""``python -m ai_bot`` as a subprocess, driven like a deployment: a burst, a proactive
tick from another process, a kill mid-reply and a restart, a clean SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
from bot_checks import all_answered, answered, check_user, replies_to
from conftest import BotProcess

from tests.fakes.llm import FakeLLM, Request
from tests.fakes.telegram import FakeTelegram

USER = 9001

Spawn = Callable[..., BotProcess]


def burst(tg: FakeTelegram, user: int, texts: list[str], spread: float) -> dict[str, float]:
    sent_at: dict[str, float] = {}
    for i, text in enumerate(texts):
        if i:
            time.sleep(spread / (len(texts) - 1))
        sent_at[text] = time.monotonic()
        tg.send_text(user_id=user, text=text)
    return sent_at


@pytest.mark.parametrize("backend", [pytest.param("memory", marks=pytest.mark.slow), "redis"])
def test_burst_through_the_process(
    tg: FakeTelegram,
    llm: FakeLLM,
    backend: str,
    request: pytest.FixtureRequest,
    make_env: Callable[..., dict[str, str]],
    spawn: Spawn,
) -> None:
    llm.latency = 0.3
    url = "memory://" if backend == "memory" else request.getfixturevalue("redis_url")
    bot = spawn(make_env(url))
    texts = [f"p{i}" for i in range(5)]
    sent_at = burst(tg, USER, texts, 0.3)
    tg.wait_for(lambda _: all_answered(tg, USER, texts), timeout=15)
    time.sleep(0.3)
    assert bot.terminate() == 0
    check_user(tg, llm, USER, texts, sent_at)


def proactive(env: dict[str, str], user: int) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ai_bot", "proactive", "--user", str(user)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


@pytest.mark.slow  # three interpreter starts; the in-process twin runs in the quick set
def test_proactive_tick_from_another_process_during_a_burst(
    tg: FakeTelegram,
    llm: FakeLLM,
    redis_url: str,
    make_env: Callable[..., dict[str, str]],
    spawn: Spawn,
) -> None:
    release = threading.Event()  # the burst's first model call waits for the tick

    def after_the_tick(request: Request) -> float:
        release.wait(30)
        return 0.3

    llm.latency = after_the_tick
    env = make_env(redis_url, PROACTIVE_IDLE_MINUTES="0")
    bot = spawn(env)
    texts = [f"q{i}" for i in range(4)]
    sent_at = burst(tg, USER, texts, 0.3)
    llm.wait_for(lambda reqs: reqs, 10)
    try:
        during = proactive(env, USER)  # while the mailbox answers the burst
    finally:
        release.set()
    tg.wait_for(lambda _: all_answered(tg, USER, texts), timeout=20)
    time.sleep(0.5)
    after = proactive(env, USER)
    assert bot.terminate() == 0
    assert during == f"user {USER}: skipped"
    assert after == f"user {USER}: sent"
    assert replies_to(tg, USER)[-1] == "checking in"
    assert answered(tg, USER) == texts, "no message answered again"
    check_user(tg, llm, USER, texts, sent_at)
    assert [r.answering for r in llm.for_user(USER) if r.reply == "checking in"] == [[]]


def test_killed_mid_reply_then_restarted(
    tg: FakeTelegram,
    llm: FakeLLM,
    redis_url: str,
    make_env: Callable[..., dict[str, str]],
    spawn: Spawn,
) -> None:
    env = make_env(redis_url, INTURN_LEASE="1.5")
    first = spawn(env)
    u1 = tg.send_text(user_id=USER, text="m1")
    tg.wait_for(lambda _: all_answered(tg, USER, ["m1"]), timeout=10)

    def slow_m2(request: Request) -> float:
        return 60.0 if "m2" in request.answering else 0.05

    llm.latency = slow_m2
    u2 = tg.send_text(user_id=USER, text="m2")
    llm.wait_for(lambda reqs: any("m2" in r.answering for r in reqs), 10)
    first.kill()  # mid-reply: m2's model call is under way

    llm.latency = 0.05
    second = spawn(env)
    tg.redeliver(u1)  # Telegram hands both out again after a restart
    tg.redeliver(u2)
    tg.wait_for(lambda _: "m2" in answered(tg, USER), timeout=20)
    time.sleep(1.0)
    assert second.terminate() == 0
    assert answered(tg, USER) == ["m1", "m2"], "m2 answered after the restart, m1 not again"
    assert "resumed key" in second.text() or "answered before" in second.text()


@pytest.mark.slow
def test_sigterm_finishes_the_reply_under_way(
    tg: FakeTelegram,
    llm: FakeLLM,
    make_env: Callable[..., dict[str, str]],
    spawn: Spawn,
) -> None:
    llm.latency = 1.0
    bot = spawn(make_env())
    tg.send_text(user_id=USER, text="still there?")
    llm.wait_for(lambda reqs: reqs, 10)
    started = time.monotonic()
    assert bot.terminate() == 0
    assert time.monotonic() - started < 8
    assert replies_to(tg, USER) == ["answer to: still there?"]
    assert "stopped taking updates" in bot.text()
