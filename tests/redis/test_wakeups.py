"""The wake-up channel read without redis-py's Pub/Sub: the push parser on any split of the
bytes, and a connection dropped in the middle of a push (the waiter re-checks and is granted).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions

import inturn
from inturn._backends.redis._pushes import PushReader, SyncWakeups, Wakeups, command
from inturn._backends.redis._shared import RECHECK_MAX
from tests.redis._proxy import PumpProxy


def _namespace() -> str:
    return f"w{secrets.token_hex(4)}"


def _push(channel: bytes, data: bytes, *, resp3: bool = False) -> bytes:
    head = b">3\r\n" if resp3 else b"*3\r\n"
    return head + b"$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel),
        channel,
        len(data),
        data,
    )


SUBSCRIBED = b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
STREAM = (
    SUBSCRIBED
    + _push(b"ch", b"tok-1|7")
    + _push(b"ch", b"cancel|abc")
    + _push(b"ch", b"")
    + _push(b"ch", b"t\r\n|9", resp3=True)  # CRLF inside a bulk string
)
PUSHES = [
    [b"subscribe", b"ch", 1],
    [b"message", b"ch", b"tok-1|7"],
    [b"message", b"ch", b"cancel|abc"],
    [b"message", b"ch", b""],
    [b"message", b"ch", b"t\r\n|9"],
]


def test_several_pushes_in_one_read() -> None:
    assert PushReader().feed(STREAM) == PUSHES


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13, 64])
def test_pushes_split_across_reads(size: int) -> None:
    reader = PushReader()
    got: list[Any] = []
    for at in range(0, len(STREAM), size):
        got += reader.feed(STREAM[at : at + size])
    assert got == PUSHES


def test_every_cut_of_a_push_waits_for_the_rest() -> None:
    push = _push(b"chan", b"token|12")
    for cut in range(1, len(push)):
        reader = PushReader()
        assert reader.feed(push[:cut]) == [], cut
        assert reader.feed(push[cut:]) == [[b"message", b"chan", b"token|12"]], cut


def test_an_error_reply_and_garbage() -> None:
    items = PushReader().feed(b"-NOPERM no access\r\n" + SUBSCRIBED)
    assert isinstance(items[0], redis.exceptions.ResponseError)
    assert "NOPERM" in str(items[0])
    assert items[1] == PUSHES[0]
    with pytest.raises(redis.exceptions.InvalidResponse):
        PushReader().feed(b"?what\r\n")
    with pytest.raises(redis.exceptions.InvalidResponse):
        PushReader().feed(b"*x\r\n")


def test_command_is_resp() -> None:
    assert command("SUBSCRIBE", "a.b") == b"*2\r\n$9\r\nSUBSCRIBE\r\n$3\r\na.b\r\n"


async def test_protocol_wakes_on_each_push_and_confirms_once() -> None:
    seen: list[Any] = []
    wakeups = Wakeups(seen.append)
    for at in range(0, len(STREAM), 11):
        wakeups.data_received(STREAM[at : at + 11])
    assert wakeups.subscribed.done()
    assert wakeups.subscribed.result() is None
    assert seen == PUSHES[1:]
    assert not wakeups.lost.done()
    wakeups.connection_lost(None)
    assert isinstance(wakeups.lost.result(), redis.exceptions.ConnectionError)


async def test_protocol_fails_on_an_error_reply_before_the_confirmation() -> None:
    wakeups = Wakeups(lambda push: None)
    wakeups.data_received(b"-NOPERM this user has no permissions\r\n")
    refused = wakeups.subscribed.result()
    assert isinstance(refused, redis.exceptions.ResponseError)
    assert wakeups.lost.result() is refused


# -- a connection dropped in the middle of a push -----------------------------------------


class _CutMidPush(PumpProxy):
    """A TCP proxy to Redis that, once, forwards half of the first push it sees towards the
    client (a "message" on a subscribed connection) and then drops that connection."""

    def __init__(self, url: str) -> None:
        host_port = url.split("//", 1)[1].split("/", 1)[0]
        host, port = host_port.rsplit(":", 1)
        self.cut = threading.Event()
        super().__init__((host, int(port)))
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def forward(self, data: bytes, upstream: bool, link: dict[str, Any]) -> tuple[bytes, bool]:
        at = data.find(b"$7\r\nmessage\r\n")
        if not upstream and at >= 0 and not self.cut.is_set():
            self.cut.set()
            return data[: at + 12], False  # "*3\r\n$7\r\nmessa": the rest never comes
        return data, True


@pytest.fixture
def cutter(redis_url: str) -> Iterator[_CutMidPush]:
    proxy = _CutMidPush(redis_url)
    yield proxy
    proxy.close()


BOUND = RECHECK_MAX - 0.3
"""The waiter must get its turn from the re-check after the reconnect, before the periodic
re-check (every RECHECK_MAX seconds with the default lease) would have found it."""


async def test_async_waiter_is_granted_after_a_push_cut_in_half(
    redis_url: str, cutter: _CutMidPush
) -> None:
    namespace = _namespace()
    holder = inturn.Gate.from_url(redis_url, namespace=namespace)
    waiter = inturn.Gate.from_url(cutter.url, namespace=namespace)
    try:
        async with waiter.turn("warm"):  # subscribed through the proxy
            pass
        entered = asyncio.Event()
        async with holder.turn("k"):

            async def wait() -> None:
                async with waiter.turn("k", timeout=30):
                    entered.set()

            task = asyncio.ensure_future(wait())
            for _ in range(1000):  # until its JOIN's reply is in: the release then pushes
                if _queued(waiter):
                    break
                await asyncio.sleep(0.01)
            released = time.monotonic()
        async with asyncio.timeout(10):
            await entered.wait()
        took = time.monotonic() - released
        await task
        assert cutter.cut.is_set(), "the push was not cut"
        print(f"async waiter granted {took:.3f}s after the release, its push cut in half")
        assert took < BOUND, f"granted only after {took:.2f}s"
    finally:
        await waiter.aclose()
        await holder.aclose()


def _queued(gate: inturn.Gate) -> bool:
    """A waiter of the gate is in line (its JOIN's reply came back)."""
    states = gate.backend._states.values()  # type: ignore[attr-defined]
    return any(w.next_check > 0 for state in states for w in state.waiters.values())


def test_sync_waiter_is_granted_after_a_push_cut_in_half(
    redis_url: str, cutter: _CutMidPush
) -> None:
    namespace = _namespace()
    holder = inturn.Gate.from_url(redis_url, namespace=namespace)
    waiter = inturn.Gate.from_url(cutter.url, namespace=namespace)
    entered = threading.Event()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            with waiter.turn_sync("k", timeout=30):
                entered.set()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait, daemon=True)
    try:
        with waiter.turn_sync("warm"):  # subscribed through the proxy
            pass
        twin: Any = waiter.backend.sync_twin()  # type: ignore[attr-defined]
        with holder.turn_sync("k"):
            thread.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until its JOIN's reply is in
                if any(w.next_check > 0 for w in list(twin._line.waiters.values())):
                    break
                time.sleep(0.01)
            released = time.monotonic()
        assert entered.wait(10), errors
        took = time.monotonic() - released
        thread.join(10)
        assert not errors, errors
        assert cutter.cut.is_set(), "the push was not cut"
        print(f"sync waiter granted {took:.3f}s after the release, its push cut in half")
        assert took < BOUND, f"granted only after {took:.2f}s"
    finally:
        waiter.close()
        holder.close()


