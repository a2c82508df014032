"""What a backend must do: atomic single-key operations with an owner token.

Policy (waiting with deadlines, renewal, cancellation, re-entrancy, logging)
lives once in the gate; a backend only keeps one line per key and answers
these calls atomically. ``Backend`` is the async face, ``SyncBackend`` its
sync twin with the same method names; one backend object hands out its twin
with :meth:`Backend.sync_twin`, so both see the same keys.

Tokens are random strings, one per request; a token joins a key's line once,
and is granted, renewed, released or leaves that line.

Every operation an engine may offer is declared here, the fast paths too
(``mb_submit(take=...)``, ``mb_release_take``, ``never_blocks``, ``migrate``),
so a third-party engine knows the whole contract; the contract suite in
``tests/contract`` checks it against every engine, async and sync. The operators'
calls (forced release, dead letters, forget, sweep) are declared beside it, in
:mod:`inturn._backends.admin`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "Backend",
    "BoxState",
    "ClaimResult",
    "DedupBackend",
    "Diagnostics",
    "Finding",
    "Grant",
    "KeyState",
    "MailboxBackend",
    "Migrating",
    "ResumeStatus",
    "Statistics",
    "SubmitStatus",
    "Submitted",
    "SupersedeBackend",
    "SyncBackend",
    "SyncDedupBackend",
    "SyncMailboxBackend",
    "SyncMigrating",
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


@dataclass(frozen=True, slots=True)
class KeyState:
    """One busy key's turn, as the engine sees it now.

    ``holder`` is the holding request's token (its prefix names the process),
    ``fence`` its fence, ``lease_left`` the seconds until its lease lapses
    unless renewed, ``held_since`` when it was granted (epoch seconds); each is
    None where the engine does not know it (no holder, or not recorded).
    ``waiting`` is the length of the key's line.
    """

    key: str
    holder: str | None = None
    fence: int | None = None
    lease_left: float | None = None
    held_since: float | None = None
    waiting: int = 0


@dataclass(frozen=True, slots=True)
class BoxState:
    """One key's queue in one mailbox: ``queued`` messages wait, ``in_flight`` are taken
    and not yet acknowledged, ``draining`` says whether a live drainer owns it."""

    mailbox: str
    key: str
    queued: int = 0
    in_flight: int = 0
    draining: bool = False


@dataclass(frozen=True, slots=True)
class Statistics:
    """A snapshot of what an engine keeps for one namespace (see ``Gate.statistics``).

    ``keys``: busy keys (held or with a line); ``boxes``: mailbox queues that
    are not empty or have a drainer; ``dead_letters``: count per mailbox name.
    ``truncated`` is True when more keys or boxes exist than were listed.
    """

    namespace: str
    keys: tuple[KeyState, ...] = ()
    boxes: tuple[BoxState, ...] = ()
    dead_letters: Mapping[str, int] = field(default_factory=dict)
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class Finding:
    """One checked fact about a server: ``level`` ``"ok"``, ``"warning"`` (a guarantee is
    weaker than it could be) or ``"error"`` (a guarantee cannot hold); ``check`` names
    it (``"eviction_policy"``); ``message`` is one line, with the fix where there is one."""

    level: Literal["ok", "warning", "error"]
    check: str
    message: str


@dataclass(frozen=True, slots=True)
class Diagnostics:
    """What an engine found out about its server (see ``Gate.diagnose``): facts only.

    ``backend`` is the engine's name, ``server`` where it connects (credentials
    masked), ``version`` the server's version, ``topology`` e.g.
    ``"standalone"``, ``"cluster"``, ``"sentinel"`` or ``"in-process"``;
    ``facts`` holds the raw settings read (``maxmemory-policy``,
    ``appendonly``, ...); ``findings`` each checked fact.
    """

    backend: str
    server: str
    version: str | None = None
    topology: str = "standalone"
    facts: Mapping[str, str] = field(default_factory=dict)
    findings: tuple[Finding, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no finding is an error (warnings allowed)."""
        return all(f.level != "error" for f in self.findings)


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

    async def statistics(self, key: str | None = None, *, limit: int = 1000) -> Statistics:
        """A snapshot of busy keys, mailbox queues and dead letters (one ``key``, or at most
        ``limit`` keys and boxes). For operators: it may scan, so keep it off hot paths."""
        ...

    async def diagnose(self) -> Diagnostics:
        """Check the server: reachable, version, settings that weaken a guarantee."""
        ...

    def sync_twin(self) -> SyncBackend:
        """The sync twin of this backend, sharing its keys."""
        ...

    async def aclose(self) -> None:
        """Release the backend's resources."""
        ...


