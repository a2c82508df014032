"""What a backend must do: atomic single-key operations with an owner token.

Policy (waiting with deadlines, renewal, cancellation, re-entrancy, logging)
lives once in the gate; a backend only keeps one line per key and answers
these calls atomically. ``Backend`` is the async face, ``SyncBackend`` its
sync twin with the same method names; one backend object hands out its twin
with :meth:`Backend.sync_twin`, so both see the same keys.

Tokens are random strings, one per request; a token joins a key's line once,
and is granted, renewed, released or leaves that line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "Backend",
    "ClaimResult",
    "DedupBackend",
    "Grant",
    "MailboxBackend",
    "SupersedeBackend",
    "SyncBackend",
    "SyncDedupBackend",
    "SyncSupersedeBackend",
    "Taken",
]


Confirmation = asyncio.Future[bool] | concurrent.futures.Future[bool]
"""How a grant handed over early learns whether the backend confirmed it."""


@dataclass(frozen=True, slots=True)
class Grant:
    """The turn of a key was granted to a token.

    ``fence`` is strictly greater than every earlier grant's fence for the key.
    ``granted_at`` is a lower bound, on this process's ``time.monotonic()``
    clock, of when the lease began; the holder counts its lease from there.
    ``confirmed``: set for a grant handed over inside the process before the
    backend recorded it (an asyncio future for a task, a concurrent one for a
    thread); it resolves to False if the backend refused it (the holder then
    treats the turn as lost), and is cancelled when the answer never came. The
    holder releases only once it has resolved (the turn layer waits for it), so
    that its release cannot reach the backend before the one that granted it.
    """

    fence: int
    granted_at: float
    confirmed: Confirmation | None = None


@runtime_checkable
class Backend(Protocol):
    """The async operations every backend provides."""

    async def join(self, key: str, token: str, lease: float) -> Grant | None:
        """Take the turn if the key is free and has no line; otherwise join the line's end.

        Returns the grant when taken at once, None when queued. A queued token
        must later get its grant from :meth:`wait` or leave with :meth:`leave`.
        """
        ...

    async def try_acquire(self, key: str, token: str, lease: float) -> Grant | None:
        """Take the turn only if the key is free and has no line; never queues."""
        ...

    async def wait(self, key: str, token: str, timeout: float | None) -> Grant | None:
        """Sleep until the queued token is granted the turn (woken by a push).

        Returns None when ``timeout`` passed first, or earlier when the backend
        wants the caller to re-check (the caller calls ``wait`` again). The
        token stays in the line either way.
        """
        ...

    async def renew(self, key: str, token: str, lease: float) -> bool:
        """Extend the holder's lease to ``lease`` seconds from now; False if not the holder."""
        ...

    async def release(self, key: str, token: str, *, fence: int | None = None) -> None:
        """Release the turn if ``token`` holds it, handing it to the next live waiter.

        ``fence``: the holder's fence, given only while its lease is surely alive;
        a backend may then start its own next waiter at once (fence + 1), before
        the release has reached the server, and confirm the grant after.
        """
        ...

    async def leave(self, key: str, token: str) -> Grant | None:
        """Leave the line. If the token was granted meanwhile, return that grant (still held)."""
        ...

    async def is_held(self, key: str, token: str) -> bool:
        """True if ``token`` holds the key's turn with a live lease."""
        ...

    async def is_busy(self, key: str) -> bool:
        """True if the key's turn is held or has a line."""
        ...

    async def footprint(self) -> int:
        """How many per-key entries the backend keeps (0 when every key is idle)."""
        ...

    def sync_twin(self) -> SyncBackend:
        """The sync twin of this backend, sharing its keys."""
        ...

    async def aclose(self) -> None:
        """Release the backend's resources."""
        ...


