"""Redis reliability: call order in a fresh event loop, fork safety, lost replies,
replica waits, and the turn layer's fixes under real faults.

Every test runs against real servers on loopback and is bounded in time.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

import inturn
from inturn._backends.base import SubmitStatus, Taken
from inturn._backends.redis import RedisBackend
from inturn._errors import BackendUnavailable
from tests.redis._proxy import PumpProxy
from tests.servers import RedisServer


def _namespace() -> str:
    return f"r{secrets.token_hex(4)}"


# -- 1. a fresh event loop keeps the order of its first calls ---------------------------


def _first_calls_in_order(url: str, runs: int) -> int:
    """In a fresh loop per run: turn() then, at once, turn_nowait(); count the overtakes."""
    overtaken = 0
    for _ in range(runs):

        async def main() -> bool:
            gate = inturn.Gate.from_url(url, namespace=_namespace())
            held = asyncio.Event()
            done = asyncio.Event()

            async def first() -> None:
                async with gate.turn("k"):
                    held.set()
                    await done.wait()

            task = asyncio.ensure_future(first())
            await asyncio.sleep(0)  # the turn() has started: its JOIN is on its way
            try:
                async with gate.turn_nowait("k"):
                    got = True
            except inturn.Busy:
                got = False
            done.set()
            await task
            await gate.aclose()
            return got

        overtaken += asyncio.run(main())
    return overtaken


def test_fresh_loop_nowait_does_not_overtake_turn(redis_url: str) -> None:
    """The turn() was called first: the nowait finds the key busy, every run."""
    assert _first_calls_in_order(redis_url, 30) == 0


def test_fresh_process_nowait_does_not_overtake_turn(redis_url: str) -> None:
    """The same in fresh processes (nothing warmed up: imports, scripts, connections)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        results = pool.starmap(_first_calls_in_order, [(redis_url, 3)] * 4)
    assert sum(results) == 0


# -- 2. a gate made before fork(): each child has its own channel ------------------------


def _contend(gate: inturn.Gate, key: str, threads: int, seconds: float) -> float:
    """Threads pass ``key``'s turn around (20 ms turns) for ``seconds``; the longest wait."""
    import threading
    import time

    waits: list[float] = []
    failures: list[BaseException] = []
    end = time.monotonic() + seconds

    def worker() -> None:
        try:
            work()
        except BaseException as exc:
            failures.append(exc)

    def work() -> None:
        while time.monotonic() < end:
            asked = time.monotonic()
            with gate.turn_sync(key, timeout=10):
                waits.append(time.monotonic() - asked)
                time.sleep(0.02)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(20)
    if failures:
        raise failures[0]
    return max(waits)