@runtime_checkable
class SyncBackend(Protocol):
    """The sync twin of :class:`Backend`, for threads and sync workers.

    Each method does what its namesake in :class:`Backend` does, blocking the
    calling thread instead of awaiting.
    """

    never_blocks: bool
    """True when no call but ``wait`` can block (an in-process engine): the turn layer
    then calls it directly instead of bounding it in a worker thread."""

    def join(self, key: str, token: str, lease: float) -> Grant | None:
        """See :meth:`Backend.join`."""
        ...

    def try_acquire(self, key: str, token: str, lease: float) -> Grant | None:
        """See :meth:`Backend.try_acquire`."""
        ...

    def wait(self, key: str, token: str, timeout: float | None) -> Grant | None:
        """See :meth:`Backend.wait`."""
        ...

    def renew(self, key: str, token: str, lease: float) -> bool:
        """See :meth:`Backend.renew`."""
        ...

    def release(self, key: str, token: str, *, fence: int | None = None) -> None:
        """Release (see :meth:`Backend.release`; ``fence`` likewise)."""
        ...

    def leave(self, key: str, token: str) -> Grant | None:
        """See :meth:`Backend.leave`."""
        ...

    def is_held(self, key: str, token: str) -> bool:
        """See :meth:`Backend.is_held`."""
        ...

    def is_busy(self, key: str) -> bool:
        """See :meth:`Backend.is_busy`."""
        ...

    def footprint(self) -> int:
        """See :meth:`Backend.footprint`."""
        ...

    def close(self) -> None:
        """Release the twin's resources (threads, connections)."""
        ...


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


class SubmitStatus(enum.IntEnum):
    """What :meth:`MailboxBackend.mb_submit` did with a message."""

    REFUSED = -1
    """Not stored: the queue holds ``max_pending`` messages (and ``drop_oldest`` is off)."""
    QUEUED = 0
    """Stored; a live drainer owns the queue and will take it."""
    DRAINER = 1
    """Stored, and the caller now owns the drainer role (with the token it passed)."""


class ResumeStatus(enum.IntEnum):
    """What a sweeper's :meth:`MailboxBackend.mb_resume` found."""

    IDLE = -1
    """Nothing left to drain (the key can leave the sweeper's index)."""
    LIVE = 0
    """A live drainer owns the queue."""
    RESUMED = 1
    """The caller now owns the drainer role; in-flight messages went back to the head."""


@dataclass(frozen=True, slots=True)
class Taken:
    """What a drainer's take got.

    ``messages``: stored message texts, oldest first (redelivered ones first);
    empty means the queue was empty and the drainer role was given up in the
    same atomic step. ``lost_role``: another drainer owns the queue now.
    ``retry_in``: seconds until the head may be retried (nothing was taken):
    the ``not_before`` of the last :meth:`MailboxBackend.mb_retry` lies ahead.
    ``turn``: the key's turn, granted in the same atomic step to the token the
    caller named in its ``turn`` argument; None when not asked for, not granted,
    or the engine has no such fast path (the drainer then joins the line).
    """

    messages: tuple[str, ...] = ()
    lost_role: bool = False
    retry_in: float = 0.0
    turn: Grant | None = None


@dataclass(frozen=True, slots=True)
class Submitted:
    """What :meth:`MailboxBackend.mb_submit` did: ``status``, how many old messages it
    ``dropped`` (``drop_oldest``), and ``first``: the drainer's first take, when the
    caller became the drainer and asked for it (``take > 0``) and the engine does
    submit-and-take in one step (None otherwise: the caller then takes)."""

    status: SubmitStatus
    dropped: int = 0
    first: Taken | None = None


