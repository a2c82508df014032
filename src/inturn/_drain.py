"""Draining a mailbox's queue: the flow of :mod:`._drain_flow`, run by an async and a
sync executor.

:class:`Drainer` runs :func:`._drain_flow.drain_flow` with asyncio (``drain``) or in a
thread (``drain_sync``) and holds what both share: decoding, dedup claims, the
failure policy (retry with backoff, then dead letters) and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from ._backends.base import MailboxBackend, SyncMailboxBackend, Taken
from ._dedup import Deduplicator
from ._drain_flow import (
    TRANSIENT,
    Debounce,
    DrainStep,
    Handled,
    Pause,
    Retries,
    Role,
    Take,
    drain_flow,
)
from ._errors import ConfigurationError, Duplicate
from ._keys import new_token, shown
from ._message import Message, PendingCounter
from ._runtime import Runtime, log_cleanup_failure, renewal_pool
from ._turn_async import TurnRequest
from ._turn_sync import SyncTurnRequest

__all__ = ["Drainer"]

logger = logging.getLogger("inturn")


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


class Drainer:
    """How one mailbox drains a key: the shared decisions and the two executors.

    Built by :class:`~inturn.Mailbox` with its settings; ``counter`` is the
    mailbox itself (a :class:`~inturn.Message` asks it for ``pending()``).
    """

    def __init__(
        self,
        runtime: Runtime,
        name: str,
        handler: Any,
        counter: PendingCounter,
        *,
        batch: bool,
        max_batch: int,
        debounce: float,
        debounce_max: float,
        max_attempts: int,
        backoff: tuple[float, ...],
        dedup: Deduplicator,
    ) -> None:
        if not isinstance(runtime.backend, MailboxBackend):
            raise ConfigurationError(f"{type(runtime.backend).__name__} does not keep mailboxes")
        self._runtime = runtime
        self.name = name
        self.handler = handler
        self._counter = counter
        self.batch = batch
        self.max_batch = max_batch
        self.debounce = debounce
        self.debounce_max = debounce_max
        self.max_attempts = max_attempts
        self.backoff = backoff
        self._dedup = dedup
        self._store: MailboxBackend = runtime.backend

    @property
    def _lease(self) -> float:
        return self._runtime.settings.lease

    def next_turn(self) -> tuple[str, float]:
        """A fresh token and the lease to ask the key's turn for along with a take."""
        return new_token(), self._runtime.settings.first_lease

    def _take_options(self, ack: bool, turn: tuple[str, float] | None) -> dict[str, Any]:
        """The keyword arguments of a take (``mb_take``, ``mb_release_take``)."""
        return {"limit": self.max_batch, "lease": self._lease, "ack": ack, "turn": turn}

    def release_unused(self, key: str, turn_token: str) -> None:
        """Release, in the background, a turn granted to ``turn_token`` that no request
        will use (a call that may have granted it failed, or the turn was re-entered)."""
        self._runtime.spawn(self._runtime.backend.release(key, turn_token), key, "release")

    def sync_store(self) -> SyncMailboxBackend:
        """The sync twin of the engine, as a mailbox store."""
        store = self._runtime.sync_backend
        if not isinstance(store, SyncMailboxBackend):
            raise ConfigurationError(f"{type(store).__name__} does not keep mailboxes")
        return store

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
                _mailbox=self._counter,
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
                shown(key),
                attempts,
                self.max_attempts,
                pause,
                error,
                extra={"inturn_key": shown(key)},
            )
            retry = [json.dumps({**s, "a": attempts}) for s in stored]
            return _Failure(attempts, pause, error, retry, now + pause, [])
        logger.error(
            "inturn: mailbox %r gave up on %d message(s) of key %r after %d attempts: %s",
            self.name,
            len(stored),
            shown(key),
            attempts,
            error,
            extra={"inturn_key": shown(key)},
        )
        dead = [json.dumps({"m": s, "e": error, "at": now, "n": attempts}) for s in stored]
        self._runtime.metrics.count("mailbox_dead_letters", len(dead), mailbox=self.name)
        return _Failure(attempts, 0.0, error, [], 0.0, dead)

    def _turn(self, key: str) -> TurnRequest:
        rt = self._runtime
        return TurnRequest(rt, key, timeout=None, nowait=False, settings=rt.settings)

    def _turn_sync(self, key: str) -> SyncTurnRequest:
        rt = self._runtime
        return SyncTurnRequest(rt, key, timeout=None, nowait=False, settings=rt.settings)

    # -- draining: async --------------------------------------------------------------

    async def drain(
        self, key: str, token: str, first: Taken | None = None, turn_token: str | None = None
    ) -> None:
        """Drain ``key``'s queue on this event loop (``token`` owns the drainer role;
        ``first`` and ``turn_token``: see :func:`drain_flow`)."""
        role = Role.taken(self._lease)
        renewal = _AsyncRenewal(self, key, token, role)
        flow = drain_flow(self, key, first, turn_token)
        reply: Any = None
        step: DrainStep | None = None
        try:
            while True:
                try:
                    step = flow.send(reply)
                except StopIteration:  # ``step`` is None again: nothing left asked
                    return
                retries: Retries | None = None  # made on a step's first failure only
                while True:
                    try:
                        reply = await self._step(step, key, token)
                        break
                    except TRANSIENT as exc:
                        retries = retries or Retries(role, self.name, key)
                        again = retries.after(step, exc)
                        if again is None:
                            return
                        pause, step = again
                        await asyncio.sleep(pause)
                step = None
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("inturn: mailbox %r drain of key %r failed", self.name, shown(key))
        finally:
            renewal.stop()
            if (unused := _asked_turn(step)) is not None:
                self.release_unused(key, unused)

    async def _step(self, step: DrainStep, key: str, token: str) -> Any:
        if isinstance(step, Take):
            return await self._store.mb_take(
                self.name, key, token, **self._take_options(step.ack, step.turn)
            )
        if isinstance(step, Debounce):
            await self._debounce(key)
            return None
        if isinstance(step, Pause):
            await asyncio.sleep(step.seconds)  # a retry's backoff
            return None
        handled = Handled()
        request = self._turn(key)
        granted, step.turn = step.turn, None
        if granted is not None:
            request._granted_with(*granted)
        if not self.debounce:  # debounce: the next take waits for the burst first
            request._release_with(partial(self._release_and_take, token, handled))
        try:
            async with request as turn:
                handled.ack = await self._process(key, token, step.texts, turn.fence)
        finally:
            if granted is not None and request._reused:  # not used: re-entered instead
                self.release_unused(key, granted[0])
        return handled

    async def _release_and_take(
        self, token: str, handled: Handled, turn_key: str, turn_token: str
    ) -> None:
        handled.released = True
        ask = self.next_turn()
        try:
            handled.taken = await self._store.mb_release_take(
                self.name, turn_key, token, turn_token, **self._take_options(handled.ack, ask)
            )
        except BaseException:
            self.release_unused(turn_key, ask[0])  # it may have run and granted that turn
            raise
        handled.turn_token = ask[0]

    async def _renew_role(self, key: str, token: str, role: Role) -> None:
        """Renew the role now, then every third of the lease, until it is lost."""
        lease = self._lease
        while True:
            sent = time.monotonic()
            try:
                alive = await self._store.mb_renew(self.name, key, token, lease=lease)
            except Exception as exc:  # a transport error: try again next time
                logger.debug("inturn: renewing the drainer role of %r failed: %r", shown(key), exc)
            else:
                if not alive:
                    role.lost = True
                    return
                role.renewed(sent)
            await asyncio.sleep(lease / 3)

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
        if all(message.id is None for message in messages):  # nothing to claim
            await self._handled(key, token, stored, messages)
            return
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
            await self._handled(key, token, stored, fresh)  # _Recorded abandons the claims

    async def _handled(
        self, key: str, token: str, stored: list[dict[str, Any]], fresh: list[Message]
    ) -> None:
        """Call the handler with the ``fresh`` messages; on failure record it, raise _Recorded."""
        self._delivered(fresh)
        try:
            if fresh:
                await self.handler(fresh if self.batch else fresh[0])
                self._runtime.metrics.count("mailbox_handled", len(fresh), mailbox=self.name)
        except Exception as exc:
            failure = self._failure(key, stored, exc)
            if failure.dead:
                await self._store.mb_dead(self.name, failure.dead)
            else:
                await self._store.mb_retry(
                    self.name, key, token, failure.retry, not_before=failure.not_before
                )
            raise _Recorded(bool(failure.dead)) from exc

    # -- draining: sync ---------------------------------------------------------------

    def drain_sync(
        self, key: str, token: str, first: Taken | None = None, turn_token: str | None = None
    ) -> None:
        """Drain ``key``'s queue in this thread (see :meth:`drain`)."""
        store = self.sync_store()
        role = Role.taken(self._lease)
        renewal = _RoleRenewal(self, store, key, token, role)
        flow = drain_flow(self, key, first, turn_token)
        reply: Any = None
        step: DrainStep | None = None
        try:
            while True:
                try:
                    step = flow.send(reply)
                except StopIteration:  # ``step`` is None again: nothing left asked
                    return
                retries: Retries | None = None
                while True:
                    try:
                        reply = self._step_sync(store, step, key, token)
                        break
                    except TRANSIENT as exc:
                        retries = retries or Retries(role, self.name, key)
                        again = retries.after(step, exc)
                        if again is None:
                            return
                        pause, step = again
                        time.sleep(pause)  # a transport error's backoff, bounded by the role
                step = None
        except Exception:
            logger.exception("inturn: mailbox %r drain of key %r failed", self.name, shown(key))
        finally:
            renewal.stop()
            if (unused := _asked_turn(step)) is not None:
                self.release_unused_sync(key, unused)

    def _step_sync(self, store: SyncMailboxBackend, step: DrainStep, key: str, token: str) -> Any:
        if isinstance(step, Take):
            return store.mb_take(self.name, key, token, **self._take_options(step.ack, step.turn))
        if isinstance(step, Debounce):
            self._debounce_sync(store, key)
            return None
        if isinstance(step, Pause):
            time.sleep(step.seconds)  # a retry's backoff
            return None
        handled = Handled()

        def release_and_take(turn_key: str, turn_token: str) -> None:
            handled.released = True
            ask = self.next_turn()
            try:
                handled.taken = store.mb_release_take(
                    self.name, turn_key, token, turn_token, **self._take_options(handled.ack, ask)
                )
            except BaseException:
                self.release_unused_sync(turn_key, ask[0])  # see _release_and_take
                raise
            handled.turn_token = ask[0]

        request = self._turn_sync(key)
        granted, step.turn = step.turn, None
        if granted is not None:
            request._granted_with(*granted)
        if not self.debounce:
            request._release_with(release_and_take)
        try:
            with request as turn:
                handled.ack = self._process_sync(store, key, token, step.texts, turn.fence)
        finally:
            if granted is not None and request._reused:  # see _step
                self.release_unused_sync(key, granted[0])
        return handled

    def release_unused_sync(self, key: str, turn_token: str) -> None:
        """Release a turn granted to ``turn_token`` that no request will use (threads)."""
        backend = self._runtime.sync_backend

        def release() -> None:
            try:
                backend.release(key, turn_token)
            except Exception as exc:
                log_cleanup_failure("release", key, exc)

        self._runtime.in_thread(release, "inturn-release")

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
        if all(message.id is None for message in messages):
            self._handled_sync(store, key, token, stored, messages)
            return
        with contextlib.ExitStack() as claims:
            fresh = []
            for message in messages:
                if message.id is not None:
                    try:
                        claims.enter_context(self._dedup.claim_sync(key, message.id, fence=fence))
                    except Duplicate:
                        continue
                fresh.append(message)
            self._handled_sync(store, key, token, stored, fresh)

    def _handled_sync(
        self,
        store: SyncMailboxBackend,
        key: str,
        token: str,
        stored: list[dict[str, Any]],
        fresh: list[Message],
    ) -> None:
        """See :meth:`_handled`."""
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
                store.mb_retry(self.name, key, token, failure.retry, not_before=failure.not_before)
            raise _Recorded(bool(failure.dead)) from exc


