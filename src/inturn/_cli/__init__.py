"""The ``inturn`` command line (``python -m inturn`` too)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from inturn._cli import _ops
from inturn._cli._shell import mask, positive, run, seconds, since

__all__ = ["build_parser", "main", "mask"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inturn",
        description="Each user's work runs in turn: one at a time, in arrival order, once.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="reproduce a bot that answers one user twice (colliding replies) and fix it",
        description="Run a burst of colliding calls without and with inturn; print the overlaps.",
    )
    demo.add_argument("--url", default="memory://", help="backend URL (default: memory://)")
    demo.add_argument("--users", type=positive, default=40, help="users in the burst")
    demo.add_argument("--messages", type=positive, default=5, help="messages per user")
    demo.add_argument(
        "--picture",
        default="",
        metavar="DIR",
        help="folder for the timeline picture (default: the system's temp folder)",
    )
    demo.add_argument("--no-picture", action="store_true", help="write no picture")
    migrate = commands.add_parser(
        "migrate",
        help="create or upgrade inturn's tables in a PostgreSQL database (idempotent)",
        description="Apply inturn's schema migrations to the database a postgresql:// URL names.",
    )
    migrate.add_argument("url", help="postgresql://user@host:port/dbname")

    def server_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--url",
            default=os.environ.get("INTURN_URL", "memory://"),
            help="backend URL (default: $INTURN_URL, else memory://)",
        )
        sub.add_argument("--namespace", default="default", help="the gate's namespace")
        sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        sub.add_argument("--verbose", action="store_true", help="show tracebacks of errors")

    status = commands.add_parser(
        "status",
        help="who holds which key, who waits, mailbox queues and dead letters",
        description="Show the busy keys (holder, fence, lease left, line length), the mailbox "
        "queues and the dead letters of a namespace, or of one KEY.",
    )
    status.add_argument("key", nargs="?", help="one key (a user id) instead of all")
    status.add_argument("--limit", type=positive, default=100, help="at most this many rows")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="refresh in place")
    server_options(status)
    doctor = commands.add_parser(
        "doctor",
        help="check a server: can it keep inturn's guarantees?",
        description="Check the backend's server (version, eviction policy, persistence, "
        "topology, schema, rights). Exits 1 when a guarantee cannot hold.",
    )
    server_options(doctor)
    _ops.add_commands(commands, server_options)
    torture = commands.add_parser(
        "torture",
        help="run the fault scenarios against throwaway servers and print what broke",
        description=(
            "Start throwaway redis-server / PostgreSQL servers on loopback (the binaries must be "
            "installed), run a random mix of fault scenarios for N minutes, print a table; "
            "exit 1 on a violation that must never happen."
        ),
    )
    torture.add_argument("--minutes", type=float, default=2.0, help="how long (default 2)")
    torture.add_argument("--backend", choices=("redis", "postgres", "all"), default="all")
    torture.add_argument("--seed", type=int, default=None, help="seed of the random mix")
    torture.add_argument(
        "--jobs", type=positive, default=3, help="scenarios run at a time (default 3)"
    )
    return parser


def _format_status(snap: Any) -> str:
    lines = [f"namespace {snap.namespace!r}"]
    if snap.keys:
        lines.append(
            f"{'key':24} {'fence':>20} {'lease left':>10} {'since':>8} {'waiting':>7}  holder"
        )
        for k in snap.keys:
            lines.append(
                f"{k.key[:24]:24} {'-' if k.fence is None else k.fence:>20} "
                f"{seconds(k.lease_left):>10} {since(k.held_since):>8} {k.waiting:>7}  "
                f"{(k.holder or '-')[:16]}"
            )
    else:
        lines.append("no busy keys")
    if snap.boxes:
        lines.append(f"{'mailbox':16} {'key':24} {'queued':>7} {'in flight':>9}  draining")
        for b in snap.boxes:
            lines.append(
                f"{b.mailbox[:16]:16} {b.key[:24]:24} {b.queued:>7} {b.in_flight:>9}  "
                f"{'yes' if b.draining else 'no'}"
            )
    else:
        lines.append("no mailbox queues")
    for name, count in sorted(snap.dead_letters.items()):
        lines.append(f"dead letters in {name!r}: {count}")
    if snap.truncated:
        lines.append("(more than shown: raise --limit, or give a KEY)")
    return "\n".join(lines)


async def _status(args: argparse.Namespace) -> int:
    from inturn import Gate

    async with Gate.from_url(args.url, namespace=args.namespace) as gate:
        while True:
            snap = await gate.statistics(args.key, limit=args.limit)
            if args.json:
                print(json.dumps(dataclasses.asdict(snap), default=str))
            else:
                text = _format_status(snap)
                if args.watch:
                    print("\x1b[H\x1b[J" + text, flush=True)  # home, clear: refresh in place
                else:
                    print(text)
            if not args.watch:
                return 0
            await asyncio.sleep(args.watch)


async def _doctor(args: argparse.Namespace) -> int:
    from inturn import Gate

    async with Gate.from_url(args.url, namespace=args.namespace) as gate:
        report = await gate.diagnose()
    if args.json:
        print(json.dumps({**dataclasses.asdict(report), "ok": report.ok}, default=str))
    else:
        version = report.version or "version unknown"
        print(f"{report.backend} at {mask(report.server)}: {version}, {report.topology}")
        for name, value in sorted(report.facts.items()):
            print(f"  {name} = {value}")
        for finding in report.findings:
            print(f"  {finding.level.upper():7} {finding.check}: {finding.message}")
        print("ok: inturn's guarantees can hold" if report.ok else "NOT OK: see the errors above")
    return 0 if report.ok else 1


def _migrate(url: str) -> int:
    from inturn import Gate
    from inturn._backends.base import SyncMigrating
    from inturn._errors import InturnError

    try:
        gate = Gate.from_url(url)
        backend = gate.sync_backend
        if not isinstance(backend, SyncMigrating):
            print(f"inturn migrate: {url.split('://')[0]}:// keeps no schema", file=sys.stderr)
            return 2
        backend.migrate()
        gate.close()
    except InturnError as exc:
        print(f"inturn migrate: {exc}", file=sys.stderr)
        return 1
    print("inturn migrate: schema up to date")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``inturn`` command."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from inturn._demo import main as demo_main

        picture = None if args.no_picture else args.picture
        return demo_main(args.url, args.users, args.messages, picture)
    if args.command == "migrate":
        return _migrate(args.url)
    if args.command == "status":
        return run(lambda: _status(args), args.verbose, "status")
    if args.command == "doctor":
        return run(lambda: _doctor(args), args.verbose, "doctor")
    if args.command in _ops.COMMANDS:
        return _ops.main(args)
    if args.command == "torture":
        from inturn._torture.run import main as torture_main

        return torture_main(args.minutes, args.backend, args.seed, args.jobs)
    raise AssertionError(args.command)  # argparse refuses unknown commands


if __name__ == "__main__":
    sys.exit(main())
