"""The gate: one object per application that hands out turns of keys."""

from __future__ import annotations

import asyncio
import importlib
import itertools
import threading
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from ._backends.base import Backend, SyncBackend
from ._dedup import DEFAULT_WINDOW, Deduplicator
from ._errors import ConfigurationError
from ._keys import normalize_key
from ._mailbox import Handler, Mailbox
from ._metrics import InProcessMetrics, MetricsSink
from ._policy import (
    OnLost,
    check_lease,
    check_max_hold,
    check_on_lost,
    check_timeout,
)
from ._serialize import OnBusy, Serializer, _Registry
from ._timers import TimerThread
from ._turn import (
    CLEANUP_TIMEOUT,
    SyncTurnRequest,
    TurnRequest,
    TurnSettings,
    _log_cleanup_failure,
)

__all__ = ["SCHEMES", "Gate"]

SCHEMES: dict[str, str] = {
    "memory": "inturn._backends.memory",
    "redis": "inturn._backends.redis",
    "rediss": "inturn._backends.redis",
    "unix": "inturn._backends.redis",
    "redis+sentinel": "inturn._backends.redis",
    "redis+cluster": "inturn._backends.redis",
    "postgresql": "inturn._backends.postgres",
    "postgres": "inturn._backends.postgres",
}
"""URL scheme -> module with a ``from_url(url, *, namespace)`` factory, loaded on first use."""

_gate_ids = itertools.count(1)
_timers = TimerThread()


