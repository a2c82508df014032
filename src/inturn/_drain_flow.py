"""The drain flow, once for both executors (see :mod:`._drain`).

:func:`drain_flow` is the algorithm: take a batch (acknowledging the last),
debounce, back off before a retry, process inside the key's turn (granted with
the batch where the engine can, joined otherwise), stop when the queue is empty
(the role given up in the same atomic step) or the role is lost. It yields
steps; an executor runs each and sends back its result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._backends.base import Grant, Taken
from ._keys import shown
from ._policy import RETRY_BACKOFF

if TYPE_CHECKING:
    from ._drain import Drainer

__all__ = [
    "TRANSIENT",
    "Debounce",
    "DrainStep",
    "Handled",
    "Pause",
    "Process",
    "Retries",
    "Role",
    "Take",
    "drain_flow",
]

logger = logging.getLogger("inturn")


@dataclass(frozen=True, slots=True)
class Take:
    """Step: take the next batch (acknowledging the last one when ``ack``). Sends a Taken.

    ``turn``: the token (and lease) the take asks the key's turn for (see ``Taken.turn``);
    a take sent again after a transport error asks with the same token."""

    ack: bool
    turn: tuple[str, float] | None = None


@dataclass(frozen=True, slots=True)
class Debounce:
    """Step: wait until no message arrived for ``debounce`` s (at most ``debounce_max``)."""


@dataclass(frozen=True, slots=True)
class Pause:
    """Step: sleep ``seconds`` (a retry's backoff)."""

    seconds: float


@dataclass(slots=True)
class Process:
    """Step: handle ``texts`` inside the key's turn. Sends back a :class:`Handled`.

    ``turn``: the turn the take granted with the batch (its token and grant), used
    once: a step run again after a transport error joins the line."""

    texts: tuple[str, ...]
    turn: tuple[str, Grant] | None = None


DrainStep = Take | Debounce | Pause | Process


@dataclass(slots=True)
class Handled:
    """One processed batch: whether to acknowledge it, and the next batch when the turn's
    release took it in the same step (``released``), with the token that release asked
    the key's next turn for (``turn_token``; see ``Taken.turn``)."""

    ack: bool = False
    released: bool = False
    taken: Taken | None = None
    turn_token: str | None = None


TRANSIENT = (ConnectionError, OSError, TimeoutError)
"""Errors a drainer rides out (BackendUnavailable is a ConnectionError): it retries the step."""


@dataclass(slots=True)
class Role:
    """The drainer's view of its role: alive until its lease, unless renewed or lost."""

    lease: float
    alive_until: float
    lost: bool = False

    @classmethod
    def taken(cls, lease: float) -> Role:
        return cls(lease=lease, alive_until=time.monotonic() + lease)

    def renewed(self, sent_at: float) -> None:
        self.alive_until = max(self.alive_until, sent_at + self.lease)

    def retry_pause(self, attempt: int) -> float | None:
        """How long to wait before retrying a step that failed in transport; None once the
        role is lost or surely lapsed (the sweeper then resumes the queue)."""
        left = self.alive_until - time.monotonic()
        if self.lost or left <= 0:
            return None
        return min(RETRY_BACKOFF[min(attempt, len(RETRY_BACKOFF) - 1)], left)


class Retries:
    """A drain step's retries after transport errors, while the drainer's role lives."""

    def __init__(self, role: Role, name: str, key: str) -> None:
        self._role, self._name, self._key = role, name, key
        self._attempt = 0

    def after(self, step: DrainStep, exc: BaseException) -> tuple[float, DrainStep] | None:
        """(pause, the step to send again), or None: the role lapsed, stop draining.

        A take whose answer was lost may have run: its batch is in flight now, so the
        retry must not acknowledge blind (the batch would be dropped unprocessed);
        without ``ack`` it is delivered again instead."""
        key = shown(self._key)
        pause = self._role.retry_pause(self._attempt)
        if pause is None:
            logger.warning(
                "inturn: mailbox %r stops draining key %r: %r, and the drainer role lapsed "
                "meanwhile (the sweeper resumes the queue)",
                self._name,
                key,
                exc,
                extra={"inturn_key": key},
            )
            return None
        logger.debug("inturn: mailbox %r retries key %r: %r", self._name, key, exc)
        self._attempt += 1
        return pause, Take(ack=False, turn=step.turn) if isinstance(step, Take) else step


def drain_flow(
    box: Drainer, key: str, first: Taken | None, turn_token: str | None = None
) -> Generator[DrainStep, Any, None]:
    """Process ``key``'s queue until it is empty (role given up) or the role is lost.

    ``first``: the first batch, when the submit that made us drainer took it;
    ``turn_token``: the token that submit asked the key's turn for (every take asks
    for the turn too).
    The drainer needs only its role to take; it takes the key's turn to process.
    A batch is acknowledged by the next take, which rides on the turn's release
    where the engine can (``mb_release_take``); where the engine grants the turn
    with the batch (``Taken.turn``), the drainer processes without joining.
    """
    taken: Taken | None = first
    ack = False
    while True:
        if taken is None:
            if box.debounce:
                yield Debounce()
            ask = box.next_turn()
            taken = yield Take(ack, ask)
            turn_token = ask[0]
        assert taken is not None
        if taken.lost_role:
            logger.warning(
                "inturn: mailbox %r lost the drainer role of key %r",
                box.name,
                shown(key),
                extra={"inturn_key": shown(key)},
            )
            return
        if taken.retry_in > 0:
            yield Pause(taken.retry_in)
            taken, ack = None, False
            continue
        if not taken.messages:
            return  # empty: the role was given up in the same step
        granted = None if taken.turn is None or turn_token is None else (turn_token, taken.turn)
        handled: Handled = yield Process(taken.messages, granted)
        taken, ack, turn_token = None, handled.ack, None
        if handled.released:
            # If the combined call failed it may or may not have run: take again without
            # acknowledging (a redelivery, never a loss). It is not called at all when the
            # turn was re-entered (an inline drain inside a turn).
            taken, ack, turn_token = handled.taken, False, handled.turn_token