class _AsyncRenewal:
    """Renews an async drainer's role from a third of the lease on: a timer first, and a
    renewing task only once it is due. Most drains end sooner (one message, or a few),
    and a timer costs the loop far less than a task that would sleep and be cancelled."""

    __slots__ = ("_args", "_box", "_handle", "_task")

    def __init__(self, box: Drainer, key: str, token: str, role: Role) -> None:
        self._box, self._args = box, (key, token, role)
        self._task: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = loop.call_later(box._lease / 3, self._due)

    def _due(self) -> None:
        self._handle = None
        self._task = asyncio.ensure_future(self._box._renew_role(*self._args))

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._task is not None:
            self._task.cancel()


class _RoleRenewal:
    """Renews a sync drainer's role every third of the lease, on the process's timer thread."""

    def __init__(
        self, box: Drainer, store: SyncMailboxBackend, key: str, token: str, role: Role
    ) -> None:
        self._box, self._store, self._key, self._token = box, store, key, token
        self._role = role
        self._stopped = False
        self._handle = box._runtime.timers.call_at(time.monotonic() + box._lease / 3, self._due)

    def _due(self) -> None:
        """On the timer thread: renew in a worker, so a stuck server holds up nobody else."""
        if not self._stopped:
            renewal_pool().submit(self._renew)

    def _renew(self) -> None:
        box = self._box
        sent = time.monotonic()
        try:
            alive = self._store.mb_renew(box.name, self._key, self._token, lease=box._lease)
        except Exception:
            alive = True  # a transport error: try again next time
        else:
            if alive:
                self._role.renewed(sent)
            else:
                self._role.lost = True
        if alive and not self._stopped:
            self._handle = box._runtime.timers.call_at(time.monotonic() + box._lease / 3, self._due)

    def stop(self) -> None:
        self._stopped = True
        self._handle.cancel()


def _asked_turn(step: DrainStep | None) -> str | None:
    """The turn token of a take that did not finish: it may have run and granted the turn,
    which no request would then use (the drain ends here)."""
    return step.turn[0] if isinstance(step, Take) and step.turn is not None else None


class _Recorded(Exception):
    """The handler failed and the failure was recorded (retry, or dead letter: ``dead``)."""

    def __init__(self, dead: bool) -> None:
        super().__init__(dead)
        self.dead = dead
