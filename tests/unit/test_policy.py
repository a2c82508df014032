"""The sans-I/O lease and deadline arithmetic, on a clock the test moves."""

from __future__ import annotations

import math

import pytest

from inturn._policy import RENEW_FRACTION, Deadline, LeaseClock


def test_deadline() -> None:
    d = Deadline.after(2.0, now=10.0)
    assert d.remaining(11.5) == pytest.approx(0.5)
    assert d.remaining(13.0) == 0.0
    assert d.passed(12.0)
    never = Deadline.after(None, now=10.0)
    assert never.remaining(1e9) is None
    assert not never.passed(1e9)


def test_renewal_is_due_at_a_third_of_the_lease() -> None:
    clock = LeaseClock.start(lease=30.0, max_hold=None, granted_at=100.0)
    assert clock.expires_at == 130.0
    assert clock.next_attempt_at() == pytest.approx(100.0 + 30.0 * RENEW_FRACTION)
    assert clock.confirmed(sent_at=110.0, ttl=30.0, now=110.01)
    assert clock.expires_at == 140.0
    assert clock.next_attempt_at() == pytest.approx(120.0)


def test_a_late_confirmation_does_not_count() -> None:
    """A renewal reply that arrives after the lease would have run out means the turn is lost."""
    clock = LeaseClock.start(lease=3.0, max_hold=None, granted_at=0.0)
    assert not clock.confirmed(sent_at=2.9, ttl=3.0, now=3.2)
    assert not clock.alive(3.2)


def test_lease_counts_from_the_send_time_not_the_reply() -> None:
    clock = LeaseClock.start(lease=3.0, max_hold=None, granted_at=0.0)
    assert clock.confirmed(sent_at=1.0, ttl=3.0, now=2.5)
    assert clock.expires_at == 4.0


def test_failures_back_off_but_stay_inside_the_lease() -> None:
    clock = LeaseClock.start(lease=3.0, max_hold=None, granted_at=0.0)
    clock.failed(now=1.0)
    first = clock.next_attempt_at()
    assert first is not None
    assert 1.0 < first < 3.0
    clock.failed(now=first)
    second = clock.next_attempt_at()
    assert second is not None
    assert second - first > first - 1.0
    assert clock.alive(2.9)
    assert not clock.alive(3.0)


def test_max_hold_ends_renewal_exactly() -> None:
    clock = LeaseClock.start(lease=10.0, max_hold=12.0, granted_at=0.0)
    assert clock.hold_deadline == 12.0
    assert clock.ttl(now=5.0) == 7.0  # only what is left of max_hold
    assert clock.confirmed(sent_at=5.0, ttl=7.0, now=5.1)
    assert clock.expires_at == 12.0
    assert clock.next_attempt_at() is None
    assert not clock.alive(12.0)


def test_max_hold_shorter_than_lease() -> None:
    clock = LeaseClock.start(lease=30.0, max_hold=1.0, granted_at=0.0)
    assert clock.expires_at == 1.0
    assert clock.next_attempt_at() is None
    assert clock.hold_deadline < math.inf
