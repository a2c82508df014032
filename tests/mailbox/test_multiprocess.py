"""The Redis mailbox across OS processes: every message once, in order; a killed drainer."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import defaultdict
from pathlib import Path

import redis

import inturn
from inturn.testing import Span, check_history
from tests._contender import spawn

WORKER = "tests.mailbox._worker"


def test_four_processes_submit_for_200_users(redis_url: str, tmp_path: Path) -> None:
    """4 processes x 200 users x 3 messages: each handled once, per-user FIFO, no overlap."""
    namespace = f"mbp{secrets.token_hex(4)}"
    outs = [tmp_path / f"w{i}.jsonl" for i in range(4)]
    procs = [
        spawn("submit", redis_url, namespace, str(o), str(i), "200", "3", module=WORKER)
        for i, o in enumerate(outs)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    records = [json.loads(line) for o in outs for line in o.read_text().splitlines()]
    seen = [(r["payload"]["p"], r["key"], r["payload"]["n"]) for r in records]
    assert len(seen) == 4 * 200 * 3
    assert len(set(seen)) == len(seen), "a message was handled twice"
    spans = [
        Span(r["key"], r["fence"], r["start"], r["start"], r["start"], r["end"], str(r["pid"]))
        for r in records
    ]
    check_history(spans, fifo=False)  # no overlap per user, fences increase
    order: dict[tuple[str, int], list[int]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r["fence"]):
        order[(r["key"], r["payload"]["p"])].append(r["payload"]["n"])
    assert all(ns == sorted(ns) for ns in order.values()), "a user's messages ran out of order"
    assert len({r["pid"] for r in records}) > 1  # drains really were spread over processes
    with redis.Redis.from_url(redis_url) as client:  # left: the fence floor and dedup marks
        names = list(client.scan_iter(match=f"inturn:{namespace}:*"))
    assert [n for n in names if not (n.endswith(b":fence") or b"}:d:" in n)] == []


async def test_killed_drainer_is_resumed_by_the_sweeper(redis_url: str, tmp_path: Path) -> None:
    """SIGKILL a drainer between handling a message and acknowledging it: the sweeper
    resumes the queue, redelivers the in-flight message first, and dedup keeps its effect once."""
    namespace = f"mbk{secrets.token_hex(4)}"
    effects = tmp_path / "effects.txt"
    proc = spawn("victim", redis_url, namespace, str(effects), module=WORKER)
    out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == -9, err
    assert out.splitlines() == ["effect 0"]

    gate = inturn.Gate.from_url(redis_url, namespace=namespace, lease=1.0)
    handled: list[object] = []

    async def handler(msg: inturn.Message) -> None:
        handled.append(msg.payload)
        with effects.open("a", encoding="utf-8") as f:
            f.write(f"{msg.payload}\n")

    box = gate.mailbox("kill", handler=handler)
    assert await box.pending("victim") == 2  # message 0 is in flight, 1 and 2 queued
    resumed = 0
    for _ in range(40):  # the dead drainer's role lapses within its 1 s lease
        resumed = await box.sweep()
        if resumed:
            break
        await asyncio.sleep(0.1)
    assert resumed == 1
    await asyncio.wait_for(box.drained(), 10)
    assert handled == [1, 2]  # 0 was redelivered first and skipped by dedup
    assert effects.read_text().split() == ["0", "1", "2"]
    assert await box.sweep() == 0
    assert await gate.backend.footprint() == 0
    await gate.aclose()