# -- each transport: RESP3 framing (">"), TLS, a unix socket ---------------------------------


@pytest.fixture(params=["resp3", "tls", "unix", "cluster", "sentinel"])
def transport_url(
    request: pytest.FixtureRequest, redis_url: str, make_redis_server: Any, tmp_path: Path
) -> str:
    """A URL whose wake-up connection reads its pushes over one transport or topology (on a
    Cluster: a PUBLISH on the key's node reaches the listener subscribed on some node)."""
    if request.param == "resp3":  # pushes framed as RESP3 pushes
        return redis_url + ("&" if "?" in redis_url else "?") + "protocol=3"
    if request.param == "sentinel":  # the connection goes to the master Sentinel names
        sentinel_url: str = request.getfixturevalue("redis_sentinel").url
        return sentinel_url
    if request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in cluster.startup_nodes)
    if request.param == "tls":
        url: str = make_redis_server(tls=True).url
        return url
    sock = tmp_path / "redis.sock"
    make_redis_server({"unixsocket": str(sock), "unixsocketperm": "700"})
    return f"unix://{sock}?db=0"


async def test_async_hand_off_over_each_transport(transport_url: str) -> None:
    namespace = _namespace()
    holder = inturn.Gate.from_url(transport_url, namespace=namespace)
    waiter = inturn.Gate.from_url(transport_url, namespace=namespace)
    try:
        async with waiter.turn("warm"):
            pass
        entered = asyncio.Event()
        async with holder.turn("k"):

            async def wait() -> None:
                async with waiter.turn("k", timeout=30):
                    entered.set()

            task = asyncio.ensure_future(wait())
            for _ in range(1000):
                if _queued(waiter):
                    break
                await asyncio.sleep(0.01)
            released = time.monotonic()
        async with asyncio.timeout(10):
            await entered.wait()
        took = time.monotonic() - released
        await task
        assert took < BOUND, f"granted only after {took:.2f}s: the push was not read"
    finally:
        await waiter.aclose()
        await holder.aclose()


