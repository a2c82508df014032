"""Round trips per mailbox message on Redis, counted on the server: MONITOR shows every
command a client sent (the commands scripts run come marked ``lua`` and do not count)."""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable

import redis

import inturn
from inturn._backends.redis._shared import SHAS
from tests.servers import RedisServer

MESSAGES = 40
"""Uncontended submit -> drain -> done cycles measured (one message each, distinct keys)."""

STOP = "inturn-test-monitor-stop"


class Monitor:
    """Every command other clients send to the server, from start() until stop()."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = redis.Redis.from_url(url)
        self.commands: list[tuple[str, str]] = []
        self.own: set[str] = set()
        """The ports of this monitor's own connections (their commands do not count)."""
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.client.monitor() as monitor:
            self.started.set()
            for entry in monitor.listen():
                command: str = entry["command"]
                if STOP in command:
                    return
                if entry.get("client_type") != "lua":
                    self.commands.append((str(entry.get("client_port")), command))

    def start(self) -> None:
        self.thread.start()
        assert self.started.wait(10)
        self.own.add(self.client.client_info()["addr"].rpartition(":")[2])

    def stop(self) -> list[str]:
        with redis.Redis.from_url(self.url) as other:
            self.own.add(other.client_info()["addr"].rpartition(":")[2])
            other.echo(STOP)
        self.thread.join(10)
        self.client.close()
        return [command for port, command in self.commands if port not in self.own]


async def test_a_mailbox_message_costs_two_round_trips(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    """submit (with the new drainer's first take and the free turn) + release-and-take
    (which also acknowledges and gives the role up): two commands per message, both
    scripts, and no JOIN."""
    server = make_redis_server()
    gate = inturn.Gate.from_url(server.url, namespace=f"rt{secrets.token_hex(3)}")
    handled: list[str] = []

    async def handle(message: inturn.Message) -> None:
        handled.append(message.key)

    box = gate.mailbox("inbox", handler=handle, sweep_interval=None)
    seen: list[str] = []
    try:
        async with asyncio.timeout(60):
            for i in range(3):  # warm up: scripts loaded, the listener subscribed
                await box.submit(f"warm-{i}", {"n": i})
                assert await box.drained(10)
            monitor = Monitor(server.url)
            await asyncio.to_thread(monitor.start)
            for i in range(MESSAGES):
                await box.submit(f"user-{i}", {"n": i})
                assert await box.drained(10)
            seen = await asyncio.to_thread(monitor.stop)
        assert len(handled) == 3 + MESSAGES
    finally:
        await gate.aclose()
    scripts = [c for c in seen if c.split(" ")[0].upper() in ("EVALSHA", "EVAL")]
    assert len(seen) <= 2 * MESSAGES, [c[:60] for c in seen[:12]]
    assert len(scripts) == 2 * MESSAGES
    assert not [c for c in scripts if SHAS["join"][0] in c]


async def test_a_burst_keeps_the_turn_from_batch_to_batch(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    """Messages that queued while the drainer worked are taken one batch at a time; while
    nobody else waits for the key, each release-and-take keeps the turn for the next batch
    (a new fence each time), so the drain runs no JOIN at all."""
    server = make_redis_server()
    gate = inturn.Gate.from_url(server.url, namespace=f"rt{secrets.token_hex(3)}")
    release = asyncio.Event()
    fences: list[int] = []

    async def handle(message: inturn.Message) -> None:
        fences.append(message.fence)
        if message.payload == 0:
            await release.wait()

    box = gate.mailbox("inbox", handler=handle, sweep_interval=None)
    try:
        async with asyncio.timeout(60):
            await box.submit("warm", 0)
            release.set()
            assert await box.drained(10)
            release.clear()
            fences.clear()
            monitor = Monitor(server.url)
            await asyncio.to_thread(monitor.start)
            await box.submit("u", 0)
            for n in range(1, 6):
                await box.submit("u", n)
            release.set()
            assert await box.drained(10)
            seen = await asyncio.to_thread(monitor.stop)
    finally:
        await gate.aclose()
    assert len(fences) == 6, fences
    assert fences == sorted(set(fences)), fences
    scripts = [c for c in seen if c.split(" ")[0].upper() in ("EVALSHA", "EVAL")]
    assert not [c for c in scripts if SHAS["join"][0] in c]
    assert len(scripts) == 6 + 6  # six submits, six release-and-takes


def test_a_stored_message_drained_elsewhere_costs_three_round_trips(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    """store_sync (a Celery producer) + drain_sync (the worker handed the role): the store,
    the worker's first take (which brings the free turn along), and the release-and-take;
    no JOIN."""
    server = make_redis_server()
    gate = inturn.Gate.from_url(server.url, namespace=f"rt{secrets.token_hex(3)}")
    handled: list[object] = []
    box = gate.mailbox("inbox", handler=lambda m: handled.append(m.payload), sweep_interval=None)
    try:
        for i in range(3):  # warm up
            box.drain_sync(f"warm-{i}", box.store_sync(f"warm-{i}", i) or "")
        monitor = Monitor(server.url)
        monitor.start()
        for i in range(MESSAGES):
            token = box.store_sync(f"user-{i}", i)
            assert token is not None
            box.drain_sync(f"user-{i}", token)
        seen = monitor.stop()
    finally:
        gate.close()
    assert len(handled) == 3 + MESSAGES
    scripts = [c for c in seen if c.split(" ")[0].upper() in ("EVALSHA", "EVAL")]
    assert len(seen) == 3 * MESSAGES, [c[:60] for c in seen[:12]]
    assert len(scripts) == 3 * MESSAGES
    assert not [c for c in scripts if SHAS["join"][0] in c]
