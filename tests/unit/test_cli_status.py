"""`inturn status` and `inturn doctor`: they format what the gate's statistics and
diagnostics say, mask passwords, and exit non-zero when a guarantee cannot hold."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

import inturn
from inturn._cli import main


async def _cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_status_shows_the_holder_and_its_line(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A held key with two waiters: status names it, its fence and waiting=2; --json too."""
    gate = inturn.Gate.from_url(redis_url, namespace="cli")
    try:
        async with gate.turn("user-7") as turn:
            waiters = [asyncio.ensure_future(_take(gate)) for _ in range(2)]
            await asyncio.sleep(0.2)
            assert await _cli("status", "--url", redis_url, "--namespace", "cli") == 0
            text = capsys.readouterr().out
            assert (
                await _cli("status", "user-7", "--url", redis_url, "--namespace", "cli", "--json")
                == 0
            )
            snap = json.loads(capsys.readouterr().out)
        await asyncio.gather(*waiters)
    finally:
        await gate.aclose()
    row = next(line for line in text.splitlines() if line.startswith("user-7"))
    assert str(turn.fence) in row
    assert row.split()[4] == "2"
    assert snap["keys"][0]["key"] == "user-7"
    assert snap["keys"][0]["waiting"] == 2


async def _take(gate: inturn.Gate) -> None:
    async with gate.turn("user-7", timeout=10):
        pass


async def test_doctor_fails_on_an_evicting_server(
    make_redis_server: Callable[..., object], capsys: pytest.CaptureFixture[str]
) -> None:
    """maxmemory-policy allkeys-lru: doctor exits 1 and names the fix (noeviction)."""
    server = make_redis_server({"maxmemory-policy": "allkeys-lru"})
    url = server.url  # type: ignore[attr-defined]
    assert await _cli("doctor", "--url", url) == 1
    out = capsys.readouterr().out
    assert "noeviction" in out
    assert "NOT OK" in out


async def test_doctor_on_an_unreachable_server_is_one_clear_failure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A refused port: exit 1, the cause named, the password masked, no traceback."""
    assert await _cli("doctor", "--url", "redis://me:hunter2@127.0.0.1:1/0") == 1
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "hunter2" not in text
    assert "Traceback" not in text
    assert "ERROR" in text


async def test_status_of_an_idle_memory_gate(capsys: pytest.CaptureFixture[str]) -> None:
    """memory:// with nothing busy: a short, calm answer."""
    assert await _cli("status") == 0
    out = capsys.readouterr().out
    assert "no busy keys" in out
