"""Dedup windows: a message id is processed at most once within its window.

    dedup = gate.dedup("replies", window=300)
    async with dedup.claim(user_id, update.update_id) as claim:
        reply = await answer(...)
        claim.result = reply          # optional: stored (JSON) for duplicates to return

Each (namespace, scope, user key, id) has one mark, so one user can never
suppress another user's message by reusing its id. A claim raises
:class:`~inturn.Duplicate` when the id is *done* (with the stored result, if
any) or *in progress* elsewhere. A run that raises abandons its claim (a retry
may run); a claimant that died is replaced once its claim's lease lapses, or
at once by a claimant holding the key's turn with a greater fence. A live
claimant renews its claim every third of the lease, so a run longer than the
lease (a slow LLM call) keeps duplicates out; if the claim is taken over all
the same, ``claim.lost`` is set and a WARNING says its result is not recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from types import TracebackType

from ._backends.base import ClaimResult, DedupBackend, SyncDedupBackend
from ._errors import BackendUnavailable, ConfigurationError, Duplicate
from ._keys import new_token, normalize_key, shown
from ._runtime import Runtime, renewal_pool
from ._timers import TimerHandle

__all__ = ["DEFAULT_WINDOW", "MAX_RESULT_BYTES", "Claim", "Deduplicator", "content_id"]

logger = logging.getLogger("inturn")

DEFAULT_WINDOW = 300.0
"""Seconds a processed id stays remembered (5 minutes, like SQS FIFO)."""

MAX_RESULT_BYTES = 64 * 1024
"""Results larger than this (as JSON) are not stored; duplicates then raise Duplicate."""

_NO_RESULT = object()


def content_id(*parts: object) -> str:
    """A dedup id from content (a SHA-256 of the parts): same parts, same id.

    Prefer the platform's own ids (Telegram's ``update_id``/``message_id``):
    two different messages with the same text are not duplicates.
    """
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def encode_result(value: object) -> str | None:
    """The JSON text to store for ``value``, or None when it would not come back equal."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None
    if len(text.encode()) > MAX_RESULT_BYTES or json.loads(text) != value:
        return None
    return text


class Claim:
    """A claimed message id; set :attr:`result` to store it for duplicates."""

    __slots__ = ("fence", "id", "key", "lost", "result", "scope")

    def __init__(self, key: str, scope: str, id: str, fence: int | None) -> None:
        self.key = key
        self.scope = scope
        self.id = id
        self.fence = fence
        self.result: object = _NO_RESULT
        """The value duplicates get back (JSON-serialisable, at most 64 KiB); unset: none."""
        self.lost = False
        """True once a renewal found the claim taken over (its lease lapsed, or a newer turn
        claimed the id): this run's result will not be recorded."""


def _duplicate(key: str, scope: str, id: str, found: ClaimResult) -> Duplicate:
    if found.state == "done":
        has = found.result is not None
        return Duplicate(
            f"message {id!r} of key {key!r} ({scope}) was already processed",
            key=key,
            id=id,
            state="done",
            result=json.loads(found.result) if found.result is not None else None,
            has_result=has,
        )
    return Duplicate(
        f"message {id!r} of key {key!r} ({scope}) is being processed elsewhere",
        key=key,
        id=id,
        state="in_progress",
    )


class Deduplicator:
    """Claims message ids for one scope (a function or mailbox name). See module docs."""

    def __init__(self, runtime: Runtime, scope: str, *, window: float = DEFAULT_WINDOW) -> None:
        if not isinstance(scope, str) or not scope:
            raise ConfigurationError("a dedup scope must be a non-empty str")
        if isinstance(window, bool) or not isinstance(window, int | float):
            raise ConfigurationError(f"window must be seconds, not {window!r}")
        if not (0 < window < math.inf):
            raise ConfigurationError(f"window must be positive and finite, not {window!r}")
        self._runtime = runtime
        self.scope = scope
        self.window = float(window)

    def _store(self) -> DedupBackend:
        backend = self._runtime.backend
        if not isinstance(backend, DedupBackend):
            raise ConfigurationError(f"{type(backend).__name__} does not keep dedup marks")
        return backend

    def _sync_store(self) -> SyncDedupBackend:
        backend = self._runtime.sync_backend
        if not isinstance(backend, SyncDedupBackend):
            raise ConfigurationError(f"{type(backend).__name__} does not keep dedup marks")
        return backend

    def claim(
        self, key: str | int, id: str | int, *, fence: int | None = None, lease: float | None = None
    ) -> ClaimRequest:
        """``async with`` this to process message ``id`` of ``key`` at most once.

        ``fence``: the fence of the key's turn the caller holds, if any (a
        newer turn takes over a stale in-progress claim at once). ``lease``:
        how long an in-progress claim blocks duplicates if its claimant dies
        (default: the gate's lease).
        """
        return ClaimRequest(self, normalize_key(key), normalize_key(id), fence, lease)

    def claim_sync(
        self, key: str | int, id: str | int, *, fence: int | None = None, lease: float | None = None
    ) -> SyncClaimRequest:
        """The thread twin of :meth:`claim`."""
        return SyncClaimRequest(self, normalize_key(key), normalize_key(id), fence, lease)


