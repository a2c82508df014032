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

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Backend", "Grant", "SyncBackend"]


@dataclass(frozen=True, slots=True)
class Grant:
    """The turn of a key was granted to a token.

    ``fence`` is strictly greater than every earlier grant's fence for the key.
    ``granted_at`` is a lower bound, on this process's ``time.monotonic()``
    clock, of when the lease began; the holder counts its lease from there.
    """

    fence: int
    granted_at: float


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

    async def release(self, key: str, token: str) -> None:
        """Release the turn if ``token`` holds it, handing it to the next live waiter."""
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

    def release(self, key: str, token: str) -> None: ...

    def leave(self, key: str, token: str) -> Grant | None: ...

    def is_held(self, key: str, token: str) -> bool: ...

    def is_busy(self, key: str) -> bool: ...

    def footprint(self) -> int: ...

    def close(self) -> None: ...
