"""Sans-I/O arithmetic shared by the async and sync turns: deadlines and lease renewal.

Nothing here sleeps, talks to a server or reads a clock by itself: every method is
given ``now`` (``time.monotonic()`` in production, any float in tests), so the
timing rules are tested without sleeping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ._errors import ConfigurationError

__all__ = [
    "RENEW_FRACTION",
    "Deadline",
    "LeaseClock",
    "OnLost",
    "TurnSettings",
    "check_lease",
    "check_max_hold",
    "check_on_lost",
    "check_timeout",
]

RENEW_FRACTION = 1 / 3
"""Renew when this fraction of the lease has passed since the last confirmed renewal."""

RETRY_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0)
"""Pauses between renewal attempts that failed for a transport error (seconds)."""

OnLost = Literal["warn", "cancel"]


def check_lease(lease: float) -> float:
    """Validate a lease length (seconds, positive and finite)."""
    if isinstance(lease, bool) or not isinstance(lease, int | float):
        raise ConfigurationError(f"lease must be a number of seconds, not {lease!r}")
    if not (0 < lease < math.inf):
        raise ConfigurationError(f"lease must be positive and finite, not {lease!r}")
    return float(lease)


def check_max_hold(max_hold: float | None) -> float | None:
    """Validate ``max_hold`` (None = renew for as long as the body runs)."""
    if max_hold is None:
        return None
    if isinstance(max_hold, bool) or not isinstance(max_hold, int | float):
        raise ConfigurationError(f"max_hold must be None or seconds, not {max_hold!r}")
    if not (0 < max_hold < math.inf):
        raise ConfigurationError(f"max_hold must be positive and finite, not {max_hold!r}")
    return float(max_hold)


def check_timeout(timeout: float | None) -> float | None:
    """Validate a wait ``timeout`` (None = wait for as long as it takes; 0 = do not wait)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ConfigurationError(f"timeout must be None or seconds, not {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise ConfigurationError(f"timeout must be None or >= 0, not {timeout!r}")
    return None if timeout == math.inf else float(timeout)


def check_on_lost(on_lost: str) -> OnLost:
    """Validate ``on_lost``: ``"warn"`` (default) or ``"cancel"``."""
    if on_lost == "warn":
        return "warn"
    if on_lost == "cancel":
        return "cancel"
    raise ConfigurationError(f"on_lost must be 'warn' or 'cancel', not {on_lost!r}")


@dataclass(frozen=True, slots=True)
class TurnSettings:
    """Per-request lease settings (the gate's defaults unless a request overrides them)."""

    lease: float
    max_hold: float | None
    on_lost: OnLost

    @property
    def first_lease(self) -> float:
        """The lease asked for with the grant: never past ``max_hold``."""
        return self.lease if self.max_hold is None else min(self.lease, self.max_hold)

    def override(
        self, lease: float | None, max_hold: float | None, on_lost: OnLost | None
    ) -> TurnSettings:
        """These settings with the given overrides validated and applied (None: keep)."""
        if lease is None and max_hold is None and on_lost is None:
            return self
        return TurnSettings(
            lease=self.lease if lease is None else check_lease(lease),
            max_hold=self.max_hold if max_hold is None else check_max_hold(max_hold),
            on_lost=self.on_lost if on_lost is None else check_on_lost(on_lost),
        )


@dataclass(frozen=True, slots=True)
class Deadline:
    """A point on the monotonic clock, or never (``at`` is ``inf``)."""

    at: float

    @classmethod
    def after(cls, timeout: float | None, now: float) -> Deadline:
        return cls(math.inf if timeout is None else now + timeout)

    def remaining(self, now: float) -> float | None:
        """Seconds left (never negative), or None for no deadline."""
        if self.at == math.inf:
            return None
        return max(0.0, self.at - now)

    def passed(self, now: float) -> bool:
        return now >= self.at


@dataclass(slots=True)
class LeaseClock:
    """The holder's own view of its lease, judged on its own monotonic clock.

    The lease is known to be alive until ``expires_at``: the send time of the
    last confirmed grant or renewal plus the time-to-live it asked for. A
    confirmation that arrives after ``expires_at`` does not count (the server
    may have handed the turn to someone else meanwhile). ``max_hold`` puts a
    hard end to renewal: the last renewals ask only for the time left, so the
    lease ends exactly at ``hold_deadline``.
    """

    lease: float
    hold_deadline: float
    expires_at: float
    confirmed_at: float
    failures: int = field(default=0)
    failed_at: float = field(default=0.0)

    @classmethod
    def start(cls, *, lease: float, max_hold: float | None, granted_at: float) -> LeaseClock:
        hold_deadline = math.inf if max_hold is None else granted_at + max_hold
        return cls(
            lease=lease,
            hold_deadline=hold_deadline,
            expires_at=min(granted_at + lease, hold_deadline),
            confirmed_at=granted_at,
        )

    def alive(self, now: float) -> bool:
        return now < self.expires_at

    def next_attempt_at(self) -> float | None:
        """When to renew next, or None when renewal has ended (``max_hold``)."""
        if self.expires_at >= self.hold_deadline:
            return None
        if self.failures:
            pause = RETRY_BACKOFF[min(self.failures, len(RETRY_BACKOFF)) - 1]
            return self.failed_at + pause
        return self.confirmed_at + self.lease * RENEW_FRACTION

    def ttl(self, now: float) -> float:
        """The time-to-live to ask for in a renewal sent at ``now``."""
        return max(0.0, min(self.lease, self.hold_deadline - now))

    def confirmed(self, *, sent_at: float, ttl: float, now: float) -> bool:
        """Record a renewal that the server confirmed; False if it came too late to count."""
        if now >= self.expires_at:
            return False
        self.failures = 0
        self.confirmed_at = sent_at
        self.expires_at = max(self.expires_at, sent_at + ttl)
        return True

    def failed(self, now: float) -> None:
        """Record a renewal attempt that did not reach the server (it will be retried)."""
        self.failures += 1
        self.failed_at = now
