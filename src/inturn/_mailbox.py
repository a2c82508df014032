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

Failures: a handler that raises is retried with backoff (``backoff`` seconds
after each failure) up to ``max_attempts`` deliveries, then the message goes to
the mailbox's dead-letter list with the error, and the key goes on with its
next message — one poison message never wedges a user.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ._backends.base import MailboxBackend, Taken
from ._dedup import DEFAULT_WINDOW
from ._errors import ConfigurationError, Duplicate, InvalidPayload, MailboxFull
from ._keys import normalize_key
from ._turn import new_token

if TYPE_CHECKING:
    from ._gate import Gate

__all__ = ["DeadLetter", "Mailbox", "Message"]

logger = logging.getLogger("inturn")

Handler = Callable[[Any], Awaitable[object]]


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


def _store_text(key: str, tag: str, id: str | None, payload: Any, at: float) -> str:
    return json.dumps({"k": key, "g": tag, "i": id, "p": payload, "t": at, "a": 0, "nb": 0})


class Mailbox:
    """A durable per-key queue with one drainer per key. See the module docstring."""

    def __init__(
        self,
        gate: Gate,
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
        call = getattr(handler, "__call__", None)  # noqa: B004 - an object with async __call__
        if not (inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)):
            raise ConfigurationError("a mailbox handler must be an async def")
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
        if not isinstance(gate.backend, MailboxBackend):
            raise ConfigurationError(f"{type(gate.backend).__name__} does not keep mailboxes")
        self.gate = gate
        self.name = name
        self.handler = handler
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
        self._store: MailboxBackend = gate.backend
        self._dedup = gate.dedup(f"mailbox:{name}", window=dedup_window)
        self._drains: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # -- submitting -------------------------------------------------------------------

    async def submit(self, key: str | int, payload: Any, *, id: str | int | None = None) -> None:
        """Store ``payload`` (JSON) in ``key``'s queue; drain it if nobody does.

        Returns once the message is stored (and, with ``drain="inline"``, once
        the queue is drained). Raises :class:`~inturn.MailboxFull` when the queue
        holds ``max_pending`` messages and ``overflow="reject"``, and
        :class:`~inturn.InvalidPayload` for a payload that is not JSON or too big.
        """
        key = normalize_key(key)
        msg_id = None if id is None else normalize_key(id)
        try:
            text = _store_text(key, new_token(), msg_id, payload, time.time())
        except (TypeError, ValueError) as exc:
            raise InvalidPayload(f"a mailbox payload must be JSON: {exc}") from exc
        if len(text.encode()) > self.max_payload_bytes:
            raise InvalidPayload(
                f"payload is {len(text.encode())} bytes stored, over max_payload_bytes="
                f"{self.max_payload_bytes}"
            )
        token = new_token()
        first: Taken | None = None
        submit_take = getattr(self._store, "mb_submit_take", None)
        if submit_take is not None and not self.debounce:  # debounce: the first take waits
            status, dropped, first = await submit_take(
                self.name,
                key,
                text,
                max_pending=self.max_pending,
                drop_oldest=self.drop_oldest,
                token=token,
                lease=self.gate.lease,
                limit=self.max_batch,
            )
        else:
            status, dropped = await self._store.mb_submit(
                self.name,
                key,
                text,
                max_pending=self.max_pending,
                drop_oldest=self.drop_oldest,
                token=token,
                lease=self.gate.lease,
            )
        if status == -1:
            self.gate.metrics.count("mailbox_rejected", mailbox=self.name)
            raise MailboxFull(
                f"mailbox {self.name!r} holds {self.max_pending} messages for key {key!r}",
                key=key,
                mailbox=self.name,
            )
        self.gate.metrics.count("mailbox_submitted", mailbox=self.name)
        if dropped:
            self.gate.metrics.count("mailbox_dropped", mailbox=self.name)
            logger.warning(
                "inturn: mailbox %r dropped the oldest message of key %r (max_pending=%d)",
                self.name,
                key,
                self.max_pending,
                extra={"inturn_key": key},
            )
        if status == 1:
            await self._store.mb_hint(self.name, key, True)
            await self._start_drain(key, token, first)

    async def _start_drain(self, key: str, token: str, first: Taken | None = None) -> None:
        if self.inline:
            await self._drain(key, token, first)
            return
        task = asyncio.ensure_future(self._drain(key, token, first))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def pending(self, key: str | int) -> int:
        """Messages waiting in ``key``'s queue (not counting those in flight)."""
        return await self._store.mb_pending(self.name, normalize_key(key))

    async def is_draining(self, key: str | int) -> bool:
        """True while a live drainer owns ``key``'s queue."""
        return await self._store.mb_draining(self.name, normalize_key(key))

    async def drained(self, timeout: float | None = None) -> bool:
        """Wait until this process's background drains are finished; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._drains:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            await asyncio.wait(list(self._drains), timeout=left)
        return True

    # -- draining ---------------------------------------------------------------------

    async def _drain(self, key: str, token: str, first: Taken | None = None) -> None:
        """Process ``key``'s queue until it is empty (role given up) or the role is lost.

        ``first``: the first batch, when the submit that made us drainer took it.
        """
        renewer = asyncio.ensure_future(self._renew_role(key, token))
        # The drainer needs only its role to take; it takes the key's turn to process.
        # A batch is acknowledged by the next take, and where the backend can, that take
        # rides on the turn's release: per message MB_SUBMIT, JOIN and MB_RELEASE_TAKE.
        release_take = getattr(self._store, "mb_release_take", None) if not self.debounce else None
        taken: Taken | None = first
        ack = False
        try:
            while True:
                if taken is None:
                    if self.debounce:
                        await self._settle(key)
                    taken = await self._store.mb_take(
                        self.name, key, token, limit=self.max_batch, lease=self.gate.lease, ack=ack
                    )
                if taken.lost_role:
                    logger.warning(
                        "inturn: mailbox %r lost the drainer role of key %r",
                        self.name,
                        key,
                        extra={"inturn_key": key},
                    )
                    return
                if taken.wait:
                    await asyncio.sleep(taken.wait)  # a retry's backoff
                    taken, ack = None, False
                    continue
                if not taken.messages:
                    return  # empty: the role was given up in the same step
                batch, taken, ack = taken.messages, None, False
                request = self.gate.turn(key)
                step = _Step()
                if release_take is not None:
                    request.release_with = functools.partial(
                        self._release_and_take, release_take, token, step
                    )
                async with request as turn:
                    step.ack = await self._process(key, token, batch, turn.fence)
                ack = step.ack
                if step.released:
                    # If the combined call failed it may or may not have run: take again
                    # without acknowledging (a redelivery, never a loss). It is not called
                    # at all when the turn was re-entered (an inline drain inside a turn).
                    taken, ack = step.taken, False
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("inturn: mailbox %r drain of key %r failed", self.name, key)
        finally:
            renewer.cancel()

    async def _release_and_take(
        self,
        release_take: Callable[..., Awaitable[Taken]],
        token: str,
        step: _Step,
        turn_key: str,
        turn_token: str,
    ) -> None:
        step.released = True
        step.taken = await release_take(
            self.name,
            turn_key,
            token,
            turn_token,
            limit=self.max_batch,
            lease=self.gate.lease,
            ack=step.ack,
        )

    async def _renew_role(self, key: str, token: str) -> None:
        lease = self.gate.lease
        while True:
            await asyncio.sleep(lease / 3)
            with contextlib.suppress(Exception):
                if not await self._store.mb_renew(self.name, key, token, lease=lease):
                    return

    async def _settle(self, key: str) -> None:
        """Debounce: wait until no message arrived for ``debounce`` s (at most ``debounce_max``)."""
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
        try:
            await self._run_handler(key, token, stored, messages, fence)
        except _Handled as handled:
            return handled.dead  # a retry was put back at the head: nothing to acknowledge
        return True

    async def _run_handler(
        self,
        key: str,
        token: str,
        stored: list[dict[str, Any]],
        messages: list[Message],
        fence: int,
    ) -> None:
        """Claim the ids (dedup), call the handler; on failure record it and raise _Handled."""
        async with contextlib.AsyncExitStack() as claims:
            fresh = []
            for message in messages:
                if message.id is None:
                    fresh.append(message)
                    continue
                try:
                    await claims.enter_async_context(
                        self._dedup.claim(key, message.id, fence=fence)
                    )
                except Duplicate:
                    continue  # processed before (a redelivery or a resubmit): effect once
                fresh.append(message)
            metrics, now = self.gate.metrics, time.time()
            for message in fresh:
                metrics.observe(
                    "mailbox_latency_seconds", now - message.enqueued_at, mailbox=self.name
                )
            try:
                if fresh:
                    await self.handler(fresh if self.batch else fresh[0])
                    metrics.count("mailbox_handled", len(fresh), mailbox=self.name)
            except Exception as exc:
                dead = await self._failed(key, token, stored, exc)
                raise _Handled(dead) from exc  # abandons the claims: a retry may run

    async def _failed(
        self, key: str, token: str, stored: list[dict[str, Any]], exc: BaseException
    ) -> bool:
        """Retry (False) or dead-letter (True) a failed message or batch."""
        attempts = stored[0]["a"] + 1
        error = f"{type(exc).__name__}: {exc}"
        self.gate.metrics.count("mailbox_failures", mailbox=self.name)
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
            for s in stored:
                s["a"] = attempts
                s["nb"] = time.time() + pause
            await self._store.mb_retry(self.name, key, token, [json.dumps(s) for s in stored])
            return False
        logger.error(
            "inturn: mailbox %r gave up on %d message(s) of key %r after %d attempts: %s",
            self.name,
            len(stored),
            key,
            attempts,
            error,
            extra={"inturn_key": key},
        )
        now = time.time()
        dead = [json.dumps({"m": s, "e": error, "at": now, "n": attempts}) for s in stored]
        await self._store.mb_dead(self.name, dead)
        self.gate.metrics.count("mailbox_dead_letters", len(dead), mailbox=self.name)
        return True

    # -- sweeping and inspecting ------------------------------------------------------

    async def sweep(self) -> int:
        """Resume the queues whose drainer died; returns how many were resumed.

        Safe to run in every worker at once: one of them wins each key's role.
        """
        resumed = 0
        for key in await self._store.mb_hinted(self.name):
            token = new_token()
            status = await self._store.mb_claim(self.name, key, token, lease=self.gate.lease)
            if status == -1:
                await self._store.mb_hint(self.name, key, False)
            elif status == 1:
                resumed += 1
                logger.info("inturn: mailbox %r resumed key %r", self.name, key)
                task = asyncio.ensure_future(self._drain(key, token))
                self._drains.add(task)
                task.add_done_callback(self._drains.discard)
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
        letters = []
        for text in await self._store.mb_dead_letters(self.name, limit):
            d = json.loads(text)
            m = d["m"]
            letters.append(
                DeadLetter(
                    key=m["k"],
                    id=m["i"],
                    payload=m["p"],
                    enqueued_at=m["t"],
                    attempts=d["n"],
                    error=d["e"],
                    failed_at=d["at"],
                )
            )
        return letters

    async def aclose(self, timeout: float = 10.0) -> None:
        """Stop the sweeper; let drains finish for ``timeout`` s, then cancel the rest.

        A cancelled drain leaves its messages stored (the one in flight too): the
        sweeper of another process, or of the next start, delivers them.
        """
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(BaseException):
                await self._sweeper
        if not await self.drained(timeout):
            for task in list(self._drains):
                task.cancel()
            await asyncio.gather(*list(self._drains), return_exceptions=True)


@dataclass(slots=True)
class _Step:
    """One drained batch: whether to acknowledge it, and the next batch taken on release."""

    ack: bool = False
    released: bool = False
    taken: Taken | None = None


class _Handled(Exception):
    """The handler failed and the failure was recorded (retry, or dead letter: ``dead``)."""

    def __init__(self, dead: bool) -> None:
        super().__init__(dead)
        self.dead = dead
