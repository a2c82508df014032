"""The ``inturn`` command line (``python -m inturn`` too)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


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
    demo.add_argument("--users", type=_positive, default=40, help="users in the burst")
    demo.add_argument("--messages", type=_positive, default=5, help="messages per user")
    migrate = commands.add_parser(
        "migrate",
        help="create or upgrade inturn's tables in a PostgreSQL database (idempotent)",
        description="Apply inturn's schema migrations to the database a postgresql:// URL names.",
    )
    migrate.add_argument("url", help="postgresql://user@host:port/dbname")
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
        "--jobs", type=_positive, default=3, help="scenarios run at a time (default 3)"
    )
    return parser


def _migrate(url: str) -> int:
    from ._backends.base import SyncMigrating
    from ._errors import InturnError
    from ._gate import Gate

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
        from ._demo import main as demo_main

        return demo_main(args.url, args.users, args.messages)
    if args.command == "migrate":
        return _migrate(args.url)
    if args.command == "torture":
        from ._torture.run import main as torture_main

        return torture_main(args.minutes, args.backend, args.seed, args.jobs)
    raise AssertionError(args.command)  # argparse refuses unknown commands


if __name__ == "__main__":
    sys.exit(main())
