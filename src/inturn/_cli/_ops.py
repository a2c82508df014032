"""The operator's commands: ``sweep``, ``release``, ``dead-letters``, ``forget``.

Each opens the gate that ``--url``/``--namespace`` name, runs one call of
:class:`inturn._admin.Admin` and prints what it did (``--json`` for machines).
What cannot be undone asks first on a terminal (``--yes`` skips the question;
without a terminal ``forget`` and ``purge`` need ``--yes``). memory:// lives
inside the process that uses it: these commands refuse it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import logging
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from inturn._cli._shell import mask, positive, run, since

__all__ = ["COMMANDS", "add_commands", "main"]

COMMANDS = ("sweep", "release", "dead-letters", "forget")

_SHOWN_UNDRAINED = 20
"""How many undrained queues a sweep lists (all are counted)."""


def add_commands(commands: Any, server_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the operator's commands to the ``inturn`` parser."""
    sweep = commands.add_parser(
        "sweep",
        help="drop expired state and count mailbox queues nobody drains",
        description="Housekeeping that needs no handler: lines whose holder's lease lapsed "
        "go on, dead waiters and stale sweeper hints go, expired dedup marks and idle "
        "records go; mailbox queues holding messages that no worker drains are listed.",
    )
    sweep.add_argument(
        "--loop", type=float, metavar="SECONDS", help="sweep again every SECONDS until Ctrl-C"
    )
    server_options(sweep)

    release = commands.add_parser(
        "release",
        help="end a key's turn now, whoever holds it (needs --force)",
        description="End KEY's turn now: the next waiter in line gets it with a greater "
        "fence. The old holder is not stopped: it learns at its next renewal that it lost "
        "the turn, and sinks that check fences refuse its writes from now on.",
    )
    release.add_argument("key", help="the key (a user id)")
    release.add_argument("--force", action="store_true", help="yes, end the turn")
    release.add_argument("--yes", action="store_true", help="do not ask on a terminal")
    server_options(release)

    dead = commands.add_parser(
        "dead-letters",
        help="list, replay or purge the messages a mailbox gave up on",
        description="Dead letters are messages whose handler failed max_attempts times.",
    )
    actions = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("list", "show dead letters (id, mailbox, key, when, attempts, error)"),
        ("replay", "put dead letters back in their key's mailbox queue, in their order"),
        ("purge", "delete dead letters for good"),
    ):
        action = actions.add_parser(name, help=text, description=text[0].upper() + text[1:])
        action.add_argument("--mailbox", metavar="NAME", help="only this mailbox")
        action.add_argument("--key", help="only the letters of this key (a user id)")
        action.add_argument(
            "--id", action="append", default=[], metavar="ID", help="only this letter (again)"
        )
        if name == "list":
            action.add_argument(
                "--limit", type=positive, default=100, help="at most this many per mailbox"
            )
        else:
            action.add_argument("--all", action="store_true", help="every letter selected")
        if name == "purge":
            action.add_argument("--yes", action="store_true", help="do not ask")
        server_options(action)

    forget = commands.add_parser(
        "forget",
        help="delete everything inturn keeps for one key (a user's right to erasure)",
        description="Delete KEY's queued messages (every mailbox), dead letters, dedup "
        "marks, supersede state, fence floor, sweeper hints and audit rows. Refused while "
        "the key is at work (a held turn, a line, a drainer) unless --force.",
    )
    forget.add_argument("key", help="the key (a user id)")
    forget.add_argument("--yes", action="store_true", help="do not ask")
    forget.add_argument(
        "--force", action="store_true", help="even while the key's turn or mailbox is at work"
    )
    server_options(forget)


