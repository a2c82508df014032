"""The harness itself: the proxy's modes, the sink's fencing, the checker's counts, the CLI."""

from __future__ import annotations

import contextlib
import errno
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from inturn._cli import main
from inturn._torture import run as torture_run
from inturn._torture import servers
from inturn._torture.checker import check
from inturn._torture.proxy import FaultProxy
from inturn._torture.sink import FencedSink
from inturn._torture.worker import Recorder
from inturn.testing import History


@pytest.fixture
def echo_port() -> object:
    server = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the proxy resets some on purpose
            while data := conn.recv(1024):
                seen.append(data)
                conn.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1], seen
    server.close()


def _ask(port: int, data: bytes, timeout: float = 0.5) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(data)
            return sock.recv(1024)
    except OSError:  # timed out, or reset
        return b"<none>"


def test_proxy_modes_per_tag(echo_port: tuple[int, list[bytes]]) -> None:
    port, seen = echo_port
    with FaultProxy(port) as proxy:
        a, b = proxy.port_for("a"), proxy.port_for("b")
        assert _ask(a, b"x") == b"x"
        proxy.set_mode("blackhole", tag="a")
        assert _ask(a, b"held", timeout=0.3) == b"<none>"
        assert _ask(b, b"y") == b"y"  # the other tag is not partitioned
        proxy.set_mode("pass", tag="a")
        proxy.drop_reply_once("b")
        assert _ask(b, b"ran") in (b"", b"<none>")  # the server ran it, the client never heard
        assert b"ran" in seen
        assert proxy.dropped_replies == 1
        assert _ask(b, b"z") == b"z"  # once only
        proxy.set_mode("reset")
        assert _ask(a, b"r") in (b"", b"<none>")


def test_sink_refuses_lower_fences_and_checker_counts(tmp_path: Path) -> None:
    sink = FencedSink(tmp_path / "s.db")
    assert sink.write("k", 5, "w1")
    assert not sink.write("k", 4, "w2")
    assert sink.write("k", 5, "w1", msg="m1")
    assert sink.write("k", 6, "w2", msg="m1")
    sink.close()
    span = {"t": "span", "key": "k", "asked": 0.0, "joined": 0.0, "worker": "w"}
    records = [
        {**span, "fence": 4, "start": 0.0, "end": 2.0, "lost": True, "refused": False},
        {**span, "fence": 5, "start": 1.0, "end": 3.0, "lost": False, "refused": False},
        {**span, "fence": 6, "start": 2.5, "end": 4.0, "lost": False, "refused": False},
        {"t": "submitted", "id": "m1", "worker": "w"},
        {"t": "submitted", "id": "m2", "worker": "w"},
        {"t": "handled", "id": "m1", "worker": "w"},
    ]
    report = check(records, tmp_path / "s.db")
    assert (report.overlaps, report.overlaps_reported, report.silent) == (2, 1, 1)
    assert (report.stale_accepted, report.refused_writes) == (0, 1)
    assert (report.lost_messages, report.duplicate_effects) == (1, 1)


def test_cli_says_which_binaries_are_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torture_run.shutil, "which", lambda name: None)
    assert main(["torture", "--minutes", "0.01", "--backend", "redis"]) == 2
    assert "missing: redis-server, redis-cli" in capsys.readouterr().err


def test_worker_spans_load_as_a_history(tmp_path: Path) -> None:
    recorder = Recorder(str(tmp_path / "w.jsonl"), "w")
    fields = {"key": "k", "fence": 1, "asked": 0.0, "joined": 0.1, "start": 0.2, "end": 0.3}
    recorder.write("span", **fields, lost=False, refused=False, task=0)
    recorder.write("error", key="k", type="TurnTimeout", message="")
    recorder.close()
    (span,) = History.load(tmp_path / "w.history")
    assert (span.key, span.fence, span.worker) == ("k", 1, "w-t0")


def test_spawn_starts_again_after_an_error_that_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    real = subprocess.Popen
    failures = [errno.EFAULT, errno.EAGAIN]
    calls: list[list[str]] = []

    def flaky(args: list[str], **options: object) -> subprocess.Popen[bytes]:
        calls.append(args)
        if failures:
            raise OSError(failures.pop(0), "fails this time only")
        return real(args, **options)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(subprocess, "Popen", flaky)
    proc = servers.spawn(["true"], stdout=subprocess.DEVNULL)
    assert proc.wait(timeout=10) == 0
    assert len(calls) == 3

    failures[:] = [errno.EFAULT] * 3
    with pytest.raises(OSError, match="fails this time only"):
        servers.spawn(["true"])
    assert failures == []  # three tries in all, then the error

    failures[:] = [errno.ENOENT, errno.EFAULT]
    with pytest.raises(FileNotFoundError):
        servers.spawn(["true"])
    assert failures == [errno.EFAULT]  # a lasting error is not retried