@runtime_checkable
class SyncBackend(Protocol):
    """The sync twin of :class:`Backend`, for threads and sync workers."""

    def join(self, key: str, token: str, lease: float) -> Grant | None: ...

    def try_acquire(self, key: str, token: str, lease: float) -> Grant | None: ...

    def wait(self, key: str, token: str, timeout: float | None) -> Grant | None: ...

    def renew(self, key: str, token: str, lease: float) -> bool: ...

    def release(self, key: str, token: str, *, fence: int | None = None) -> None:
        """Release (see :meth:`Backend.release`; ``fence`` likewise)."""
        ...

    def leave(self, key: str, token: str) -> Grant | None: ...

    def is_held(self, key: str, token: str) -> bool: ...

    def is_busy(self, key: str) -> bool: ...

    def footprint(self) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What a dedup claim found: ``new`` (the caller now runs it), ``done`` or ``in_progress``.

    ``result`` is the JSON text stored when the first run finished, if any.
    """

    state: Literal["new", "done", "in_progress"]
    result: str | None = None


@runtime_checkable
class DedupBackend(Protocol):
    """Dedup marks: one record per (key, scope, id), kept for the dedup window.

    A mark is *in progress* from a successful claim until ``finish`` (then
    *done* for ``window`` seconds) or ``abandon`` (deleted: a retry may run).
    An in-progress mark is taken over by a new claim when its ``lease`` has
    lapsed, or when the new claim carries a greater ``fence`` (its claimant
    holds the key's turn now, so the old one lost it).
    """

    async def claim(
        self,
        key: str,
        scope: str,
        id: str,
        token: str,
        *,
        fence: int | None,
        lease: float,
        window: float,
    ) -> ClaimResult: ...

    async def finish(
        self, key: str, scope: str, id: str, token: str, result: str | None, *, window: float
    ) -> None: ...

    async def abandon(self, key: str, scope: str, id: str, token: str) -> None: ...


@runtime_checkable
class SyncDedupBackend(Protocol):
    """The sync twin of :class:`DedupBackend`."""

    def claim(
        self,
        key: str,
        scope: str,
        id: str,
        token: str,
        *,
        fence: int | None,
        lease: float,
        window: float,
    ) -> ClaimResult: ...

    def finish(
        self, key: str, scope: str, id: str, token: str, result: str | None, *, window: float
    ) -> None: ...

    def abandon(self, key: str, scope: str, id: str, token: str) -> None: ...


@runtime_checkable
class SupersedeBackend(Protocol):
    """Newest-call-wins across processes (``on_busy="latest"``/``"cancel"``).

    Optional: without it a gate supersedes only calls of its own process (exact
    for ``memory://``, which has no other processes).
    """

    async def supersede(self, key: str, scope: str, *, cancel_running: bool) -> int:
        """Become the newest call of (key, scope); return its generation.

        With ``cancel_running``, ask the running call of (key, scope), in
        whatever process, to cancel itself.
        """
        ...

    async def is_newest(self, key: str, scope: str, generation: int) -> bool:
        """True while no newer call of (key, scope) has superseded ``generation``."""
        ...

    async def start_running(
        self, key: str, scope: str, token: str, on_cancel: Callable[[], None]
    ) -> None:
        """Announce the running call so a newer one can cancel it: ``on_cancel`` is called."""
        ...

    async def stop_running(self, key: str, scope: str, token: str) -> None: ...


@runtime_checkable
class SyncSupersedeBackend(Protocol):
    """The sync twin of :class:`SupersedeBackend` (no running-call cancellation: threads)."""

    def supersede(self, key: str, scope: str, *, cancel_running: bool) -> int: ...

    def is_newest(self, key: str, scope: str, generation: int) -> bool: ...


@dataclass(frozen=True, slots=True)
class Taken:
    """What a drainer's ``mb_take`` got.

    ``messages``: stored message texts, oldest first (redelivered ones first);
    empty means the queue was empty and the drainer role was given up in the
    same atomic step. ``lost_role``: another drainer owns the queue now.
    ``wait``: seconds until the head message may be retried (nothing taken).
    """

    messages: tuple[str, ...] = ()
    lost_role: bool = False
    wait: float = 0.0


@runtime_checkable
class MailboxBackend(Protocol):
    """Durable per-key queues with a drainer role (see ``inturn/_mailbox.py``).

    Per (mailbox name, key): a queue, an in-flight list and a drainer role
    with a lease. Every method is atomic on one key; ``mb_hint``/``mb_hinted``
    keep a separate, idempotent index of keys that may need a sweeper.
    """

    async def mb_submit(
        self,
        name: str,
        key: str,
        message: str,
        *,
        max_pending: int,
        drop_oldest: bool,
        token: str,
        lease: float,
    ) -> tuple[int, int]:
        """Store ``message``; returns (status, dropped).

        status 1: stored and the caller is now the drainer (role taken with
        ``token``); 0: stored, a drainer exists; -1: refused, the queue is full.
        """
        ...

    async def mb_take(
        self, name: str, key: str, token: str, *, limit: int, lease: float, ack: bool
    ) -> Taken:
        """Renew the role, acknowledge what was in flight when ``ack``, then take up to
        ``limit`` messages (or give the role up, atomically, if none is left)."""
        ...

    async def mb_done(self, name: str, key: str, token: str) -> None:
        """Acknowledge everything in flight (it was processed or dead-lettered)."""
        ...

    async def mb_retry(self, name: str, key: str, token: str, messages: list[str]) -> None:
        """Replace the in-flight messages by ``messages`` at the queue's head."""
        ...

    async def mb_claim(self, name: str, key: str, token: str, *, lease: float) -> int:
        """Sweeper: 1 became drainer (in-flight messages go back to the head first);
        0 a live drainer exists; -1 nothing left to drain."""
        ...

    async def mb_renew(self, name: str, key: str, token: str, *, lease: float) -> bool: ...

    async def mb_pending(self, name: str, key: str) -> int: ...

    async def mb_draining(self, name: str, key: str) -> bool: ...

    async def mb_hint(self, name: str, key: str, present: bool) -> None: ...

    async def mb_hinted(self, name: str) -> list[str]: ...

    async def mb_dead(self, name: str, entries: list[str]) -> None: ...

    async def mb_dead_letters(self, name: str, limit: int) -> list[str]: ...