def main(args: argparse.Namespace) -> int:
    """Run one of :data:`COMMANDS`."""
    command = args.command if args.command != "dead-letters" else f"dead-letters {args.action}"
    if args.url.split("://")[0] == "memory":
        _fail(
            command,
            "memory:// keeps its state inside the process that uses it, out of this "
            "command's reach; point --url (or INTURN_URL) at the Redis or PostgreSQL server "
            "your workers use",
        )
        return 2
    if not logging.getLogger().handlers:  # the WARNING of a forced release, as one line
        logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s")
    calls = {"sweep": _sweep, "release": _release, "dead-letters": _dead, "forget": _forget}
    return run(lambda: calls[args.command](args), args.verbose, command)


def _fail(command: str, message: str) -> None:
    print(f"inturn {command}: {mask(message)}", file=sys.stderr)


def _ask(question: str) -> bool | None:
    """The answer on a terminal (True for y/yes), None without one."""
    if not sys.stdin.isatty():
        return None
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _operator() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _admin(args: argparse.Namespace) -> tuple[Any, Any]:
    from inturn import Gate
    from inturn._admin import Admin

    gate = Gate.from_url(args.url, namespace=args.namespace)
    return gate, Admin(gate.backend)


def _print_json(value: Any) -> None:
    print(json.dumps(value, default=str))


# -- sweep --------------------------------------------------------------------------------


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _format_sweep(report: Any) -> str:
    lines = [f"namespace {report.namespace!r}: swept"]
    for count, what in (
        (report.expired_leases, "lapsed leases ended"),
        (report.dead_waiters, "dead waiters dropped"),
        (report.stale_hints, "stale sweeper hints dropped"),
        (report.expired_marks, "expired dedup marks dropped"),
        (report.idle_rows, "idle records dropped"),
    ):
        lines.append(f"  {what:28} {count:>6}")
    undrained = report.undrained
    if not undrained:
        lines.append("no mailbox queue waits for a drainer")
        return "\n".join(lines)
    verb = "holds" if len(undrained) == 1 else "hold"
    lines.append(
        f"{_plural(len(undrained), 'mailbox queue')} {verb} messages that nobody drains: "
        "start a worker with that mailbox's handler (its sweeper resumes them)"
    )
    lines.append(f"  {'mailbox':16} {'key':24} {'queued':>7} {'in flight':>9}")
    for box in undrained[:_SHOWN_UNDRAINED]:
        lines.append(
            f"  {box.mailbox[:16]:16} {box.key[:24]:24} {box.queued:>7} {box.in_flight:>9}"
        )
    if len(undrained) > _SHOWN_UNDRAINED:
        lines.append(f"  ... and {len(undrained) - _SHOWN_UNDRAINED} more (--json lists all)")
    return "\n".join(lines)


async def _sweep(args: argparse.Namespace) -> int:
    gate, admin = _admin(args)
    async with gate:
        while True:
            report = await admin.sweep()
            if args.json:
                _print_json({**dataclasses.asdict(report), "cleaned": report.cleaned})
            else:
                stamp = f"{time.strftime('%H:%M:%S')} " if args.loop else ""
                print(stamp + _format_sweep(report), flush=True)
            if not args.loop:
                return 0
            await asyncio.sleep(args.loop)


# -- release ------------------------------------------------------------------------------


async def _release(args: argparse.Namespace) -> int:
    if not args.force:
        _fail(
            "release",
            f"refusing to end the turn of key {args.key!r} without --force: its holder keeps "
            "running until its next renewal, beside the next waiter (sinks that check fences "
            "refuse its writes; others do not). Run again with --force",
        )
        return 2
    question = f"End the turn of key {args.key!r} (namespace {args.namespace!r}, {args.url})?"
    if not args.yes and _ask(mask(question)) is False:
        print("inturn release: nothing done")
        return 1
    gate, admin = _admin(args)
    async with gate:
        done = await admin.release(args.key, by=f"{_operator()} (inturn release)")
    if args.json:
        _print_json(dataclasses.asdict(done))
    elif not done.released:
        print(f"key {done.key!r} was not held: nothing released")
    else:
        fence = "unknown" if done.fence is None else done.fence
        print(
            f"ended the turn of key {done.key!r}: holder {done.holder or 'unknown'}, fence {fence}"
        )
        if done.next_holder is not None or done.next_fence is not None:
            print(f"the turn went to {done.next_holder or 'a waiter'}, fence {done.next_fence}")
        else:
            print("the next waiter in line, if any, has it now")
    return 0


