"""Metrics hooks: what the gate counts, for any metrics system to export.

A gate reports to one :class:`MetricsSink` (``Gate(metrics=...)``); by default
an :class:`InProcessMetrics` that keeps totals you can read with
``gate.metrics.snapshot()``. Labels never include user keys (unbounded
cardinality); they name the backend, a reason, a scope or a mailbox.

Counters (``count``): ``turns_granted``, ``turn_timeouts``, ``turns_busy``,
``leases_lost{reason}``, ``dedup_duplicates{scope}``, ``calls_skipped{scope}``,
``calls_superseded{scope}``, ``mailbox_submitted{mailbox}``,
``mailbox_rejected{mailbox}``, ``mailbox_dropped{mailbox}``,
``mailbox_handled{mailbox}``, ``mailbox_failures{mailbox}``,
``mailbox_dead_letters{mailbox}``.
Observations (``observe``, seconds): ``turn_wait_seconds``,
``turn_hold_seconds``, ``mailbox_latency_seconds{mailbox}`` (submit to handler).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["InProcessMetrics", "MetricsSink", "Summary"]


@runtime_checkable
class MetricsSink(Protocol):
    """Where a gate reports. Implementations must be thread-safe and never raise."""

    def count(self, name: str, value: float = 1.0, **labels: str) -> None: ...

    def observe(self, name: str, value: float, **labels: str) -> None: ...


@dataclass(slots=True)
class Summary:
    """Totals of one observed series."""

    count: int = 0
    sum: float = 0.0
    max: float = 0.0


def _series(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    inner = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


class InProcessMetrics:
    """Keeps counters and summaries in memory; ``snapshot()`` reads them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, float] = {}
        self._summaries: dict[str, Summary] = {}

    def count(self, name: str, value: float = 1.0, **labels: str) -> None:
        series = _series(name, labels) if labels else name
        with self._lock:
            self._counters[series] = self._counters.get(series, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        series = _series(name, labels) if labels else name
        with self._lock:
            summary = self._summaries.get(series)
            if summary is None:
                summary = self._summaries[series] = Summary()
            summary.count += 1
            summary.sum += value
            if value > summary.max:
                summary.max = value

    def snapshot(self) -> dict[str, float | Summary]:
        """Every series: counters as numbers, observations as :class:`Summary` copies."""
        with self._lock:
            out: dict[str, float | Summary] = dict(self._counters)
            for series, s in self._summaries.items():
                out[series] = Summary(s.count, s.sum, s.max)
            return out
