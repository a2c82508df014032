"""The operators' calls an engine may offer (``inturn release``, ``dead-letters``, ``forget``,
``sweep``): :class:`AdminBackend`, what its calls return, and what engines share for them.

Part of the engine contract (see :mod:`.base`); optional for an engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from inturn._backends.base import BoxState
from inturn._errors import Busy
from inturn._keys import shown

__all__ = ["AdminBackend", "Forgotten", "Released", "SweepReport", "refuse_busy"]


@dataclass(frozen=True, slots=True)
class Released:
    """What a forced release ended (see :meth:`AdminBackend.force_release`).

    ``released`` is False when nobody held the key. ``holder`` and ``fence`` name
    the turn that was ended, ``next_holder`` and ``next_fence`` the waiter it went
    to; each is None where the engine does not know it (PostgreSQL knows holders
    only from its audit table, and hands the lock on inside the server).
    """

    key: str
    released: bool
    holder: str | None = None
    fence: int | None = None
    next_holder: str | None = None
    next_fence: int | None = None


@dataclass(frozen=True, slots=True)
class Forgotten:
    """What :meth:`AdminBackend.forget` deleted for one key: queued and in-flight
    ``messages`` (every mailbox), ``dead_letters``, dedup ``marks`` and other
    ``records`` (drainer roles, supersede state, fence floor, hints, audit rows)."""

    key: str
    messages: int = 0
    dead_letters: int = 0
    marks: int = 0
    records: int = 0

    @property
    def total(self) -> int:
        """Everything deleted."""
        return self.messages + self.dead_letters + self.marks + self.records


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What :meth:`AdminBackend.sweep` cleaned up in one namespace, and what it found stuck.

    ``expired_leases``: turns whose holder's lease had lapsed, handed to the next live
    waiter or freed; ``dead_waiters``: waiters dropped from lines because they stopped
    checking in; ``stale_hints``: sweeper index entries of idle queues; ``expired_marks``:
    dedup marks and supersede records past their window; ``idle_rows``: other state of
    idle keys (lapsed drainer roles of empty queues, audit rows of ended sessions).
    ``undrained``: queues holding messages that no live drainer owns: a process with
    that mailbox's handler resumes them when its sweeper runs.
    """

    namespace: str
    expired_leases: int = 0
    dead_waiters: int = 0
    stale_hints: int = 0
    expired_marks: int = 0
    idle_rows: int = 0
    undrained: tuple[BoxState, ...] = ()

    @property
    def cleaned(self) -> int:
        """Everything dropped (not counting ``undrained``)."""
        return (
            self.expired_leases
            + self.dead_waiters
            + self.stale_hints
            + self.expired_marks
            + self.idle_rows
        )


@runtime_checkable
class AdminBackend(Protocol):
    """Operators' calls, off the hot paths: they may scan a namespace.

    Optional for an engine (``inturn release``, ``dead-letters``, ``forget`` and
    ``sweep`` need it). Dead letters stay opaque texts here: the engine lists,
    counts and removes them; parsing them is the caller's business.
    """

    async def force_release(self, key: str) -> Released:
        """End the key's turn now, whoever holds it: the next live waiter in line is granted
        it with a greater fence (FIFO kept), or the key is freed. The old holder is not
        told at once: its next renewal or check finds the turn lost, and a sink that
        checks fences refuses its writes from then on."""
        ...

    async def dead_mailboxes(self) -> dict[str, int]:
        """Mailbox names that have dead letters, with how many each."""
        ...

    async def mb_dead_remove(self, name: str, entries: list[str]) -> int:
        """Remove these dead letters (exact texts) of mailbox ``name``; returns how many
        were removed (a text not there any more is skipped: safe to repeat)."""
        ...

    async def forget(self, key: str, *, force: bool = False) -> Forgotten:
        """Delete what the engine keeps for ``key`` in this namespace: mailbox queues and
        in-flight messages of every mailbox, drainer roles, dedup marks, supersede state,
        the fence floor, sweeper hints, audit rows. Dead letters are the caller's (they are
        opaque here): see :meth:`mb_dead_remove`.

        Raises :class:`~inturn.Busy` while the key's turn is held or has a line, or a
        drainer works on one of its queues (that work would store new state right after),
        unless ``force``: then the stored state goes at once, a drainer at work finds its
        role gone at its next step, and a held turn is left to end by itself (its holder
        and line are no stored state: they vanish when the turn ends; ``force_release``
        ends it now). Work still running for the key may store new state after.
        """
        ...

    async def sweep(self) -> SweepReport:
        """Drop expired state of the namespace and count queues nobody drains; never runs a
        handler and never takes a drainer role. Safe beside live workers."""
        ...


def refuse_busy(key: str, *, turn: bool, draining: Iterable[str] = ()) -> Busy:
    """The error ``forget`` raises for a key that is at work (``turn``: held or a line;
    ``draining``: mailboxes whose drainer works on the key's queue)."""
    why = []
    if turn:
        why.append("its turn is held or has a line")
    boxes = sorted(set(draining))
    if boxes:
        names = ", ".join(repr(b) for b in boxes)
        why.append(f"a drainer works on its queue in mailbox {names}")
    return Busy(
        f"key {shown(key)!r} is busy ({'; '.join(why)}): that work would store new state "
        "right after; wait until it is idle, or force it",
        key=key,
    )
