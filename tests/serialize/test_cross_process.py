"""on_busy="cancel" across processes: a push reaches the running call in another process."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from pathlib import Path

import inturn

ROOT = Path(__file__).resolve().parents[2]


async def test_cancel_reaches_a_call_in_another_process(redis_url: str) -> None:
    """A newer call here cancels the running call of the same user in another process."""
    namespace = f"x{secrets.token_hex(4)}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.serialize._cancel_worker", redis_url, namespace],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    gate = inturn.Gate.from_url(redis_url, namespace=namespace)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
        assert line.strip() == "running"

        @gate.serialize(key="user", on_busy="cancel", name="answer")
        async def answer(user: int) -> str:
            return "fresh"

        t0 = time.monotonic()
        assert await asyncio.wait_for(answer(1), 10) == "fresh"
        assert time.monotonic() - t0 < 3  # a push, not the 30 s body running out
        out, err = await asyncio.to_thread(proc.communicate, timeout=10)
        assert out.strip() == "superseded", err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        await gate.aclose()
