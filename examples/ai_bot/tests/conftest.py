"""Fixtures for the bot's tests: a fake Telegram, a fake model, the bot in-process or as
``python -m ai_bot`` in a subprocess, on memory:// or Redis. No internet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ai_bot.config import Settings
from tests.conftest import (  # noqa: F401 - shared fixtures
    postgres_dsn,
    postgres_server,
    redis_server,
    redis_url,
)
from tests.fakes.llm import FakeLLM
from tests.fakes.telegram import FakeTelegram


@pytest.fixture
def tg() -> Iterator[FakeTelegram]:
    with FakeTelegram() as fake:
        yield fake


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM(latency=0.05) as fake:
        yield fake


@pytest.fixture(params=["memory", "redis"])
def inturn_url(request: pytest.FixtureRequest) -> str:
    """Each scenario on memory:// and on Redis."""
    if request.param == "memory":
        return "memory://"
    return str(request.getfixturevalue("redis_url"))


def bot_env(
    tg: FakeTelegram, llm: FakeLLM, inturn_url: str, db: Path, **extra: str
) -> dict[str, str]:
    """The environment ``python -m ai_bot`` runs with against the fakes."""
    env = {
        "BOT_TOKEN": tg.token,
        "TELEGRAM_API_URL": tg.url,
        "LLM_BASE_URL": llm.url,
        "LLM_API_KEY": "test-key",
        "LLM_MODEL": "fake-model",
        "INTURN_URL": inturn_url,
        "DATABASE_URL": f"sqlite:///{db}",
        "INTURN_LEASE": "3",
        "SHUTDOWN_GRACE": "5",
    }
    env.update(extra)
    return env


@pytest.fixture
def make_env(tg: FakeTelegram, llm: FakeLLM, tmp_path: Path) -> Callable[..., dict[str, str]]:
    def make(inturn_url: str = "memory://", **extra: str) -> dict[str, str]:
        return bot_env(tg, llm, inturn_url, tmp_path / "bot.sqlite3", **extra)

    return make


@dataclass
class Running:
    """The bot running in this test's event loop."""

    app: Any
    task: Any
    settings: Settings
    extra: dict[str, Any] = field(default_factory=dict)


@asynccontextmanager
async def running_bot(env: dict[str, str]) -> AsyncIterator[Running]:
    """The bot in-process: App + aiogram polling, stopped and closed afterwards."""
    import asyncio

    from ai_bot.app import App
    from ai_bot.bot import build_dispatcher

    settings = Settings.from_env(env)
    app = await App.start(settings)
    app.replies.start_sweeper(1.0)
    dp = build_dispatcher(app)
    task = asyncio.create_task(
        dp.start_polling(app.bot, handle_signals=False, close_bot_session=False, polling_timeout=1)
    )
    try:
        yield Running(app, task, settings)
    finally:
        await dp.stop_polling()
        await asyncio.wait_for(task, 10)
        await app.aclose()


class BotProcess:
    """``python -m ai_bot`` in a subprocess, its log in a file."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        full = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self._out = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ai_bot", *args],
            env=full,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "polling as @" in self.text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the bot exited ({self.proc.returncode}):\n{self.text()}")
            time.sleep(0.05)
        raise TimeoutError(f"the bot did not start:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._out.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., BotProcess]]:
    procs: list[BotProcess] = []

    def start(env: dict[str, str], *args: str, ready: bool = True) -> BotProcess:
        proc = BotProcess(env, tmp_path / f"bot-{len(procs)}.log", *args)
        procs.append(proc)
        if ready:
            proc.wait_ready()
        return proc

    yield start
    for proc in procs:
        if proc.proc.poll() is None:
            proc.kill()
