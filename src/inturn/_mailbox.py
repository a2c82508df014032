"""The mailbox: a durable, self-draining queue per key. No caller waits for a turn.

    mailbox = gate.mailbox("replies", handler=reply, batch=True, debounce=0.8)
    await mailbox.submit(user_id, {"text": text}, id=update.update_id)   # returns at once

``submit`` stores the message in the key's queue before it returns. If nobody
drains that queue, the submitting process becomes its *drainer* (a background
task, or inline with ``drain="inline"``). The drainer takes the key's turn for
each message — or, with ``batch=True``, for all pending messages at once — so
``gate.turn`` callers of the same key slot in between messages in FIFO order
and never run beside one. It gives the drainer role up only in the same atomic
step that finds the queue empty: no message is stranded.

At least once: a message taken for processing stays in flight until it is
acknowledged; if its drainer dies, the sweeper (``mailbox.sweep()``, or the
loop of ``mailbox.start_sweeper()``) gives the queue to a new drainer, which
delivers the in-flight messages again first. With a message ``id`` the
handler's effect is once (dedup, scoped to the mailbox and the key).

The handler is an ``async def`` (drains run as tasks on the submitter's event
loop) or a plain ``def`` (drains run in threads: ``submit_sync`` from threads
and Celery prefork workers, or ``submit`` from a loop, whose drain then runs
in a worker thread). Both kinds run one drain algorithm, :func:`drain_flow`.

Failures: a handler that raises is retried with backoff (``backoff`` seconds
after each failure) up to ``max_attempts`` deliveries, then the message goes to
the mailbox's dead-letter list with the error, and the key goes on with its
next message — one poison message never wedges a user.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from ._backends.base import (
    MailboxBackend,
    ResumeStatus,
    SubmitStatus,
    Submitted,
    SyncMailboxBackend,
    Taken,
)
from ._dedup import DEFAULT_WINDOW, Deduplicator
from ._drain import Drainer
from ._errors import ConfigurationError, InvalidPayload, MailboxFull
from ._keys import new_token, normalize_key, shown
from ._message import DeadLetter, Message, dead_letter, envelope
from ._runtime import Runtime, renewal_pool
from ._timers import TimerHandle
from ._turn_sync import refuse_on_a_loop

__all__ = ["DeadLetter", "Handler", "Mailbox", "Message"]

logger = logging.getLogger("inturn")

Handler = Callable[[Any], Awaitable[object]] | Callable[[Any], object]
"""``async def handler(msg)`` or ``def handler(msg)`` (a list of messages with ``batch=True``)."""


class Mailbox:
    """A durable per-key queue with one drainer per key. See the module docstring."""

    def __init__(
        self,
        runtime: Runtime,
        name: str,
        handler: Handler,
        *,
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
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError("a mailbox name must be a non-empty str")
        if not callable(handler):
            raise ConfigurationError("a mailbox handler must be an async def or a def")
        call = getattr(handler, "__call__", None)  # noqa: B004 - an object with async __call__
        is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)
        if overflow not in ("reject", "drop_oldest"):
            raise ConfigurationError(
                f"overflow must be 'reject' or 'drop_oldest', not {overflow!r}"
            )
        if drain not in ("background", "inline"):
            raise ConfigurationError(f"drain must be 'background' or 'inline', not {drain!r}")
        for label, value in (
            ("max_batch", max_batch),
            ("max_pending", max_pending),
            ("max_payload_bytes", max_payload_bytes),
            ("max_attempts", max_attempts),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{label} must be a positive int, not {value!r}")
        if not (0 <= debounce < math.inf):
            raise ConfigurationError(f"debounce must be >= 0 seconds, not {debounce!r}")
        if sweep_interval is not None and not (0 < sweep_interval < math.inf):
            raise ConfigurationError(
                f"sweep_interval must be None or seconds > 0, not {sweep_interval!r}"
            )
        if any(not (0 <= b < math.inf) for b in backoff) or not backoff:
            raise ConfigurationError("backoff must be a non-empty list of seconds >= 0")
        if not isinstance(runtime.backend, MailboxBackend):
            raise ConfigurationError(f"{type(runtime.backend).__name__} does not keep mailboxes")
        self._runtime = runtime
        self.name = name
        self.handler = handler
        self.is_async = is_async
        """True for an ``async def`` handler (drains on the event loop), False for a ``def``."""
        self.batch = batch
        self.max_batch = max_batch if batch else 1
        self.max_pending = max_pending
        self.drop_oldest = overflow == "drop_oldest"
        self.max_payload_bytes = max_payload_bytes
        self.inline = drain == "inline"
        self.debounce = float(debounce)
        self.debounce_max = float(debounce_max) if debounce_max is not None else 4 * debounce
        self.max_attempts = max_attempts
        self.backoff = tuple(float(b) for b in backoff)
        self._store: MailboxBackend = runtime.backend
        self._ordered = bool(getattr(self._store, "ordered_submits", False))
        self._drainer = Drainer(
            runtime,
            name,
            handler,
            self,
            batch=batch,
            max_batch=self.max_batch,
            debounce=self.debounce,
            debounce_max=self.debounce_max,
            max_attempts=max_attempts,
            backoff=self.backoff,
            dedup=Deduplicator(runtime, f"mailbox:{name}", window=dedup_window),
        )
        self._drains: set[asyncio.Future[None]] = set()
        # Submits of one key in flight from this process's event loop, newest last: on an
        # engine whose concurrent submits can overtake each other (one connection per
        # call, as PostgreSQL's pool) a key's messages are still stored in call order.
        self._in_flight: dict[str, asyncio.Future[None]] = {}
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._sweeper: asyncio.Task[None] | None = None
        self.sweep_interval = sweep_interval
        """Seconds between the sweeps this process runs once it submits (None: none)."""
        self._sync_sweeper: TimerHandle | None = None
        self._sync_sweeper_lock = threading.Lock()
        runtime.add_busy_probe(self)

    @property
    def _lease(self) -> float:
        return self._runtime.settings.lease

    def _sync_store(self) -> SyncMailboxBackend:
        return self._drainer.sync_store()

    # -- submitting: shared parts -----------------------------------------------------

    def _encode(self, key: str | int, payload: Any, id: str | int | None) -> tuple[str, str]:
        key = normalize_key(key)
        msg_id = None if id is None else normalize_key(id)
        try:
            text = envelope(key, new_token(), msg_id, payload, time.time())
        except (TypeError, ValueError) as exc:
            raise InvalidPayload(f"a mailbox payload must be JSON: {exc}") from exc
        size = len(text)  # json.dumps escapes every non-ASCII character: one byte each
        if size > self.max_payload_bytes:
            raise InvalidPayload(
                f"payload is {size} bytes stored, over max_payload_bytes={self.max_payload_bytes}"
            )
        return key, text

    def _submit_args(self, token: str, turn: tuple[str, float] | None) -> dict[str, Any]:
        """``turn``: the token (and lease) a new drainer's first take asks the turn for."""
        return {
            "max_pending": self.max_pending,
            "drop_oldest": self.drop_oldest,
            "token": token,
            "lease": self._lease,
            "take": 0 if self.debounce else self.max_batch,  # debounce: the first take waits
            "turn": None if self.debounce else turn,
        }

    def _submitted(self, key: str, done: Submitted) -> None:
        """Count and log what a submit did; raise MailboxFull when it was refused."""
        metrics = self._runtime.metrics
        if done.status == SubmitStatus.REFUSED:
            metrics.count("mailbox_rejected", mailbox=self.name)
            raise MailboxFull(
                f"mailbox {self.name!r} holds {self.max_pending} messages for key {key!r}",
                key=key,
                mailbox=self.name,
            )
        metrics.count("mailbox_submitted", mailbox=self.name)
        if done.dropped:
            metrics.count("mailbox_dropped", mailbox=self.name)
            logger.warning(
                "inturn: mailbox %r dropped the oldest message of key %r (max_pending=%d)",
                self.name,
                shown(key),
                self.max_pending,
                extra={"inturn_key": shown(key)},
            )

    # -- submitting: async ------------------------------------------------------------

    async def submit(self, key: str | int, payload: Any, *, id: str | int | None = None) -> None:
        """Store ``payload`` (JSON) in ``key``'s queue; drain it if nobody does.

        Returns once the message is stored (and, with ``drain="inline"``, once
        the queue is drained). Raises :class:`~inturn.MailboxFull` when the queue
        holds ``max_pending`` messages and ``overflow="reject"``, and
        :class:`~inturn.InvalidPayload` for a payload that is not JSON or too big.
        With a ``def`` handler the drain runs in a worker thread.
        """
        key, text = self._encode(key, payload, id)
        token = new_token()
        args = self._submit_args(token, turn := self._drainer.next_turn())
        try:
            if self._ordered:
                done = await self._store.mb_submit(self.name, key, text, **args)
            else:
                done = await self._in_call_order(key, text, args)
        except BaseException:
            if args["turn"] is not None:  # it may have run and granted the turn: release it
                self._drainer.release_unused(key, turn[0])
            raise
        self._submitted(key, done)
        if self.sweep_interval is not None:
            self._sweep_here()
        if done.status == SubmitStatus.DRAINER:
            await self._store.mb_hint(self.name, key, True)
            await self._start_drain(key, token, done.first, turn[0])

    async def _in_call_order(self, key: str, text: str, args: dict[str, Any]) -> Submitted:
        """Submit after this loop's earlier submits of ``key`` are stored (or failed):
        messages of one key, submitted from one event loop, are queued in call order."""
        loop = asyncio.get_running_loop()
        mine: asyncio.Future[None] = loop.create_future()
        earlier = self._in_flight.get(key)
        self._in_flight[key] = mine
        try:
            if earlier is not None and not earlier.done() and earlier.get_loop() is loop:
                await asyncio.shield(earlier)
            return await self._store.mb_submit(self.name, key, text, **args)
        finally:
            mine.set_result(None)
            if self._in_flight.get(key) is mine:
                del self._in_flight[key]  # nothing is kept per idle key

    async def _start_drain(
        self, key: str, token: str, first: Taken | None = None, turn_token: str | None = None
    ) -> None:
        if self.is_async:
            drain: Awaitable[None] = self._drainer.drain(key, token, first, turn_token)
        else:
            drain = asyncio.to_thread(self._drainer.drain_sync, key, token, first, turn_token)
        if self.inline:
            await drain
            return
        task = asyncio.ensure_future(drain)
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    # -- submitting: sync -------------------------------------------------------------

    def submit_sync(self, key: str | int, payload: Any, *, id: str | int | None = None) -> None:
        """The thread twin of :meth:`submit`, for a ``def`` handler (threads, Celery prefork).

        Stores the message; a caller that becomes the drainer drains in a thread of
        its own (``drain="background"``) or before returning (``drain="inline"``).
        """
        if self.is_async:
            raise ConfigurationError(
                f"mailbox {self.name!r} has an async handler: use `await mailbox.submit(...)`, "
                "or give it a plain def handler to submit from threads"
            )
        if self.inline:
            refuse_on_a_loop(
                "mailbox.submit_sync(...) with drain='inline'", "await mailbox.submit(...)"
            )
        key, text = self._encode(key, payload, id)
        token = new_token()
        store = self._sync_store()
        args = self._submit_args(token, turn := self._drainer.next_turn())
        try:
            done = store.mb_submit(self.name, key, text, **args)
        except BaseException:
            if args["turn"] is not None:  # see submit
                self._drainer.release_unused_sync(key, turn[0])
            raise
        self._submitted(key, done)
        if self.sweep_interval is not None and self._sync_sweeper is None:
            self._sweep_from_threads()
        if done.status == SubmitStatus.DRAINER:
            store.mb_hint(self.name, key, True)
            self._start_drain_sync(key, token, done.first, turn[0])

    def store_sync(
        self, key: str | int, payload: Any, *, id: str | int | None = None
    ) -> str | None:
        """Store ``payload`` in ``key``'s queue and never drain here: for a producer that
        hands draining to another process (a Celery worker), so the queue keeps the
        producer's order.

        Returns the drainer token when this call took the key's drainer role, else None
        (a live drainer will take the message). Pass the token to
        :meth:`drain_sync` (``key``, ``token``) where the queue is to be drained,
        within the gate's lease; a token never used lapses after the lease, and the
        sweeper resumes the queue. Raises as :meth:`submit` does.
        """
        key, text = self._encode(key, payload, id)
        token = new_token()
        store = self._sync_store()
        args = {**self._submit_args(token, None), "take": 0}  # the drainer takes for itself
        done = store.mb_submit(self.name, key, text, **args)
        self._submitted(key, done)
        if done.status != SubmitStatus.DRAINER:
            return None
        store.mb_hint(self.name, key, True)
        return token

    def drain_sync(self, key: str | int, token: str) -> None:
        """Drain ``key``'s queue here, as the drainer ``token`` names (from
        :meth:`store_sync`), until it is empty or the role is lost. A ``def`` handler only."""
        if self.is_async:
            raise ConfigurationError(
                f"mailbox {self.name!r} has an async handler: it drains on an event loop"
            )
        if self.sweep_interval is not None and self._sync_sweeper is None:
            self._sweep_from_threads()  # a process that drains also sweeps
        self._drainer.drain_sync(normalize_key(key), token)

    def resume_sync(self, key: str | int) -> bool:
        """Drain ``key``'s queue here if nobody does (a drainer died, or nobody took the
        role); False when a live drainer owns it or nothing is queued."""
        key = normalize_key(key)
        store = self._sync_store()
        token = new_token()
        status = store.mb_resume(self.name, key, token, lease=self._lease)
        if status == ResumeStatus.IDLE:
            store.mb_hint(self.name, key, False)
        if status != ResumeStatus.RESUMED:
            return False
        self._drainer.drain_sync(key, token)
        return True

    def _start_drain_sync(
        self,
        key: str,
        token: str,
        first: Taken | None = None,
        turn_token: str | None = None,
        *,
        inline: bool | None = None,
    ) -> None:
        if self.inline if inline is None else inline:
            self._drainer.drain_sync(key, token, first, turn_token)
            return

        def run() -> None:
            try:
                self._drainer.drain_sync(key, token, first, turn_token)
            finally:
                with self._threads_lock:
                    self._threads.discard(thread)

        thread = threading.Thread(target=run, name=f"inturn-drain-{self.name}", daemon=True)
        with self._threads_lock:
            self._threads.add(thread)
        thread.start()

    # -- inspecting -------------------------------------------------------------------

    async def pending(self, key: str | int) -> int:
        """Messages waiting in ``key``'s queue (not counting those in flight)."""
        return await self._store.mb_pending(self.name, normalize_key(key))

    def pending_sync(self, key: str | int) -> int:
        """The thread twin of :meth:`pending`."""
        return self._sync_store().mb_pending(self.name, normalize_key(key))

    async def is_draining(self, key: str | int) -> bool:
        """True while a live drainer owns ``key``'s queue."""
        return await self._store.mb_draining(self.name, normalize_key(key))

    def is_draining_sync(self, key: str | int) -> bool:
        """The thread twin of :meth:`is_draining`."""
        return self._sync_store().mb_draining(self.name, normalize_key(key))

    async def drained(self, timeout: float | None = None) -> bool:
        """Wait until this process's drains (tasks and threads) are finished; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._drains:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            await asyncio.wait(list(self._drains), timeout=left)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return await asyncio.to_thread(self.drained_sync, left)

    def drained_sync(self, timeout: float | None = None) -> bool:
        """Wait until this process's drain threads are finished; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._threads_lock:
                threads = list(self._threads)
            if not threads:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            threads[0].join(left)

    # -- sweeping ---------------------------------------------------------------------

    async def sweep(self) -> int:
        """Resume the queues whose drainer died; returns how many were resumed.

        Safe to run in every worker at once: one of them wins each key's role.
        """
        resumed = 0
        for key in await self._store.mb_hinted(self.name):
            token = new_token()
            status = await self._store.mb_resume(self.name, key, token, lease=self._lease)
            if status == ResumeStatus.IDLE:
                await self._store.mb_hint(self.name, key, False)
            elif status == ResumeStatus.RESUMED:
                resumed += 1
                logger.info("inturn: mailbox %r resumed key %r", self.name, shown(key))
                await self._start_drain(key, token)
        return resumed

    def sweep_sync(self, *, inline: bool | None = None) -> int:
        """The thread twin of :meth:`sweep` (a ``def`` handler): resumed drains run as
        the mailbox's ``drain`` setting says (in threads, or one after another here), or as
        ``inline`` says."""
        if self.is_async:
            raise ConfigurationError(
                f"mailbox {self.name!r} has an async handler: use `await mailbox.sweep()`"
            )
        store = self._sync_store()
        resumed = 0
        for key in store.mb_hinted(self.name):
            token = new_token()
            status = store.mb_resume(self.name, key, token, lease=self._lease)
            if status == ResumeStatus.IDLE:
                store.mb_hint(self.name, key, False)
            elif status == ResumeStatus.RESUMED:
                resumed += 1
                logger.info("inturn: mailbox %r resumed key %r", self.name, shown(key))
                self._start_drain_sync(key, token, inline=inline)
        return resumed

    def start_sweeper(self, interval: float = 5.0) -> asyncio.Task[None]:
        """Run :meth:`sweep` every ``interval`` seconds in the background."""

        async def loop() -> None:
            # The flag, not only the cancellation, ends the loop: asyncio (3.11) may drop a
            # cancel that lands as a call inside the sweep completes (``wait_for`` returns
            # the result instead), and the loop would then sweep on after aclose().
            while True:
                try:
                    await self.sweep()
                except Exception:
                    logger.exception("inturn: mailbox %r sweep failed", self.name)
                if self._sweeper is not asyncio.current_task():
                    return
                await asyncio.sleep(interval)

        running = self._sweeper
        if (
            running is None
            or running.done()
            or running.get_loop() is not asyncio.get_running_loop()
        ):
            running = self._sweeper = asyncio.ensure_future(loop())
        return running

    def _sweep_here(self) -> None:
        """Make sure this event loop sweeps (every ``sweep_interval`` s): a queue whose
        drainer died is resumed without anyone starting a sweeper by hand."""
        running = self._sweeper
        if (
            running is None
            or running.done()
            or running.get_loop() is not asyncio.get_running_loop()
        ):
            assert self.sweep_interval is not None
            self.start_sweeper(self.sweep_interval)

    def _sweep_from_threads(self) -> None:
        """The thread twin of :meth:`_sweep_here`: sweeps on the process's timer thread,
        each in a worker; resumed drains run in threads of their own."""
        with self._sync_sweeper_lock:
            if self._sync_sweeper is not None or self.sweep_interval is None:
                return
            self._sync_sweeper = self._runtime.timers.call_at(
                time.monotonic() + self.sweep_interval, self._sync_sweep_due
            )

    def _sync_sweep_due(self) -> None:
        def run() -> None:
            try:
                self.sweep_sync(inline=False)
            except Exception:
                logger.exception("inturn: mailbox %r sweep failed", self.name)
            with self._sync_sweeper_lock:
                if self._sync_sweeper is not None and self.sweep_interval is not None:
                    self._sync_sweeper = self._runtime.timers.call_at(
                        time.monotonic() + self.sweep_interval, self._sync_sweep_due
                    )

        renewal_pool().submit(run)

    def _stop_sweeping(self) -> None:
        with self._sync_sweeper_lock:
            handle, self._sync_sweeper = self._sync_sweeper, None
        if handle is not None:
            handle.cancel()

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters of this mailbox."""
        return [dead_letter(t) for t in await self._store.mb_dead_letters(self.name, limit)]

    def dead_letters_sync(self, limit: int = 100) -> list[DeadLetter]:
        """The thread twin of :meth:`dead_letters`."""
        return [dead_letter(t) for t in self._sync_store().mb_dead_letters(self.name, limit)]

    async def aclose(self, timeout: float = 10.0) -> None:
        """Stop the sweeper; let drains finish for ``timeout`` s, then cancel the rest.

        A cancelled drain leaves its messages stored (the one in flight too): the
        sweeper of another process, or of the next start, delivers them. Drain
        threads cannot be cancelled: they are waited for, up to ``timeout``.
        """
        self._stop_sweeping()
        sweeper, self._sweeper = self._sweeper, None  # the loop ends at its next check
        if sweeper is not None and sweeper.get_loop() is asyncio.get_running_loop():
            sweeper.cancel()
            # Bounded: a sweep stuck in a call that does not end on cancel (a server that
            # stopped answering) must not hang the shutdown; its work is idempotent.
            await asyncio.wait({sweeper}, timeout=timeout)
            if sweeper.done():
                if not sweeper.cancelled():
                    sweeper.exception()  # retrieved: a sweep that failed was logged already
            else:
                logger.warning(
                    "inturn: mailbox %r: the sweeper did not stop within %ss; left running",
                    self.name,
                    timeout,
                )
        if not await self.drained(timeout):
            for task in list(self._drains):
                task.cancel()
            await asyncio.gather(*list(self._drains), return_exceptions=True)

    def close(self, timeout: float = 10.0) -> None:
        """The thread twin of :meth:`aclose`: stop sweeping from threads, wait up to
        ``timeout`` s for drain threads."""
        self._stop_sweeping()
        self.drained_sync(timeout)