class _ClaimBase:
    __slots__ = ("_claim", "_lease", "_owner", "_renewal", "_renewing", "_token", "_until")

    def __init__(
        self, owner: Deduplicator, key: str, id: str, fence: int | None, lease: float | None
    ) -> None:
        self._owner = owner
        self._token = new_token()
        self._lease = owner._runtime.settings.lease if lease is None else lease
        self._claim = Claim(key, owner.scope, id, fence)
        self._renewal: asyncio.TimerHandle | TimerHandle | None = None
        self._renewing: asyncio.Task[None] | None = None
        self._until = 0.0
        """When the claim's lease ends (monotonic), as of its last claim or renewal sent."""

    def _renewed(self, found: ClaimResult, sent: float) -> bool:
        """Record a renewal's answer; False once the claim is no longer ours."""
        if found.state == "new":
            self._until = sent + self._lease
            return True
        c = self._claim
        c.lost = True
        logger.warning(
            "inturn: the claim of message %r of key %r (%s) was taken over while it ran: "
            "its result will not be recorded",
            c.id,
            shown(c.key),
            c.scope,
            extra={"inturn_key": shown(c.key)},
        )
        return False

    def _found(self, found: ClaimResult, sent: float) -> Claim:
        self._until = sent + self._lease
        if found.state != "new":
            c = self._claim
            self._owner._runtime.metrics.count("dedup_duplicates", scope=c.scope)
            raise _duplicate(c.key, c.scope, c.id, found)
        return self._claim

    def _outcome(self, exc: BaseException | None) -> tuple[bool, str | None]:
        """(finished?, result text): an exception abandons the claim."""
        if exc is not None:
            return False, None
        result = self._claim.result
        return True, None if result is _NO_RESULT else encode_result(result)

    def _again(self, exc: BackendUnavailable, tries: int) -> float:
        """Seconds to wait before sending a failed finish again; raise ``exc`` past the lease.

        The handler ran: a finish that failed on a transient error (a failover, a
        dropped connection) is sent again while the claim is ours, rather than
        leaving the id in progress and the message to be run twice. FINISH is safe
        to run twice (a second run finds the id done and changes nothing).
        """
        pause = min(0.5, 0.05 * float(2**tries))
        if time.monotonic() + pause >= self._until:
            raise exc
        return pause


class ClaimRequest(_ClaimBase):
    """``async with dedup.claim(key, id) as claim`` (see :meth:`Deduplicator.claim`)."""

    __slots__ = ()

    async def __aenter__(self) -> Claim:
        sent = time.monotonic()
        claim = self._found(await self._ask(), sent)
        self._schedule()
        return claim

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._renewal = loop.call_later(self._lease / 3, self._due)

    def _due(self) -> None:
        self._renewing = asyncio.ensure_future(self._keep())

    async def _ask(self) -> ClaimResult:
        c, o = self._claim, self._owner
        return await o._store().claim(
            c.key, c.scope, c.id, self._token, fence=c.fence, lease=self._lease, window=o.window
        )

    async def _keep(self) -> None:
        """Renew the claim (the same token claims again); every third of its lease."""
        sent = time.monotonic()
        try:
            found = await asyncio.wait_for(self._ask(), self._lease / 3)
        except Exception as exc:  # a transport error: try again next time
            logger.debug("inturn: renewing a dedup claim failed: %r", exc)
        else:
            if not self._renewed(found, sent):
                return
        if self._renewal is not None:
            self._schedule()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        renewal, self._renewal = self._renewal, None
        if renewal is not None:
            renewal.cancel()
        if self._renewing is not None:
            self._renewing.cancel()
        c, store = self._claim, self._owner._store()
        finished, text = self._outcome(exc)
        if finished:
            tries = 0
            while True:
                try:
                    await store.finish(
                        c.key, c.scope, c.id, self._token, text, window=self._owner.window
                    )
                    break
                except BackendUnavailable as exc:
                    await asyncio.sleep(self._again(exc, tries))
                    tries += 1
        else:
            await store.abandon(c.key, c.scope, c.id, self._token)


class SyncClaimRequest(_ClaimBase):
    """``with dedup.claim_sync(key, id) as claim`` (see :meth:`Deduplicator.claim_sync`)."""

    __slots__ = ()

    def __enter__(self) -> Claim:
        sent = time.monotonic()
        claim = self._found(self._ask(), sent)
        self._schedule()
        return claim

    def _ask(self) -> ClaimResult:
        c, o = self._claim, self._owner
        return o._sync_store().claim(
            c.key, c.scope, c.id, self._token, fence=c.fence, lease=self._lease, window=o.window
        )

    def _schedule(self) -> None:
        timers = self._owner._runtime.timers
        self._renewal = timers.call_at(time.monotonic() + self._lease / 3, self._due)

    def _due(self) -> None:
        """On the timer thread: renew in a worker, so a stuck server holds up nobody else."""
        if self._renewal is not None:
            renewal_pool().submit(self._keep)

    def _keep(self) -> None:
        sent = time.monotonic()
        try:
            found = self._ask()
        except Exception as exc:  # a transport error: try again next time
            logger.debug("inturn: renewing a dedup claim failed: %r", exc)
        else:
            if not self._renewed(found, sent):
                return
        if self._renewal is not None:
            self._schedule()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        renewal, self._renewal = self._renewal, None
        if isinstance(renewal, TimerHandle):
            renewal.cancel()
        c, store = self._claim, self._owner._sync_store()
        finished, text = self._outcome(exc)
        if finished:
            tries = 0
            while True:
                try:
                    store.finish(c.key, c.scope, c.id, self._token, text, window=self._owner.window)
                    break
                except BackendUnavailable as exc:
                    time.sleep(self._again(exc, tries))
                    tries += 1
        else:
            store.abandon(c.key, c.scope, c.id, self._token)