class Gate:
    """Hands out turns: for one key, one holder at a time, in the order they asked.

    A gate wraps one backend (``memory://`` by default) and serves coroutines
    and threads alike: ``gate.turn(key)`` / ``gate.turn_nowait(key)`` for
    ``async with``, ``gate.turn_sync(key)`` / ``gate.turn_nowait_sync(key)`` for
    ``with``. The same key from both sides shares one line.

    ``lease`` (seconds) is how long a holder keeps the turn without renewing;
    renewal runs in the background while the body runs. ``max_hold`` (seconds,
    default None) stops renewal so a hung body cannot hold a key forever.
    ``on_lost`` says what a lost lease does to the body: ``"warn"`` (default:
    ``turn.lost`` is set, a WARNING is logged, the body runs on and leaving
    the block does not raise) or ``"cancel"`` (the body is cancelled and the
    block raises :class:`~inturn.LeaseLost`).
    """

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        sync_backend: SyncBackend | None = None,
        lease: float = 30.0,
        max_hold: float | None = None,
        on_lost: OnLost = "warn",
        metrics: MetricsSink | None = None,
    ) -> None:
        if backend is None:
            from ._backends.memory import MemoryBackend

            backend = MemoryBackend()
        if not isinstance(backend, Backend):
            raise ConfigurationError(f"{backend!r} does not provide the inturn Backend protocol")
        self.backend: Backend = backend
        """The async backend."""
        self._sync_backend = sync_backend
        self._twin_lock = threading.Lock()
        self.metrics: MetricsSink = InProcessMetrics() if metrics is None else metrics
        """Where this gate reports counts and timings (see ``inturn._metrics``)."""
        self._settings = TurnSettings(
            lease=check_lease(lease),
            max_hold=check_max_hold(max_hold),
            on_lost=check_on_lost(on_lost),
        )
        self.id = next(_gate_ids)
        """A number unique to this gate in this process."""
        self._background: set[asyncio.Future[Any]] = set()
        self._registry = _Registry()
        self._mailboxes: dict[str, Mailbox] = {}
        self._timers = _timers

    @classmethod
    def from_url(
        cls,
        url: str = "memory://",
        *,
        namespace: str = "default",
        lease: float = 30.0,
        max_hold: float | None = None,
        on_lost: OnLost = "warn",
        metrics: MetricsSink | None = None,
    ) -> Gate:
        """Build a gate on the backend that ``url`` names.

        Accepted schemes are the keys of :data:`SCHEMES`; an unknown scheme or a
        malformed URL raises :class:`~inturn.ConfigurationError` naming them.
        ``namespace`` separates independent applications on one server.
        """
        if not isinstance(url, str):
            raise ConfigurationError(f"url must be a str, not {type(url).__name__}")
        scheme = urllib.parse.urlsplit(url).scheme.lower() if "://" in url else ""
        if scheme not in SCHEMES:
            accepted = ", ".join(f"{name}://" for name in sorted(SCHEMES))
            raise ConfigurationError(
                f"unsupported backend URL {url!r}: accepted schemes are {accepted}"
            )
        if not isinstance(namespace, str) or not namespace:
            raise ConfigurationError("namespace must be a non-empty str")
        module = importlib.import_module(SCHEMES[scheme])
        backend = module.from_url(url, namespace=namespace)
        return cls(backend, lease=lease, max_hold=max_hold, on_lost=on_lost, metrics=metrics)

    def _granted(self, waited: float) -> None:
        self.metrics.count("turns_granted")
        self.metrics.observe("turn_wait_seconds", waited)

    @property
    def lease(self) -> float:
        """The default lease (seconds) of this gate's turns."""
        return self._settings.lease

    def dedup(self, scope: str, *, window: float = DEFAULT_WINDOW) -> Deduplicator:
        """Claims of message ids for ``scope`` (a function or mailbox name), kept ``window`` s.

        See :class:`~inturn.Deduplicator`; ``@gate.serialize(dedup=...)`` uses it for you.
        """
        return Deduplicator(self, scope, window=window)

    def mailbox(self, name: str, *, handler: Handler, **options: Any) -> Mailbox:
        """A durable per-key queue that drains itself: see :class:`~inturn.Mailbox`.

        ``options``: ``batch``, ``max_batch``, ``max_pending``, ``overflow``,
        ``max_payload_bytes``, ``drain``, ``debounce``, ``debounce_max``,
        ``max_attempts``, ``backoff``, ``dedup_window``. One name per gate.
        """
        if name in self._mailboxes:
            raise ConfigurationError(f"this gate already has a mailbox named {name!r}")
        box = Mailbox(self, name, handler, **options)
        self._mailboxes[name] = box
        return box

    async def _mailbox_draining(self, key: str) -> bool:
        """True if any of this gate's mailboxes is draining ``key`` (for ``on_busy="skip"``)."""
        for box in self._mailboxes.values():
            if await box.is_draining(key):
                return True
        return False

    def serialize(
        self,
        *,
        key: str | Callable[..., object],
        dedup: str | Callable[..., object] | None = None,
        on_busy: OnBusy = "wait",
        timeout: float | None = None,
        window: float = DEFAULT_WINDOW,
        name: str | None = None,
    ) -> Serializer:
        """Decorate an ``async def`` or a ``def`` so its calls run in turn per key.

        ``key``/``dedup`` name a parameter or take a callable of the call's
        arguments. ``on_busy``: ``"wait"`` (FIFO), ``"skip"`` (raise
        ``Skipped``), ``"latest"`` (older waiting calls raise ``Superseded``) or
        ``"cancel"`` (also cancel the running call; async only). ``name``
        scopes dedup ids (default: the function's qualified name). A
        ``fence`` parameter the caller leaves out gets the turn's fence.
        See ``docs/serialize.md``.
        """
        return Serializer(
            self,
            key=key,
            dedup=dedup,
            on_busy=on_busy,
            timeout=check_timeout(timeout),
            window=window,
            name=name,
        )

    @property
    def sync_backend(self) -> SyncBackend:
        """The sync twin of :attr:`backend` (made on first use)."""
        if self._sync_backend is None:
            with self._twin_lock:  # threads may race to their first turn_sync
                if self._sync_backend is None:
                    self._sync_backend = self.backend.sync_twin()
        return self._sync_backend

    def _settings_for(
        self, lease: float | None, max_hold: float | None, on_lost: OnLost | None
    ) -> TurnSettings:
        base = self._settings
        if lease is None and max_hold is None and on_lost is None:
            return base
        return TurnSettings(
            lease=base.lease if lease is None else check_lease(lease),
            max_hold=base.max_hold if max_hold is None else check_max_hold(max_hold),
            on_lost=base.on_lost if on_lost is None else check_on_lost(on_lost),
        )

    def turn(
        self,
        key: str | int,
        *,
        timeout: float | None = None,
        lease: float | None = None,
        max_hold: float | None = None,
        on_lost: OnLost | None = None,
    ) -> TurnRequest:
        """Wait in line for ``key``'s turn: ``async with gate.turn(key) as turn: ...``.

        FIFO: requests for one key are granted in the order they joined the
        line, and a release hands the turn straight to the next one. With
        ``timeout`` (seconds) the request leaves the line and raises
        :class:`~inturn.TurnTimeout` when it has not been granted in time; a
        cancelled request leaves the line too. A task that already holds the
        key's turn gets the same turn back (re-entrant per task).
        ``lease``, ``max_hold`` and ``on_lost`` override the gate's defaults.
        """
        settings = self._settings_for(lease, max_hold, on_lost)
        return TurnRequest(
            self,
            normalize_key(key),
            timeout=check_timeout(timeout),
            nowait=False,
            settings=settings,
        )

    def turn_nowait(
        self,
        key: str | int,
        *,
        lease: float | None = None,
        max_hold: float | None = None,
        on_lost: OnLost | None = None,
    ) -> TurnRequest:
        """Take ``key``'s turn only if it is free and nobody waits, else raise ``Busy``."""
        settings = self._settings_for(lease, max_hold, on_lost)
        return TurnRequest(self, normalize_key(key), timeout=None, nowait=True, settings=settings)

    def turn_sync(
        self,
        key: str | int,
        *,
        timeout: float | None = None,
        lease: float | None = None,
        max_hold: float | None = None,
        on_lost: OnLost | None = None,
    ) -> SyncTurnRequest:
        """The thread twin of :meth:`turn`: ``with gate.turn_sync(key) as turn: ...``.

        Same line, same guarantees; it blocks the calling thread while it
        waits. Renewal runs in a shared background thread. With
        ``on_lost="cancel"`` the block raises :class:`~inturn.LeaseLost` when it
        exits (a thread cannot be interrupted).
        """
        settings = self._settings_for(lease, max_hold, on_lost)
        return SyncTurnRequest(
            self,
            normalize_key(key),
            timeout=check_timeout(timeout),
            nowait=False,
            settings=settings,
        )

    def turn_nowait_sync(
        self,
        key: str | int,
        *,
        lease: float | None = None,
        max_hold: float | None = None,
        on_lost: OnLost | None = None,
    ) -> SyncTurnRequest:
        """The thread twin of :meth:`turn_nowait`."""
        settings = self._settings_for(lease, max_hold, on_lost)
        return SyncTurnRequest(
            self, normalize_key(key), timeout=None, nowait=True, settings=settings
        )

    async def is_busy(self, key: str | int) -> bool:
        """True if ``key``'s turn is held or has a line (a snapshot)."""
        return await self.backend.is_busy(normalize_key(key))

    def _spawn(self, call: Awaitable[object], key: str, what: str) -> None:
        """Run a cleanup call in the background, bounded in time; a failure is logged."""

        async def run() -> None:
            try:
                async with asyncio.timeout(CLEANUP_TIMEOUT):
                    await call
            except Exception as exc:
                _log_cleanup_failure(what, key, exc)

        task = asyncio.ensure_future(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Stop mailboxes, wait (at most a second) for pending cleanups, close the backend(s)."""
        for box in self._mailboxes.values():
            await box.aclose()
        if self._background:
            # Cleanups (leave, release) are idempotent and their leases lapse anyway:
            # give them a moment, not the full CLEANUP_TIMEOUT of a stalled server.
            pending = list(self._background)
            _, late = await asyncio.wait(pending, timeout=1.0)
            for task in late:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._sync_backend is not None:
            self._sync_backend.close()
        await self.backend.aclose()

    def close(self) -> None:
        """Close the sync backend (for programs that never run an event loop)."""
        if self._sync_backend is not None:
            self._sync_backend.close()

    async def __aenter__(self) -> Gate:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<Gate {type(self.backend).__name__} lease={self._settings.lease:g}s>"
