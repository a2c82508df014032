"""The operator's commands of ``inturn``: what they do, say, ask, refuse and mask.

Called as ``inturn._cli.main([...])`` in a thread (each runs its own event loop,
as the installed command does) and once as ``python -m inturn`` in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

import inturn
from inturn._cli import main
from tests.ops.test_engine_ops import dead_letters, store


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


def ns() -> str:
    return f"cli{secrets.token_hex(4)}"


async def test_release_without_force_refuses_and_says_why(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --force: exit 2, the holder keeps its turn, the message names the risk and the fix."""
    space = ns()
    gate = inturn.Gate.from_url(redis_url, namespace=space)
    async with gate, gate.turn("user-1") as turn:
        assert await cli("release", "user-1", "--url", redis_url, "--namespace", space) == 2
        assert await turn.check()
    err = capsys.readouterr().err
    assert "--force" in err
    assert "fence" in err
    assert "Traceback" not in err


async def test_release_force_hands_the_turn_over_and_logs_it(
    redis_url: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """--force --yes: the waiter gets the turn with a greater fence; the output and a WARNING
    name the key, the old fence and who ran it."""
    space = ns()
    async with (
        inturn.Gate.from_url(redis_url, namespace=space) as holder,
        inturn.Gate.from_url(redis_url, namespace=space) as waiter,
    ):

        async def wait() -> int:
            async with waiter.turn("user-1", timeout=30) as turn:
                return turn.fence

        async with holder.turn("user-1") as old:
            line = asyncio.ensure_future(wait())
            await asyncio.sleep(0.2)
            with caplog.at_level("WARNING", logger="inturn"):
                argv = ["release", "user-1", "--force", "--yes", "--url", redis_url]
                assert await cli(*argv, "--namespace", space) == 0
            fence = await asyncio.wait_for(line, 10)
            assert fence > old.fence
            assert not await old.check()
    out = capsys.readouterr().out
    assert "'user-1'" in out
    assert str(old.fence) in out
    assert str(fence) in out
    warning = next(r.getMessage() for r in caplog.records if "forced release" in r.getMessage())
    assert "'user-1'" in warning
    assert str(old.fence) in warning
    assert "(inturn release)" in warning
    assert "@" in warning


async def test_release_asks_on_a_terminal(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a terminal the command asks first; "n" leaves the turn alone (exit 1)."""
    space = ns()
    questions: list[str] = []
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda q: questions.append(q) or "n")
    url = redis_url.replace("redis://", "redis://:s3cret@") if "@" not in redis_url else redis_url
    gate = inturn.Gate.from_url(redis_url, namespace=space)
    async with gate, gate.turn("user-1") as turn:
        argv = ["release", "user-1", "--force", "--url", url, "--namespace", space]
        assert await cli(*argv) == 1
        assert await turn.check()
    assert len(questions) == 1
    assert "'user-1'" in questions[0]
    assert "s3cret" not in questions[0]
    assert "nothing done" in capsys.readouterr().out


async def test_dead_letters_list_replay_and_purge(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """On PostgreSQL: list (text and --json), replay one by id, purge the rest with --all."""
    space = ns()
    base = ["--url", postgres_dsn, "--namespace", space]
    async with inturn.Gate.from_url(postgres_dsn, namespace=space) as gate:
        await dead_letters(gate, "replies", ["alice", "bob", "carol"])
        assert await cli("dead-letters", "list", *base) == 0
        text = capsys.readouterr().out
        assert await cli("dead-letters", "list", "--key", "alice", "--json", *base) == 0
        (alice,) = json.loads(capsys.readouterr().out)
        assert await cli("dead-letters", "replay", *base) == 2  # nothing chosen: refused
        assert "--all" in capsys.readouterr().err
        assert await cli("dead-letters", "replay", "--id", alice["id"], *base) == 0
        assert "replayed 1 dead letter" in capsys.readouterr().out
        assert await gate.backend.mb_pending("replies", "alice") == 1  # type: ignore[attr-defined]
        assert await cli("dead-letters", "purge", "--all", *base) == 2  # no terminal, no --yes
        assert await cli("dead-letters", "purge", "--all", "--yes", "--json", *base) == 0
        assert json.loads(capsys.readouterr().out) == {"purged": 2}
        assert await cli("dead-letters", "list", "--json", *base) == 0
        assert json.loads(capsys.readouterr().out) == []
    assert "3 dead letters" in text
    assert "ValueError: cannot answer bob" in text
    assert alice["key"] == "alice"
    assert alice["message_id"] == "alice-1"
    assert alice["attempts"] == 1


async def test_forget_refuses_a_busy_key_then_erases_it(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A held key: exit 1 naming --force; idle: --yes deletes its messages, letters, marks."""
    space = ns()
    base = ["--url", postgres_dsn, "--namespace", space, "--yes"]
    async with inturn.Gate.from_url(postgres_dsn, namespace=space) as gate:
        await store(gate, "replies", "alice", "hello")
        await dead_letters(gate, "failing", ["alice"])
        await asyncio.sleep(0.05)
        async with gate.turn("alice"):
            assert await cli("forget", "alice", *base) == 1
            err = capsys.readouterr().err
        assert await cli("forget", "alice", "--json", *base) == 0
        done = json.loads(capsys.readouterr().out)
        assert await cli("forget", "alice", *base) == 0
        again = capsys.readouterr().out
    assert "busy" in err
    assert "--force" in err
    assert done["messages"] == 1
    assert done["dead_letters"] == 1
    assert done["total"] >= 2
    assert "0 messages, 0 dead letters" in again


async def test_sweep_reports_queues_nobody_drains(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A queue without a drainer is listed with the advice to start a worker; --json too."""
    space = ns()
    async with inturn.Gate.from_url(redis_url, namespace=space) as gate:
        await store(gate, "digest", "user-9", 1)
        await asyncio.sleep(0.05)
        assert await cli("sweep", "--url", redis_url, "--namespace", space) == 0
        text = capsys.readouterr().out
        assert await cli("sweep", "--url", redis_url, "--namespace", space, "--json") == 0
        report = json.loads(capsys.readouterr().out)
    assert "start a worker" in text
    assert "user-9" in text
    assert report["undrained"] == [
        {"mailbox": "digest", "key": "user-9", "queued": 1, "in_flight": 0, "draining": False}
    ]
    assert report["cleaned"] == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["sweep"],
        ["release", "k", "--force", "--yes"],
        ["dead-letters", "list"],
        ["forget", "k", "--yes"],
    ],
)
async def test_memory_is_out_of_reach(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """memory:// lives in its own process: each command refuses it with the way out."""
    assert await cli(*argv, "--url", "memory://") == 2
    err = capsys.readouterr().err
    assert "memory://" in err
    assert "--url" in err
    assert "Traceback" not in err


async def test_errors_are_one_line_with_the_password_masked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unreachable server: exit 1, one line, no password, no traceback."""
    url = "redis://me:hunter2@127.0.0.1:1/0"
    assert await cli("dead-letters", "list", "--url", url) == 1
    err = capsys.readouterr().err
    assert "hunter2" not in err
    assert "Traceback" not in err
    assert err.count("\n") == 1


def test_python_m_inturn_sweeps_in_a_loop_until_interrupted(redis_url: str) -> None:
    """``python -m inturn sweep --loop``: a report per round, Ctrl-C ends it (exit 130)."""
    space = ns()

    async def leave_a_queue() -> None:
        async with inturn.Gate.from_url(redis_url, namespace=space) as gate:
            await store(gate, "digest", "user-9", 1)

    asyncio.run(leave_a_queue())
    env = {**os.environ, "INTURN_URL": redis_url}
    argv = [sys.executable, "-m", "inturn", "sweep", "--loop", "0.2", "--namespace", space]
    lines: list[str] = []
    rounds = threading.Event()
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if sum("swept" in x for x in lines) >= 2:
                    rounds.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            assert rounds.wait(30), "".join(lines)
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(10)
        reader.join(5)
        stderr: Any = proc.stderr.read() if proc.stderr else ""
    assert code == 130, stderr
    assert "Traceback" not in stderr
    assert any("user-9" in x for x in lines)
    stamp = lines[0].split()[0]
    assert time.strptime(stamp, "%H:%M:%S")


async def test_release_without_the_right_to_end_a_session_says_how(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """PostgreSQL: a role that may not end the holder's session gets one line naming the
    fix (pg_signal_backend), and the holder keeps its turn; a refused DELETE is one line."""
    import psycopg

    space, role = ns(), f"op_{secrets.token_hex(4)}"
    gate = inturn.Gate.from_url(postgres_dsn, namespace=space)
    async with gate, gate.turn("user-1") as turn:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {role} LOGIN")
            conn.execute(f"GRANT USAGE ON SCHEMA inturn TO {role}")
            conn.execute(f"GRANT SELECT, UPDATE ON ALL TABLES IN SCHEMA inturn TO {role}")
        url = postgres_dsn.replace("postgres@", f"{role}@", 1)
        try:
            argv = ["release", "user-1", "--force", "--yes", "--url", url, "--namespace", space]
            assert await cli(*argv) == 1
            assert await turn.check()
            refused = capsys.readouterr().err
            argv = ["forget", "user-2", "--yes", "--url", url, "--namespace", space]
            assert await cli(*argv) == 1  # no DELETE right: the server's words, one line
        finally:
            with psycopg.connect(postgres_dsn, autocommit=True) as conn:
                conn.execute(f"DROP OWNED BY {role}")
                conn.execute(f"DROP ROLE {role}")
    assert "pg_signal_backend" in refused, refused
    assert "superuser" in refused, refused
    assert refused.count("\n") == 1
    err = capsys.readouterr().err
    assert "InsufficientPrivilege: permission denied" in err, err
    assert err.count("\n") == 1
    assert "Traceback" not in refused + err