def test_sync_hand_off_over_each_transport(transport_url: str) -> None:
    namespace = _namespace()
    holder = inturn.Gate.from_url(transport_url, namespace=namespace)
    waiter = inturn.Gate.from_url(transport_url, namespace=namespace)
    entered = threading.Event()

    def wait() -> None:
        with waiter.turn_sync("k", timeout=30):
            entered.set()

    thread = threading.Thread(target=wait, daemon=True)
    try:
        with waiter.turn_sync("warm"):
            pass
        twin: Any = waiter.backend.sync_twin()  # type: ignore[attr-defined]
        with holder.turn_sync("k"):
            thread.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if any(w.next_check > 0 for w in list(twin._line.waiters.values())):
                    break
                time.sleep(0.01)
            released = time.monotonic()
        assert entered.wait(10)
        took = time.monotonic() - released
        thread.join(10)
        assert took < BOUND, f"granted only after {took:.2f}s: the push was not read"
    finally:
        waiter.close()
        holder.close()


# -- the sync reader on a socket ------------------------------------------------------------


class _Conn:
    """What SyncWakeups takes from a connected redis-py connection: its socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def disconnect(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


def test_sync_reader_keeps_a_push_read_with_the_confirmation() -> None:
    ours, server = socket.socketpair()
    try:
        wakeups = SyncWakeups(_Conn(ours))
        server.sendall(SUBSCRIBED + _push(b"ch", b"tok|3") + _push(b"ch", b"x|4")[:9])
        reading = threading.Thread(target=wakeups.subscribe, args=("ch", 5.0))
        reading.start()
        assert server.recv(100) == command("SUBSCRIBE", "ch")
        reading.join(5)
        assert not reading.is_alive()
        server.sendall(_push(b"ch", b"x|4")[9:])
        got: list[Any] = []
        for _ in range(20):  # bounded: a lost push must fail the test, not hang it
            got += wakeups.pushes(0.25)
            if len(got) >= 2:
                break
        assert got == [[b"message", b"ch", b"tok|3"], [b"message", b"ch", b"x|4"]]
        assert wakeups.pushes(0.05) == []  # nothing more: an idle read times out
        server.sendall(_push(b"ch", b"late|5") + SUBSCRIBED + _push(b"ch", b"y|6"))
        time.sleep(0.05)
        assert wakeups.pushes(5.0) == [[b"message", b"ch", b"late|5"], [b"message", b"ch", b"y|6"]]
    finally:
        server.close()
        ours.close()


def test_sync_reader_fails_when_the_connection_drops_mid_push() -> None:
    ours, server = socket.socketpair()
    try:
        wakeups = SyncWakeups(_Conn(ours))
        server.sendall(SUBSCRIBED)
        wakeups.subscribe("ch", 5.0)
        assert server.recv(100) == command("SUBSCRIBE", "ch")
        server.sendall(_push(b"ch", b"tok|3")[:15])
        server.close()
        with pytest.raises(redis.exceptions.ConnectionError):
            wakeups.pushes(5.0)
    finally:
        ours.close()


def test_sync_reader_close_wakes_a_blocked_read() -> None:
    ours, server = socket.socketpair()
    try:
        wakeups = SyncWakeups(_Conn(ours))
        server.sendall(SUBSCRIBED)
        wakeups.subscribe("ch", 5.0)
        errors: list[BaseException] = []

        def read() -> None:
            try:
                wakeups.pushes(30.0)
            except BaseException as exc:
                errors.append(exc)

        reading = threading.Thread(target=read)
        reading.start()
        time.sleep(0.1)
        started = time.monotonic()
        wakeups.close()
        reading.join(5)
        assert not reading.is_alive()
        assert time.monotonic() - started < 2
        assert errors, "the read ended without an error"
    finally:
        server.close()