@runtime_checkable
class MailboxBackend(Protocol):
    """Durable per-key queues with a drainer role (see ``inturn/_mailbox.py``).

    Per (mailbox name, key): a queue, an in-flight list, a drainer role with a
    lease, and a *not-before* time for the head (set by a retry's backoff).
    Every method is atomic on one key; ``mb_hint``/``mb_hinted`` keep a
    separate, idempotent index of keys that may need a sweeper. Message texts
    are opaque to the engine: it never parses them.

    An engine may declare ``ordered_submits = True`` (an attribute or property) when
    one event loop's concurrent ``mb_submit`` calls always reach its store in call
    order; otherwise the mailbox waits for a key's earlier submit before sending the
    next one, so a key's messages are queued in the order they were submitted.
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
        take: int = 0,
        turn: tuple[str, float] | None = None,
    ) -> Submitted:
        """Store ``message`` at the queue's tail; take the drainer role if nobody has it.

        With ``take > 0``, a caller that becomes the drainer may also get its first
        take (up to ``take`` messages, as :meth:`mb_take` with ``ack=False``) in
        the same atomic step, as ``Submitted.first``. An engine without that fast
        path returns ``first=None``.

        ``turn`` (a token and its lease, with ``take > 0``): when that take got
        messages and the key's turn is free (no holder, nobody in line), the engine
        may grant the turn to this token in the same step (``first.turn``). The
        caller releases a granted turn it does not use.
        """
        ...

    async def mb_take(
        self,
        name: str,
        key: str,
        token: str,
        *,
        limit: int,
        lease: float,
        ack: bool,
        turn: tuple[str, float] | None = None,
    ) -> Taken:
        """Renew the role, acknowledge what was in flight when ``ack``, then take up to
        ``limit`` messages (or give the role up, atomically, if none is left).

        Redelivered (in-flight) messages come first; nothing is taken while the
        head's not-before time lies ahead (``Taken.retry_in``). ``turn``: as for
        :meth:`mb_submit`, the key's turn for this token when it is free."""
        ...

    async def mb_release_take(
        self,
        name: str,
        key: str,
        token: str,
        turn_token: str,
        *,
        limit: int,
        lease: float,
        ack: bool,
        turn: tuple[str, float] | None = None,
    ) -> Taken:
        """Release the key's turn held by ``turn_token`` (handing it to the next waiter)
        and do :meth:`mb_take`, in one step where the engine can (in two otherwise:
        the take first, so the next waiter never sees the batch unacknowledged).

        ``turn`` (the drainer's next turn: a token and its lease): when messages were
        taken, ``turn_token`` still held the turn and nobody waits in the key's line,
        the engine may grant the turn to this token instead of freeing it, with a new
        fence (``Taken.turn``): the same as a release followed at once by that token's
        join. Anyone in line goes first, as always."""
        ...

    async def mb_done(self, name: str, key: str, token: str) -> None:
        """Acknowledge everything in flight (it was processed or dead-lettered)."""
        ...

    async def mb_retry(
        self, name: str, key: str, token: str, messages: list[str], *, not_before: float
    ) -> None:
        """Replace the in-flight messages by ``messages`` at the queue's head; nothing is
        taken before ``not_before`` (epoch seconds, ``time.time()``)."""
        ...

    async def mb_resume(self, name: str, key: str, token: str, *, lease: float) -> ResumeStatus:
        """Sweeper: take the role of a queue whose drainer died (see :class:`ResumeStatus`)."""
        ...

    async def mb_renew(self, name: str, key: str, token: str, *, lease: float) -> bool:
        """Extend the drainer role's lease; False if ``token`` no longer owns it."""
        ...

    async def mb_pending(self, name: str, key: str) -> int:
        """Messages waiting in the queue (not those in flight)."""
        ...

    async def mb_draining(self, name: str, key: str) -> bool:
        """True while a live drainer owns the queue."""
        ...

    async def mb_hint(self, name: str, key: str, present: bool) -> None:
        """Add ``key`` to (or remove it from) the sweeper's index of ``name``."""
        ...

    async def mb_hinted(self, name: str) -> list[str]:
        """The keys of the sweeper's index of ``name``."""
        ...

    async def mb_dead(self, name: str, entries: list[str]) -> None:
        """Append dead letters (opaque texts) to the mailbox's dead-letter list."""
        ...

    async def mb_dead_letters(self, name: str, limit: int) -> list[str]:
        """The oldest ``limit`` dead letters of the mailbox."""
        ...


@runtime_checkable
class SyncMailboxBackend(Protocol):
    """The sync twin of :class:`MailboxBackend` (same names, same semantics)."""

    def mb_submit(
        self,
        name: str,
        key: str,
        message: str,
        *,
        max_pending: int,
        drop_oldest: bool,
        token: str,
        lease: float,
        take: int = 0,
        turn: tuple[str, float] | None = None,
    ) -> Submitted: ...

    def mb_take(
        self,
        name: str,
        key: str,
        token: str,
        *,
        limit: int,
        lease: float,
        ack: bool,
        turn: tuple[str, float] | None = None,
    ) -> Taken: ...

    def mb_release_take(
        self,
        name: str,
        key: str,
        token: str,
        turn_token: str,
        *,
        limit: int,
        lease: float,
        ack: bool,
        turn: tuple[str, float] | None = None,
    ) -> Taken: ...

    def mb_done(self, name: str, key: str, token: str) -> None: ...

    def mb_retry(
        self, name: str, key: str, token: str, messages: list[str], *, not_before: float
    ) -> None: ...

    def mb_resume(self, name: str, key: str, token: str, *, lease: float) -> ResumeStatus: ...

    def mb_renew(self, name: str, key: str, token: str, *, lease: float) -> bool: ...

    def mb_pending(self, name: str, key: str) -> int: ...

    def mb_draining(self, name: str, key: str) -> bool: ...

    def mb_hint(self, name: str, key: str, present: bool) -> None: ...

    def mb_hinted(self, name: str) -> list[str]: ...

    def mb_dead(self, name: str, entries: list[str]) -> None: ...

    def mb_dead_letters(self, name: str, limit: int) -> list[str]: ...


@runtime_checkable
class Migrating(Protocol):
    """An engine with a schema to create or upgrade (``inturn migrate URL``)."""

    async def migrate(self) -> None:
        """Create or upgrade the engine's schema; idempotent."""
        ...


@runtime_checkable
class SyncMigrating(Protocol):
    """The sync twin of :class:`Migrating`."""

    def migrate(self) -> None: ...
