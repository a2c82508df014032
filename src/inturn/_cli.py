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
        help="reproduce the seed's bug (colliding send_ai_response calls) and fix it",
        description="Run a burst of colliding calls without and with inturn; print the overlaps.",
    )
    demo.add_argument("--url", default="memory://", help="backend URL (default: memory://)")
    demo.add_argument("--users", type=_positive, default=40, help="users in the burst")
    demo.add_argument("--messages", type=_positive, default=5, help="messages per user")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``inturn`` command."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from ._demo import main as demo_main

        return demo_main(args.url, args.users, args.messages)
    raise AssertionError(args.command)  # argparse refuses unknown commands


if __name__ == "__main__":
    sys.exit(main())