# -- dead letters -------------------------------------------------------------------------


def _format_letters(letters: list[Any]) -> str:
    if not letters:
        return "no dead letters"
    lines = [f"{'id':12}  {'mailbox':16} {'key':20} {'failed at':>9} {'tries':>5}  error"]
    for x in letters:
        lines.append(
            f"{x.id:12}  {x.mailbox[:16]:16} {(x.key or '?')[:20]:20} {since(x.failed_at):>9} "
            f"{'?' if x.attempts is None else x.attempts:>5}  {(x.error or '?')[:60]}"
        )
    lines.append(
        f"{_plural(len(letters), 'dead letter')}; replay: inturn dead-letters replay --id ID "
        "(or --key, --mailbox, --all)"
    )
    return "\n".join(lines)


async def _dead(args: argparse.Namespace) -> int:
    chosen = args.action == "list" or args.all or args.id or args.key or args.mailbox
    if not chosen:
        _fail(
            f"dead-letters {args.action}",
            "say which letters: --id ID, --key KEY, --mailbox NAME, or --all",
        )
        return 2
    if args.action == "purge" and not args.yes:
        answer = _ask("Delete the selected dead letters for good?")
        if answer is None:
            _fail("dead-letters purge", "without a terminal, confirm with --yes")
            return 2
        if not answer:
            print("inturn dead-letters purge: nothing done")
            return 1
    gate, admin = _admin(args)
    async with gate:
        limit = args.limit if args.action == "list" else None
        options: dict[str, Any] = {"mailbox": args.mailbox, "key": args.key, "ids": set(args.id)}
        letters = await admin.letters(**options, **({"limit": limit} if limit else {}))
        if args.action == "list":
            if args.json:
                _print_json([x.shown() for x in letters])
            else:
                print(_format_letters(letters))
            return 0
        if args.action == "replay":
            replayed = await admin.replay(letters)
            if args.json:
                _print_json([x.shown() for x in replayed])
            else:
                print(
                    f"replayed {_plural(len(replayed), 'dead letter')}: a worker with the "
                    "mailbox's handler takes them at its next drain or sweep"
                )
                skipped = len(letters) - len(replayed)
                if skipped:
                    print(f"{skipped} left as they were (unreadable, or replayed meanwhile)")
            return 0
        removed = await admin.purge(letters)
        if args.json:
            _print_json({"purged": removed})
        else:
            print(f"purged {_plural(removed, 'dead letter')}")
        return 0


# -- forget -------------------------------------------------------------------------------


async def _forget(args: argparse.Namespace) -> int:
    from inturn._errors import Busy

    if not args.yes:
        answer = _ask(
            mask(
                f"Delete everything kept for key {args.key!r} (namespace {args.namespace!r}, "
                f"{args.url})? This cannot be undone."
            )
        )
        if answer is None:
            _fail("forget", "without a terminal, confirm with --yes")
            return 2
        if not answer:
            print("inturn forget: nothing done")
            return 1
    gate, admin = _admin(args)
    async with gate:
        try:
            done = await admin.forget(args.key, force=args.force)
        except Busy as exc:
            _fail("forget", f"{str(exc).removesuffix(', or force it')}, or pass --force")
            return 1
    if args.json:
        _print_json({**dataclasses.asdict(done), "total": done.total})
    else:
        print(
            f"forgot key {done.key!r} in namespace {args.namespace!r}: "
            f"{_plural(done.messages, 'message')}, {_plural(done.dead_letters, 'dead letter')}, "
            f"{_plural(done.marks, 'dedup mark')}, {_plural(done.records, 'other record')}"
        )
    return 0
