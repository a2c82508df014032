"""The gate: one object per application that hands out turns of keys."""

from __future__ import annotations

import importlib
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Literal

from ._backends.base import Backend, Diagnostics, Statistics, SyncBackend
from ._dedup import DEFAULT_WINDOW, Deduplicator
from ._errors import ConfigurationError
from ._keys import normalize_key
from ._mailbox import Handler, Mailbox
from ._metrics import InProcessMetrics, MetricsSink
from ._policy import (
    OnLost,
    TurnSettings,
    check_lease,
    check_max_hold,
    check_on_lost,
    check_timeout,
)
from ._runtime import Runtime
from ._serialize import OnBusy, Serializer
from ._turn_async import TurnRequest
from ._turn_sync import SyncTurnRequest

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
        settings = TurnSettings(
            lease=check_lease(lease),
            max_hold=check_max_hold(max_hold),
            on_lost=check_on_lost(on_lost),
        )
        self._runtime = Runtime(
            backend,
            sync_backend=sync_backend,
            settings=settings,
            metrics=InProcessMetrics() if metrics is None else metrics,
        )
        self.backend: Backend = backend
        """The async backend."""
        self.metrics: MetricsSink = self._runtime.metrics
        """Where this gate reports counts and timings (see ``inturn._metrics``)."""
        self.id = self._runtime.id
        """A number unique to this gate in this process."""
        self._mailboxes: dict[str, Mailbox] = {}

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
        gate = cls(backend, lease=lease, max_hold=max_hold, on_lost=on_lost, metrics=metrics)
        # Gates on one URL and namespace share each key's turn: a task that holds a key
        # through one gets the same turn back through another instead of waiting for itself.
        where = "memory://" if scheme == "memory" else url
        gate._runtime.domain = f"{where}#{namespace}"
        return gate

    @property
    def lease(self) -> float:
        """The default lease (seconds) of this gate's turns."""
        return self._runtime.settings.lease

    def dedup(self, scope: str, *, window: float = DEFAULT_WINDOW) -> Deduplicator:
        """Claims of message ids for ``scope`` (a function or mailbox name), kept ``window`` s.

        See :class:`~inturn.Deduplicator`; ``@gate.serialize(dedup=...)`` uses it for you.
        """
        return Deduplicator(self._runtime, scope, window=window)

    def mailbox(
        self,
        name: str,
        *,
        handler: Handler,
        batch: bool = False,
        max_batch: int = 100,
        max_pending: int = 10_000,
        overflow: Literal["reject", "drop_oldest"] = "reject",
        max_payload_bytes: int = 64 * 1024,
        drain: Literal["background", "inline"] = "background",
        debounce: float = 0.0,
        debounce_max: float | None = None,
        max_attempts: int = 5,
        backoff: Sequence[float] = (0.5, 2.0, 10.0, 30.0),
        dedup_window: float = DEFAULT_WINDOW,
        sweep_interval: float | None = 5.0,
    ) -> Mailbox:
        """A durable per-key queue that drains itself: see :class:`~inturn.Mailbox`.

        ``handler`` is an ``async def`` (drains on the event loop; submit with
        ``await mailbox.submit``) or a ``def`` (drains in threads; submit with
        ``mailbox.submit_sync`` from threads, or ``submit`` from a loop).
        ``batch``: hand the handler a list of all pending messages (at most
        ``max_batch``). ``max_pending`` and ``overflow`` bound a key's queue;
        ``max_payload_bytes`` a stored message. ``drain``: ``"background"``
        (a task or thread) or ``"inline"`` (the submitting call drains).
        ``debounce`` holds a key's first message until no new one came for that
        long (at most ``debounce_max``, default 4x). A failed delivery is
        retried after ``backoff[n]`` seconds, up to ``max_attempts``, then
        dead-lettered. Message ids are remembered ``dedup_window`` seconds.
        A process that submits also sweeps every ``sweep_interval`` seconds
        (None: sweep by hand), resuming queues whose drainer died. One
        mailbox per name and gate.
        """
        if name in self._mailboxes:
            raise ConfigurationError(f"this gate already has a mailbox named {name!r}")
        box = Mailbox(
            self._runtime,
            name,
            handler,
            batch=batch,
            max_batch=max_batch,
            max_pending=max_pending,
            overflow=overflow,
            max_payload_bytes=max_payload_bytes,
            drain=drain,
            debounce=debounce,
            debounce_max=debounce_max,
            max_attempts=max_attempts,
            backoff=backoff,
            dedup_window=dedup_window,
            sweep_interval=sweep_interval,
        )
        self._mailboxes[name] = box
        return box

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
            self._runtime,
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
        return self._runtime.sync_backend

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
        settings = self._runtime.settings.override(lease, max_hold, on_lost)
        return TurnRequest(
            self._runtime,
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
        settings = self._runtime.settings.override(lease, max_hold, on_lost)
        return TurnRequest(
            self._runtime, normalize_key(key), timeout=None, nowait=True, settings=settings
        )

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
        settings = self._runtime.settings.override(lease, max_hold, on_lost)
        return SyncTurnRequest(
            self._runtime,
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
        settings = self._runtime.settings.override(lease, max_hold, on_lost)
        return SyncTurnRequest(
            self._runtime, normalize_key(key), timeout=None, nowait=True, settings=settings
        )

    async def is_busy(self, key: str | int) -> bool:
        """True if ``key``'s turn is held or has a line (a snapshot)."""
        return await self.backend.is_busy(normalize_key(key))

    async def statistics(self, key: str | int | None = None, *, limit: int = 1000) -> Statistics:
        """A snapshot of this gate's namespace: busy keys (holder, fence, lease left, line
        length), mailbox queues and dead-letter counts; one ``key``, or at most ``limit``
        keys and queues (``truncated`` says when there were more). It may scan the
        server: it is for operators and dashboards, not for every request."""
        return await self.backend.statistics(
            None if key is None else normalize_key(key), limit=limit
        )

    async def diagnose(self) -> Diagnostics:
        """Check the backend's server: version, settings that weaken a guarantee (an
        eviction policy, no persistence), topology and rights. Facts only: see
        :class:`~inturn.Diagnostics`."""
        return await self.backend.diagnose()

    async def aclose(self) -> None:
        """Stop mailboxes, wait (at most a second) for pending cleanups, close the backend(s).

        Turns still waiting in line through this gate (on this event loop, and in
        threads once the sync side was used) stop waiting at once: each leaves the
        key's line and raises :class:`~inturn.BackendUnavailable` (``transient``
        False) saying the gate was closed while it waited for that key. A turn held
        now runs its body to the end; leaving its block raises nothing and ends the
        turn (on Redis over a connection of its own, closed right after), so the
        next waiter gets it then. On Redis its lease is no longer renewed: a body
        that runs on past the lease loses the turn, as after any failed renewal.
        Later calls on this event loop raise BackendUnavailable (Redis, PostgreSQL),
        and so do calls the close cuts short (``transient`` False, whatever the cut
        connection raised); other event loops keep theirs. The threads' side is closed
        too (see :meth:`close`).
        """
        for box in self._mailboxes.values():
            await box.aclose()
        await self._runtime.finish_background()
        twin = self._runtime.close_sync_side()
        if twin is not None:
            twin.close()
        await self.backend.aclose()

    def close(self) -> None:
        """Close the sync side: wait for sync drains, close the sync backend (for programs
        that never run an event loop).

        Threads waiting in line through this gate stop waiting at once, as with
        :meth:`aclose`: each raises :class:`~inturn.BackendUnavailable` naming its key.
        A thread holding a turn finishes its block without an error, and the exit
        ends the turn. The sync side is closed even if no thread had used it yet: one
        made for a thread that asks later is made closed, and a request racing the close
        or made after it raises BackendUnavailable (``transient`` False) on Redis and
        PostgreSQL instead of opening connections nobody would close; so does any
        thread's call the close cuts short.
        """
        for box in self._mailboxes.values():
            if not box.is_async:
                box.close()
        twin = self._runtime.close_sync_side()
        if twin is not None:
            twin.close()

    async def __aenter__(self) -> Gate:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<Gate {type(self.backend).__name__} lease={self.lease:g}s>"
