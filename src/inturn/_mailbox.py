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
import contextlib
import inspect
import json
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from functools import partial
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
from ._errors import ConfigurationError, Duplicate, InvalidPayload, MailboxFull
from ._keys import new_token, normalize_key
from ._policy import TurnSettings
from ._runtime import Runtime
from ._turn_async import TurnRequest
from ._turn_sync import SyncTurnRequest

__all__ = ["DeadLetter", "Handler", "Mailbox", "Message"]

logger = logging.getLogger("inturn")

Handler = Callable[[Any], Awaitable[object]] | Callable[[Any], object]
"""``async def handler(msg)`` or ``def handler(msg)`` (a list of messages with ``batch=True``)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One delivered message.

    ``key`` is the key's normal form (a ``str``); ``payload`` the JSON value
    submitted; ``enqueued_at`` the submit time (``time.time()``); ``attempt``
    counts deliveries after failures (1 the first time); ``fence`` is the fence
    of the turn the handler runs in.
    """

    key: str
    id: str | None
    payload: Any
    enqueued_at: float
    attempt: int
    fence: int
    _mailbox: Mailbox = field(repr=False, compare=False)

    async def pending(self) -> int:
        """How many newer messages for this key wait behind this one (or this batch)."""
        return await self._mailbox.pending(self.key)

    def pending_sync(self) -> int:
        """The thread twin of :meth:`pending` (for a sync handler)."""
        return self._mailbox.pending_sync(self.key)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that failed ``max_attempts`` times, with the last error."""

    key: str
    id: str | None
    payload: Any
    enqueued_at: float
    attempts: int
    error: str
    failed_at: float


# -- the stored envelope: the only code that knows its fields --------------------------


def _envelope(key: str, tag: str, id: str | None, payload: Any, at: float) -> str:
    """The stored text of a message: key, a unique tag, id, payload, time, attempts."""
    return json.dumps({"k": key, "g": tag, "i": id, "p": payload, "t": at, "a": 0})


def _dead_letter(text: str) -> DeadLetter:
    d = json.loads(text)
    m = d["m"]
    return DeadLetter(
        key=m["k"],
        id=m["i"],
        payload=m["p"],
        enqueued_at=m["t"],
        attempts=d["n"],
        error=d["e"],
        failed_at=d["at"],
    )


@dataclass(frozen=True, slots=True)
class _Failure:
    """What to store after a failed delivery: ``retry`` texts (with ``not_before``), or
    ``dead`` letters when the attempts are used up."""

    attempts: int
    pause: float
    error: str
    retry: list[str]
    not_before: float
    dead: list[str]


# -- the drain flow, shared by both twins ----------------------------------------------


@dataclass(frozen=True, slots=True)
class _Take:
    """Step: take the next batch (acknowledging the last one when ``ack``). Sends a Taken."""

    ack: bool


@dataclass(frozen=True, slots=True)
class _Debounce:
    """Step: wait until no message arrived for ``debounce`` s (at most ``debounce_max``)."""


@dataclass(frozen=True, slots=True)
class _Pause:
    """Step: sleep ``seconds`` (a retry's backoff)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class _Process:
    """Step: handle ``texts`` inside the key's turn. Sends back a :class:`_Handled`."""

    texts: tuple[str, ...]


_DrainStep = _Take | _Debounce | _Pause | _Process


@dataclass(slots=True)
class _Handled:
    """One processed batch: whether to acknowledge it, and the next batch when the turn's
    release took it in the same step (``released``)."""

    ack: bool = False
    released: bool = False
    taken: Taken | None = None


def drain_flow(box: Mailbox, key: str, first: Taken | None) -> Generator[_DrainStep, Any, None]:
    """Process ``key``'s queue until it is empty (role given up) or the role is lost.

    ``first``: the first batch, when the submit that made us drainer took it.
    The drainer needs only its role to take; it takes the key's turn to process.
    A batch is acknowledged by the next take, which rides on the turn's release
    where the engine can (``mb_release_take``).
    """
    taken: Taken | None = first
    ack = False
    while True:
        if taken is None:
            if box.debounce:
                yield _Debounce()
            taken = yield _Take(ack)
        assert taken is not None
        if taken.lost_role:
            logger.warning(
                "inturn: mailbox %r lost the drainer role of key %r",
                box.name,
                key,
                extra={"inturn_key": key},
            )
            return
        if taken.retry_in > 0:
            yield _Pause(taken.retry_in)
            taken, ack = None, False
            continue
        if not taken.messages:
            return  # empty: the role was given up in the same step
        handled: _Handled = yield _Process(taken.messages)
        taken, ack = None, handled.ack
        if handled.released:
            # If the combined call failed it may or may not have run: take again without
            # acknowledging (a redelivery, never a loss). It is not called at all when the
            # turn was re-entered (an inline drain inside a turn).
            taken, ack = handled.taken, False


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
        self._dedup = Deduplicator(runtime, f"mailbox:{name}", window=dedup_window)
        self._drains: set[asyncio.Future[None]] = set()
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._sweeper: asyncio.Task[None] | None = None
        runtime.add_busy_probe(self)

    @property
    def _lease(self) -> float:
        return self._runtime.settings.lease

    def _sync_store(self) -> SyncMailboxBackend:
        store = self._runtime.sync_backend
        if not isinstance(store, SyncMailboxBackend):
            raise ConfigurationError(f"{type(store).__name__} does not keep mailboxes")
        return store

    # -- submitting: shared parts -----------------------------------------------------

    def _encode(self, key: str | int, payload: Any, id: str | int | None) -> tuple[str, str]:
        key = normalize_key(key)
        msg_id = None if id is None else normalize_key(id)
        try:
            text = _envelope(key, new_token(), msg_id, payload, time.time())
        except (TypeError, ValueError) as exc:
            raise InvalidPayload(f"a mailbox payload must be JSON: {exc}") from exc
        size = len(text.encode())
        if size > self.max_payload_bytes:
            raise InvalidPayload(
                f"payload is {size} bytes stored, over max_payload_bytes={self.max_payload_bytes}"
            )
        return key, text

    def _submit_args(self, token: str) -> dict[str, Any]:
        return {
            "max_pending": self.max_pending,
            "drop_oldest": self.drop_oldest,
            "token": token,
            "lease": self._lease,
            "take": 0 if self.debounce else self.max_batch,  # debounce: the first take waits
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
                key,
                self.max_pending,
                extra={"inturn_key": key},
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
        done = await self._store.mb_submit(self.name, key, text, **self._submit_args(token))
        self._submitted(key, done)
        if done.status == SubmitStatus.DRAINER:
            await self._store.mb_hint(self.name, key, True)
            await self._start_drain(key, token, done.first)

    async def _start_drain(self, key: str, token: str, first: Taken | None = None) -> None:
        if self.is_async:
            drain: Awaitable[None] = self._drain(key, token, first)
        else:
            drain = asyncio.to_thread(self._drain_sync, key, token, first)
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
        key, text = self._encode(key, payload, id)
        token = new_token()
        store = self._sync_store()
        done = store.mb_submit(self.name, key, text, **self._submit_args(token))
        self._submitted(key, done)
        if done.status == SubmitStatus.DRAINER:
            store.mb_hint(self.name, key, True)
            self._start_drain_sync(key, token, done.first)

    def _start_drain_sync(self, key: str, token: str, first: Taken | None = None) -> None:
        if self.inline:
            self._drain_sync(key, token, first)
            return

        def run() -> None:
            try:
                self._drain_sync(key, token, first)
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

    # -- processing: shared parts -----------------------------------------------------

    def _messages(
        self, key: str, texts: Sequence[str], fence: int
    ) -> tuple[list[dict[str, Any]], list[Message]]:
        stored = [json.loads(t) for t in texts]
        messages = [
            Message(
                key=key,
                id=s["i"],
                payload=s["p"],
                enqueued_at=s["t"],
                attempt=s["a"] + 1,
                fence=fence,
                _mailbox=self,
            )
            for s in stored
        ]
        return stored, messages

    def _delivered(self, fresh: list[Message]) -> None:
        metrics, now = self._runtime.metrics, time.time()
        for message in fresh:
            metrics.observe("mailbox_latency_seconds", now - message.enqueued_at, mailbox=self.name)

    def _failure(self, key: str, stored: list[dict[str, Any]], exc: BaseException) -> _Failure:
        """Decide a failed message or batch's fate: retry after a backoff, or dead letters."""
        attempts = stored[0]["a"] + 1
        error = f"{type(exc).__name__}: {exc}"
        self._runtime.metrics.count("mailbox_failures", mailbox=self.name)
        now = time.time()
        if attempts < self.max_attempts:
            pause = self.backoff[min(attempts, len(self.backoff)) - 1]
            logger.warning(
                "inturn: mailbox %r handler failed for key %r (attempt %d of %d, retry in %gs): %s",
                self.name,
                key,
                attempts,
                self.max_attempts,
                pause,
                error,
                extra={"inturn_key": key},
            )
            retry = [json.dumps({**s, "a": attempts}) for s in stored]
            return _Failure(attempts, pause, error, retry, now + pause, [])
        logger.error(
            "inturn: mailbox %r gave up on %d message(s) of key %r after %d attempts: %s",
            self.name,
            len(stored),
            key,
            attempts,
            error,
            extra={"inturn_key": key},
        )
        dead = [json.dumps({"m": s, "e": error, "at": now, "n": attempts}) for s in stored]
        self._runtime.metrics.count("mailbox_dead_letters", len(dead), mailbox=self.name)
        return _Failure(attempts, 0.0, error, [], 0.0, dead)

    def _turn(self, key: str) -> TurnRequest:
        return TurnRequest(self._runtime, key, timeout=None, nowait=False, settings=self._settings)

    def _turn_sync(self, key: str) -> SyncTurnRequest:
        return SyncTurnRequest(
            self._runtime, key, timeout=None, nowait=False, settings=self._settings
        )

    @property
    def _settings(self) -> TurnSettings:
        return self._runtime.settings

    # -- draining: async --------------------------------------------------------------

    async def _drain(self, key: str, token: str, first: Taken | None = None) -> None:
        renewer = asyncio.ensure_future(self._renew_role(key, token))
        flow = drain_flow(self, key, first)
        reply: Any = None
        try:
            while True:
                try:
                    step = flow.send(reply)
                except StopIteration:
                    return
                reply = await self._step(step, key, token)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("inturn: mailbox %r drain of key %r failed", self.name, key)
        finally:
            renewer.cancel()

    async def _step(self, step: _DrainStep, key: str, token: str) -> Any:
        if isinstance(step, _Take):
            return await self._store.mb_take(
                self.name, key, token, limit=self.max_batch, lease=self._lease, ack=step.ack
            )
        if isinstance(step, _Debounce):
            await self._debounce(key)
            return None
        if isinstance(step, _Pause):
            await asyncio.sleep(step.seconds)  # a retry's backoff
            return None
        handled = _Handled()
        request = self._turn(key)
        request._release_with(partial(self._release_and_take, token, handled))
        async with request as turn:
            handled.ack = await self._process(key, token, step.texts, turn.fence)
        return handled

    async def _release_and_take(
        self, token: str, handled: _Handled, turn_key: str, turn_token: str
    ) -> None:
        handled.released = True
        handled.taken = await self._store.mb_release_take(
            self.name,
            turn_key,
            token,
            turn_token,
            limit=self.max_batch,
            lease=self._lease,
            ack=handled.ack,
        )

    async def _renew_role(self, key: str, token: str) -> None:
        lease = self._lease
        while True:
            await asyncio.sleep(lease / 3)
            with contextlib.suppress(Exception):
                if not await self._store.mb_renew(self.name, key, token, lease=lease):
                    return

    async def _debounce(self, key: str) -> None:
        """Wait until no message arrived for ``debounce`` s (at most ``debounce_max``)."""
        started = time.monotonic()
        seen = await self._store.mb_pending(self.name, key)
        while time.monotonic() - started < self.debounce_max:
            await asyncio.sleep(
                min(self.debounce, self.debounce_max - (time.monotonic() - started))
            )
            now = await self._store.mb_pending(self.name, key)
            if now == seen:
                return
            seen = now

    async def _process(self, key: str, token: str, texts: Sequence[str], fence: int) -> bool:
        """Handle one message or batch; True when it is to be acknowledged (done or dead)."""
        stored, messages = self._messages(key, texts, fence)
        try:
            await self._claimed_and_handled(key, token, stored, messages, fence)
        except _Recorded as recorded:
            return recorded.dead  # a retry was put back at the head: nothing to acknowledge
        return True

    async def _claimed_and_handled(
        self,
        key: str,
        token: str,
        stored: list[dict[str, Any]],
        messages: list[Message],
        fence: int,
    ) -> None:
        """Claim the ids (dedup), call the handler; on failure record it and raise _Recorded."""
        async with contextlib.AsyncExitStack() as claims:
            fresh = []
            for message in messages:
                if message.id is not None:
                    try:
                        await claims.enter_async_context(
                            self._dedup.claim(key, message.id, fence=fence)
                        )
                    except Duplicate:
                        continue  # processed before (a redelivery or a resubmit): effect once
                fresh.append(message)
            self._delivered(fresh)
            try:
                if fresh:
                    await self.handler(fresh if self.batch else fresh[0])  # type: ignore[misc]
                    self._runtime.metrics.count("mailbox_handled", len(fresh), mailbox=self.name)
            except Exception as exc:
                failure = self._failure(key, stored, exc)
                if failure.dead:
                    await self._store.mb_dead(self.name, failure.dead)
                else:
                    await self._store.mb_retry(
                        self.name, key, token, failure.retry, not_before=failure.not_before
                    )
                raise _Recorded(bool(failure.dead)) from exc  # abandons the claims

    # -- draining: sync ---------------------------------------------------------------

    def _drain_sync(self, key: str, token: str, first: Taken | None = None) -> None:
        store = self._sync_store()
        renewal = _RoleRenewal(self, store, key, token)
        flow = drain_flow(self, key, first)
        reply: Any = None
        try:
            while True:
                try:
                    step = flow.send(reply)
                except StopIteration:
                    return
                reply = self._step_sync(store, step, key, token)
        except Exception:
            logger.exception("inturn: mailbox %r drain of key %r failed", self.name, key)
        finally:
            renewal.stop()

    def _step_sync(self, store: SyncMailboxBackend, step: _DrainStep, key: str, token: str) -> Any:
        if isinstance(step, _Take):
            return store.mb_take(
                self.name, key, token, limit=self.max_batch, lease=self._lease, ack=step.ack
            )
        if isinstance(step, _Debounce):
            self._debounce_sync(store, key)
            return None
        if isinstance(step, _Pause):
            time.sleep(step.seconds)  # a retry's backoff
            return None
        handled = _Handled()

        def release_and_take(turn_key: str, turn_token: str) -> None:
            handled.released = True
            handled.taken = store.mb_release_take(
                self.name,
                turn_key,
                token,
                turn_token,
                limit=self.max_batch,
                lease=self._lease,
                ack=handled.ack,
            )

        request = self._turn_sync(key)
        request._release_with(release_and_take)
        with request as turn:
            handled.ack = self._process_sync(store, key, token, step.texts, turn.fence)
        return handled

    def _debounce_sync(self, store: SyncMailboxBackend, key: str) -> None:
        """See :meth:`_debounce`."""
        started = time.monotonic()
        seen = store.mb_pending(self.name, key)
        while time.monotonic() - started < self.debounce_max:
            time.sleep(min(self.debounce, self.debounce_max - (time.monotonic() - started)))
            now = store.mb_pending(self.name, key)
            if now == seen:
                return
            seen = now

    def _process_sync(
        self, store: SyncMailboxBackend, key: str, token: str, texts: Sequence[str], fence: int
    ) -> bool:
        """See :meth:`_process`."""
        stored, messages = self._messages(key, texts, fence)
        try:
            self._claimed_and_handled_sync(store, key, token, stored, messages, fence)
        except _Recorded as recorded:
            return recorded.dead
        return True

    def _claimed_and_handled_sync(
        self,
        store: SyncMailboxBackend,
        key: str,
        token: str,
        stored: list[dict[str, Any]],
        messages: list[Message],
        fence: int,
    ) -> None:
        """See :meth:`_claimed_and_handled`."""
        with contextlib.ExitStack() as claims:
            fresh = []
            for message in messages:
                if message.id is not None:
                    try:
                        claims.enter_context(self._dedup.claim_sync(key, message.id, fence=fence))
                    except Duplicate:
                        continue
                fresh.append(message)
            self._delivered(fresh)
            try:
                if fresh:
                    self.handler(fresh if self.batch else fresh[0])
                    self._runtime.metrics.count("mailbox_handled", len(fresh), mailbox=self.name)
            except Exception as exc:
                failure = self._failure(key, stored, exc)
                if failure.dead:
                    store.mb_dead(self.name, failure.dead)
                else:
                    store.mb_retry(
                        self.name, key, token, failure.retry, not_before=failure.not_before
                    )
                raise _Recorded(bool(failure.dead)) from exc

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
                logger.info("inturn: mailbox %r resumed key %r", self.name, key)
                await self._start_drain(key, token)
        return resumed

    def sweep_sync(self) -> int:
        """The thread twin of :meth:`sweep` (a ``def`` handler): resumed drains run as
        the mailbox's ``drain`` setting says (in threads, or one after another here)."""
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
                logger.info("inturn: mailbox %r resumed key %r", self.name, key)
                self._start_drain_sync(key, token)
        return resumed

    def start_sweeper(self, interval: float = 5.0) -> asyncio.Task[None]:
        """Run :meth:`sweep` every ``interval`` seconds in the background."""

        async def loop() -> None:
            while True:
                try:
                    await self.sweep()
                except Exception:
                    logger.exception("inturn: mailbox %r sweep failed", self.name)
                await asyncio.sleep(interval)

        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(loop())
        return self._sweeper

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters of this mailbox."""
        return [_dead_letter(t) for t in await self._store.mb_dead_letters(self.name, limit)]

    def dead_letters_sync(self, limit: int = 100) -> list[DeadLetter]:
        """The thread twin of :meth:`dead_letters`."""
        return [_dead_letter(t) for t in self._sync_store().mb_dead_letters(self.name, limit)]

    async def aclose(self, timeout: float = 10.0) -> None:
        """Stop the sweeper; let drains finish for ``timeout`` s, then cancel the rest.

        A cancelled drain leaves its messages stored (the one in flight too): the
        sweeper of another process, or of the next start, delivers them. Drain
        threads cannot be cancelled: they are waited for, up to ``timeout``.
        """
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(BaseException):
                await self._sweeper
        if not await self.drained(timeout):
            for task in list(self._drains):
                task.cancel()
            await asyncio.gather(*list(self._drains), return_exceptions=True)

    def close(self, timeout: float = 10.0) -> None:
        """The thread twin of :meth:`aclose`: wait up to ``timeout`` s for drain threads."""
        self.drained_sync(timeout)


class _RoleRenewal:
    """Renews a sync drainer's role every third of the lease, on the process's timer thread."""

    def __init__(self, box: Mailbox, store: SyncMailboxBackend, key: str, token: str) -> None:
        self._box, self._store, self._key, self._token = box, store, key, token
        self._stopped = False
        self._handle = box._runtime.timers.call_at(time.monotonic() + box._lease / 3, self._due)

    def _due(self) -> None:
        if self._stopped:
            return
        box = self._box
        try:
            alive = self._store.mb_renew(box.name, self._key, self._token, lease=box._lease)
        except Exception:
            alive = True  # a transport error: try again next time
        if alive and not self._stopped:
            self._handle = box._runtime.timers.call_at(time.monotonic() + box._lease / 3, self._due)

    def stop(self) -> None:
        self._stopped = True
        self._handle.cancel()


class _Recorded(Exception):
    """The handler failed and the failure was recorded (retry, or dead letter: ``dead``)."""

    def __init__(self, dead: bool) -> None:
        super().__init__(dead)
        self.dead = dead