def test_gate_made_before_fork_serves_each_child(redis_url: str) -> None:
    """Two children of one parent's gate contend for a key with threads: nobody starves.

    With a channel shared by the children, one child took the other's waiters in the
    line for its own and passed the turn among its own threads (a wait of 5 s behind
    20 ms turns).
    """
    import json
    import os

    gate = inturn.Gate.from_url(redis_url, namespace=_namespace())
    children: list[tuple[int, int]] = []
    for _ in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(read)
            code = 1
            try:
                longest = _contend(gate, "k", threads=3, seconds=2.0)
                os.write(write, json.dumps(longest).encode())
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write)
        children.append((pid, read))
    longest = []
    for pid, read in children:
        with os.fdopen(read, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        longest.append(json.loads(data))
    assert max(longest) < 1.0, longest


# -- 3. a reply lost after the server ran the script ------------------------------------


class LosingProxy(PumpProxy):
    """A loopback TCP proxy to Redis that loses one reply.

    It forwards every byte, until a command carrying ``marker`` passes: then it waits
    for the server's reply to that command (the server ran it), drops the reply and
    closes the connection. Only once; afterwards it forwards everything.
    """

    def __init__(self, port: int, marker: bytes, down_for: float = 0.0) -> None:
        import threading

        self.marker = marker
        self.down_for = down_for
        """Seconds new connections are refused (closed at once) after the lost reply."""
        self.down_until = 0.0
        self.lost = threading.Event()
        super().__init__(("127.0.0.1", port))

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def admit(self) -> bool:
        return time.monotonic() >= self.down_until  # a server away (a failover): cut at once

    def forward(self, data: bytes, upstream: bool, link: dict[str, Any]) -> tuple[bytes, bool]:
        if upstream and self.marker in data and not self.lost.is_set():
            link["armed"] = True
        elif not upstream and link.get("armed") and not self.lost.is_set():
            self.down_until = time.monotonic() + self.down_for
            self.lost.set()  # the server ran it; its reply goes nowhere
            return b"", False
        return data, True


@pytest.fixture
def proxy(redis_url: str) -> Iterator[Callable[..., LosingProxy]]:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    made: list[LosingProxy] = []

    def make(marker: bytes, down_for: float = 0.0) -> LosingProxy:
        made.append(LosingProxy(port, marker, down_for))
        return made[-1]

    yield make
    for each in made:
        each.close()


def _lengths(redis_url: str, backend: Any, key: str) -> tuple[int, int]:
    queue, inflight = backend._process.keys.mailbox_keys("box", key)[:2]
    with redis.Redis.from_url(redis_url) as client:
        return int(client.llen(queue)), int(client.llen(inflight))


async def test_submit_whose_reply_is_lost_is_stored_once(
    redis_url: str, proxy: Callable[[bytes], LosingProxy]
) -> None:
    """The retried submit finds its own message: stored once, and the caller drains."""
    lossy = proxy(b"lose-me")
    backend = RedisBackend.from_url(lossy.url(), namespace=_namespace())
    try:
        done = await backend.mb_submit(
            "box", "u", "m-lose-me", max_pending=10, drop_oldest=False, token="d", lease=5, take=5
        )
        assert lossy.lost.is_set()
        assert done.status is SubmitStatus.DRAINER
        assert done.first == Taken(messages=("m-lose-me",))
        assert _lengths(redis_url, backend, "u") == (0, 1)
    finally:
        await backend.aclose()


def test_sync_submit_whose_reply_is_lost_is_stored_once(
    redis_url: str, proxy: Callable[[bytes], LosingProxy]
) -> None:
    lossy = proxy(b"lose-me")
    backend = RedisBackend.from_url(lossy.url(), namespace=_namespace())
    twin = backend.sync_twin()
    try:
        done = twin.mb_submit(
            "box", "u", "m-lose-me", max_pending=10, drop_oldest=False, token="d", lease=5
        )
        assert lossy.lost.is_set()
        assert done.status is SubmitStatus.DRAINER
        assert _lengths(redis_url, backend, "u") == (1, 0)
    finally:
        twin.close()


async def test_acknowledging_take_whose_reply_is_lost_is_not_resent(
    redis_url: str, proxy: Callable[[bytes], LosingProxy]
) -> None:
    """A take that acknowledges is not sent twice (the second run would acknowledge the
    batch the first took): the caller gets BackendUnavailable and takes again without
    acknowledging, and finds that batch."""
    lossy = proxy(b"not yet")
    backend = RedisBackend.from_url(lossy.url(), namespace=_namespace())
    try:
        for text in ("m1", "m2"):
            await backend.mb_submit(
                "box", "u", text, max_pending=10, drop_oldest=False, token="tk", lease=5
            )
        first = await backend.mb_take("box", "u", "tk", limit=1, lease=5, ack=False)
        assert first == Taken(messages=("m1",))
        lossy.marker = b"tk\r\n$1\r\n1\r\n$4\r\n5000\r\n$1\r\n1\r\n"  # the take with ack
        with pytest.raises(BackendUnavailable):
            await backend.mb_take("box", "u", "tk", limit=1, lease=5, ack=True)
        assert lossy.lost.is_set()
        again = await backend.mb_take("box", "u", "tk", limit=1, lease=5, ack=False)
        assert again == Taken(messages=("m2",))
    finally:
        await backend.aclose()


async def test_retry_whose_reply_is_lost_puts_the_batch_back_once(
    redis_url: str, proxy: Callable[[bytes], LosingProxy]
) -> None:
    lossy = proxy(b"again-lose-me")
    backend = RedisBackend.from_url(lossy.url(), namespace=_namespace())
    try:
        await backend.mb_submit(
            "box", "u", "m1", max_pending=10, drop_oldest=False, token="d", lease=5, take=5
        )
        await backend.mb_retry("box", "u", "d", ["m1-again-lose-me"], not_before=0.0)
        assert lossy.lost.is_set()
        assert _lengths(redis_url, backend, "u") == (1, 0)
    finally:
        await backend.aclose()


# -- 5. a finish that fails once does not make the handler run twice --------------------


async def test_dedup_finish_rides_out_a_short_outage(
    redis_url: str, proxy: Callable[..., LosingProxy]
) -> None:
    """The connection drops at FINISH and the server stays away 0.8 s (past the mux's own
    retries): the finish is sent again within the claim's lease, so the id is done and
    the handler is not run again."""
    lossy = proxy(b"finish-me", down_for=0.8)
    gate = inturn.Gate.from_url(lossy.url(), namespace=_namespace())
    dedup = gate.dedup("replies", window=60)
    runs = 0
    try:
        async with dedup.claim("u", "id-1", lease=5) as claim:
            runs += 1
            claim.result = "finish-me"
        assert lossy.lost.is_set()
        with pytest.raises(inturn.Duplicate) as found:
            async with dedup.claim("u", "id-1", lease=5):
                runs += 1
        assert (found.value.state, found.value.result) == ("done", "finish-me")
        assert runs == 1
    finally:
        await gate.aclose()


def test_dedup_finish_sync_rides_out_a_short_outage(
    redis_url: str, proxy: Callable[..., LosingProxy]
) -> None:
    lossy = proxy(b"finish-me", down_for=0.8)
    gate = inturn.Gate.from_url(lossy.url(), namespace=_namespace())
    dedup = gate.dedup("replies", window=60)
    try:
        with dedup.claim_sync("u", "id-1", lease=5) as claim:
            claim.result = "finish-me"
        assert lossy.lost.is_set()
        with pytest.raises(inturn.Duplicate) as found, dedup.claim_sync("u", "id-1", lease=5):
            pass
        assert (found.value.state, found.value.result) == ("done", "finish-me")
    finally:
        gate.close()


# -- 8. the turn layer's fixes, on Redis ------------------------------------------------


def test_sync_holder_cut_off_learns_it_lost_the_turn_at_its_lease_end(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    """SIGSTOP the server under a turn_sync holder: turn.lost is set at the lease's end
    (its renewals cannot answer), not seconds later."""
    server = make_redis_server()
    lease = 1.0
    gate = inturn.Gate.from_url(server.url, namespace=_namespace(), lease=lease)
    try:
        with gate.turn_sync("k") as turn:
            granted = time.monotonic()
            server.pause()
            try:
                assert turn.lost.wait(lease + 2.0)
                late = time.monotonic() - granted - lease
            finally:
                server.resume()
        assert turn.lost_reason == "expired"
        assert late < 0.3, f"learnt it {late:.2f}s after the lease's end"
    finally:
        server.resume()
        gate.close()


def test_a_stuck_server_does_not_delay_renewals_on_another(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    """Two gates on two servers; one server stalls under its holder. A holder on the healthy
    server with a short lease keeps it for several lease periods."""
    import threading

    stuck, healthy = make_redis_server(), make_redis_server()
    stuck_gate = inturn.Gate.from_url(stuck.url, namespace=_namespace(), lease=1.0)
    healthy_gate = inturn.Gate.from_url(healthy.url, namespace=_namespace(), lease=0.4)
    holding = threading.Event()
    done = threading.Event()

    def hold_on_the_stuck_server() -> None:
        with stuck_gate.turn_sync("k"):
            holding.set()
            done.wait(10)

    holder = threading.Thread(target=hold_on_the_stuck_server, daemon=True)
    holder.start()
    try:
        assert holding.wait(5)
        stuck.pause()
        time.sleep(0.2)  # its renewal is now in flight, stuck
        with healthy_gate.turn_sync("k") as turn:
            time.sleep(2.0)  # five lease periods
            assert not turn.lost.is_set(), turn.lost_reason
            assert turn.check()
    finally:
        stuck.resume()
        done.set()
        holder.join(15)
        stuck_gate.close()
        healthy_gate.close()


async def test_drainer_rides_out_a_short_restart_with_aof(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    """A 0.5 s restart (AOF, fsync always) under a drain: all 10 messages run once,
    without a sweep."""
    server = make_redis_server({"appendonly": "yes", "appendfsync": "always"})
    gate = inturn.Gate.from_url(server.url, namespace=_namespace(), lease=3.0)
    seen: list[int] = []
    started = asyncio.Event()

    async def handler(message: inturn.Message) -> None:
        started.set()
        await asyncio.sleep(0.1)
        seen.append(message.payload["n"])

    box = gate.mailbox("aof", handler=handler, sweep_interval=None)
    try:
        for n in range(10):
            await box.submit("u", {"n": n}, id=f"m{n}")
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.sleep(0.25)
        server.kill()
        await asyncio.sleep(0.5)
        server.start()
        await asyncio.wait_for(box.drained(), 20)
        assert sorted(seen) == list(range(10)), seen
        assert len(seen) == 10
    finally:
        await gate.aclose()


# -- 4. waiting for replicas before a submit is acknowledged ----------------------------


def _replica_of(make: Callable[..., RedisServer], primary: RedisServer) -> RedisServer:
    replica = make({"replicaof": f"127.0.0.1 {primary.port}", "repl-diskless-sync": "no"})
    deadline = time.monotonic() + 10
    with redis.Redis(port=replica.port) as client:
        while client.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.05)
    return replica


async def test_submit_waits_for_a_replica_when_asked(
    make_redis_server: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    """With ?wait_replicas=1 a submit returns once the replica has the message; a replica
    that stalls makes it wait wait_timeout, then say so (a WARNING)."""
    primary = make_redis_server()
    replica = _replica_of(make_redis_server, primary)
    url = f"{primary.url}?wait_replicas=1&wait_timeout=0.4"
    backend = RedisBackend.from_url(url, namespace=_namespace())
    try:
        for n in range(20):
            await backend.mb_submit(
                "box", "u", f"m{n}", max_pending=100, drop_oldest=False, token="d", lease=5
            )
            queue = backend._process.keys.mailbox_keys("box", "u")[0]
            with redis.Redis(port=replica.port) as client:
                assert client.llen(queue) == n + 1  # on the replica when acknowledged
        replica.pause()
        try:
            started = time.monotonic()
            await backend.mb_submit(
                "box", "u", "late", max_pending=100, drop_oldest=False, token="d", lease=5
            )
            took = time.monotonic() - started
        finally:
            replica.resume()
        assert 0.35 < took < 1.5
        assert any("acknowledged by 0 of 1 replicas" in r.getMessage() for r in caplog.records)
    finally:
        await backend.aclose()


def test_sync_submit_waits_for_a_replica(make_redis_server: Callable[..., RedisServer]) -> None:
    primary = make_redis_server()
    replica = _replica_of(make_redis_server, primary)
    backend = RedisBackend.from_url(f"{primary.url}?wait_replicas=1&wait_timeout=1")
    twin = backend.sync_twin()
    try:
        for n in range(10):
            twin.mb_submit(
                "box", "u", f"m{n}", max_pending=100, drop_oldest=False, token="d", lease=5
            )
            queue = backend._process.keys.mailbox_keys("box", "u")[0]
            with redis.Redis(port=replica.port) as client:
                assert client.llen(queue) == n + 1
    finally:
        twin.close()


def _submit_until_killed(url: str, primary: RedisServer, link: LaggingLink) -> list[str]:
    """Submit from 4 tasks; SIGKILL the primary after 0.3 s; the acknowledged messages."""
    acknowledged: list[str] = []

    async def main() -> None:
        backend = RedisBackend.from_url(url, namespace="loss")

        async def submitter(who: int) -> None:
            n = 0
            while True:
                text = f"{who}-{n}"
                try:
                    await backend.mb_submit(
                        "box",
                        f"u{who}",
                        text,
                        max_pending=10**6,
                        drop_oldest=False,
                        token="d",
                        lease=60,
                    )
                except BackendUnavailable:
                    return
                acknowledged.append(text)
                n += 1

        tasks = [asyncio.ensure_future(submitter(who)) for who in range(4)]
        await asyncio.sleep(0.5)
        link.cut()  # what the replica has not received yet is lost with the primary
        primary.kill()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await backend.aclose()

    asyncio.run(main())
    return acknowledged


class LaggingLink(PumpProxy):
    """A loopback TCP link from a replica to its primary that delays every chunk ``delay``
    seconds each way (a replica that lags); ``cut()`` drops whatever is still on its way."""

    def __init__(self, port: int, delay: float) -> None:
        self.delay = delay
        super().__init__(("127.0.0.1", port))

    def forward(self, data: bytes, upstream: bool, link: dict[str, Any]) -> tuple[bytes, bool]:
        time.sleep(self.delay)
        if self._closed.is_set():
            return b"", False
        return data, True

    def cut(self) -> None:
        self.close()


def _lost_on_failover(make: Callable[..., RedisServer], query: str) -> tuple[int, int]:
    """Submits acknowledged by a primary and missing on its replica (20 ms behind) once the
    primary is killed and the replica promoted; and how many were acknowledged."""
    primary = make()
    link = LaggingLink(primary.port, delay=0.02)
    replica = make({"replicaof": f"127.0.0.1 {link.port}", "repl-diskless-sync": "no"})
    deadline = time.monotonic() + 10
    with redis.Redis(port=replica.port) as client:
        while client.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.05)
    try:
        acknowledged = _submit_until_killed(primary.url + query, primary, link)
    finally:
        link.cut()
    with redis.Redis(port=replica.port) as client:
        client.execute_command("REPLICAOF", "NO", "ONE")  # the failover
        kept: set[str] = set()
        for key in client.scan_iter(match="*"):
            if client.type(key) == b"list":
                kept.update(m.decode() for m in client.lrange(key, 0, -1))
    return len(set(acknowledged) - kept), len(acknowledged)


@pytest.mark.slow
def test_failover_loses_no_acknowledged_submit_with_wait(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    """SIGKILL the primary under a stream of submits, promote its replica: with
    wait_replicas=1 no acknowledged message is missing (without it, some may be)."""
    lost, total = _lost_on_failover(make_redis_server, "?wait_replicas=1&wait_timeout=1")
    without, total_without = _lost_on_failover(make_redis_server, "")
    print(f"lost with WAIT: {lost}/{total}; without: {without}/{total_without}")
    assert total >= 5
    assert lost == 0
    assert without > 0  # the window WAIT closes is real


async def test_diagnose_reports_replication_without_wait(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    """Replicas and neither WAIT nor min-replicas-to-write: a warning; either: ok."""
    primary = make_redis_server()
    _replica_of(make_redis_server, primary)

    async def finding(url: str) -> Any:
        backend = RedisBackend.from_url(url)
        try:
            report = await backend.diagnose()
        finally:
            await backend.aclose()
        return next(f for f in report.findings if f.check == "replication")

    assert (await finding(primary.url)).level == "warning"
    assert (await finding(primary.url + "?wait_replicas=1")).level == "ok"
    with redis.Redis(port=primary.port) as client:
        client.config_set("min-replicas-to-write", 1)
    assert (await finding(primary.url)).level == "ok"
