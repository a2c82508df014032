"""Prometheus metrics for inturn: what a gate counts and times, and its queue depths.

    from inturn.contrib.prometheus import PrometheusMetrics, serve_metrics

    metrics = PrometheusMetrics(namespace="bot", backend="redis")
    gate = inturn.Gate.from_url(url, namespace="bot", metrics=metrics)
    serve_metrics(9464)                     # an opt-in /metrics endpoint for a worker
    metrics.watch(gate, interval=15.0)      # queue depths and dead letters, from a loop

Every series carries the labels ``namespace`` and ``backend``; counters of
outcomes carry their ``reason``, ``scope`` or ``mailbox``. No series is ever
labelled by a user key: user ids are unbounded (and can be personal data).
Needs ``pip install 'inturn[metrics]'``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import inturn

try:
    import prometheus_client
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise inturn.ConfigurationError(
        "inturn.contrib.prometheus needs prometheus-client: pip install 'inturn[metrics]'"
    ) from exc

__all__ = ["MetricsServer", "PrometheusMetrics", "serve_metrics"]

logger = logging.getLogger("inturn")

COUNTERS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "turns_granted": ("Turns granted.", ()),
    "turn_timeouts": ("Waiters that gave up at their timeout.", ()),
    "turns_busy": ("turn_nowait calls that found the key busy.", ()),
    "leases_lost": ("Held turns whose lease was lost, by reason.", ("reason",)),
    "dedup_duplicates": ("Calls or messages skipped as duplicates.", ("scope",)),
    "calls_skipped": ('Calls skipped by on_busy="skip".', ("scope",)),
    "calls_superseded": ("Calls superseded by a newer one.", ("scope",)),
    "mailbox_submitted": ("Messages stored in a mailbox.", ("mailbox",)),
    "mailbox_rejected": ("Messages refused: the queue was full.", ("mailbox",)),
    "mailbox_dropped": ("Oldest messages dropped: the queue was full.", ("mailbox",)),
    "mailbox_handled": ("Messages handled.", ("mailbox",)),
    "mailbox_failures": ("Handler failures (each is retried or dead-lettered).", ("mailbox",)),
    "mailbox_dead_letters": ("Messages moved to the dead-letter list.", ("mailbox",)),
}
"""What a gate counts: name -> (help, the labels it carries besides namespace and backend)."""

HISTOGRAMS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "turn_wait_seconds": ("Seconds from asking for a turn to its grant.", ()),
    "turn_hold_seconds": ("Seconds a turn was held.", ()),
    "mailbox_latency_seconds": ("Seconds from submit to the handler.", ("mailbox",)),
}
"""What a gate times."""

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
"""Histogram buckets (seconds): from a hand-off on one host to a long LLM reply."""

GAUGES: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "busy_keys": ("Keys whose turn is held or has a line.", ()),
    "waiting": ("Requests waiting in line, over all keys.", ()),
    "mailbox_queued": ("Messages waiting in mailbox queues.", ("mailbox",)),
    "mailbox_in_flight": ("Messages taken by a drainer, not yet acknowledged.", ("mailbox",)),
    "dead_letters": ("Messages in the dead-letter list.", ("mailbox",)),
}
"""What :meth:`PrometheusMetrics.watch` reads from ``gate.statistics()``."""


class PrometheusMetrics:
    """A :class:`~inturn.MetricsSink` that exports to Prometheus (``Gate(metrics=...)``).

    Series are named ``inturn_<name>`` (counters get ``_total``) and labelled with
    ``namespace`` and ``backend`` plus the outcome label of their kind. A name the
    gate reports that is not in :data:`COUNTERS`/:data:`HISTOGRAMS` is exported
    too, with the labels it comes with. Thread-safe; never raises into the gate.
    """

    def __init__(
        self,
        *,
        namespace: str = "default",
        backend: str = "",
        registry: prometheus_client.CollectorRegistry | None = None,
        prefix: str = "inturn",
    ) -> None:
        self.registry = prometheus_client.REGISTRY if registry is None else registry
        self._constant = {"namespace": namespace, "backend": backend}
        self._prefix = prefix
        self._lock = threading.Lock()
        self._metrics: dict[str, Any] = {}
        self._watcher: asyncio.Task[None] | None = None
        for name, (doc, labels) in COUNTERS.items():
            self._make("counter", name, doc, labels)
        for name, (doc, labels) in HISTOGRAMS.items():
            self._make("histogram", name, doc, labels)
        for name, (doc, labels) in GAUGES.items():
            self._make("gauge", name, doc, labels)

    def _make(self, kind: str, name: str, doc: str, labels: Iterable[str]) -> Any:
        names = ["namespace", "backend", *labels]
        full = f"{self._prefix}_{name}"
        if kind == "counter":
            metric: Any = prometheus_client.Counter(full, doc, names, registry=self.registry)
        elif kind == "histogram":
            metric = prometheus_client.Histogram(
                full, doc, names, registry=self.registry, buckets=BUCKETS
            )
        else:
            metric = prometheus_client.Gauge(full, doc, names, registry=self.registry)
        self._metrics[name] = metric
        return metric

    def _series(self, kind: str, name: str, labels: Mapping[str, str]) -> Any:
        metric = self._metrics.get(name)
        if metric is None:
            with self._lock:
                metric = self._metrics.get(name) or self._make(
                    kind, name, f"inturn {name}", sorted(labels)
                )
        return metric.labels(**self._constant, **labels)

    def count(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add ``value`` to the counter ``name`` (see :class:`~inturn.MetricsSink`)."""
        try:
            self._series("counter", name, labels).inc(value)
        except Exception:  # a metrics sink must never break the gate
            logger.debug("inturn: could not count %s %r", name, labels, exc_info=True)

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Record ``value`` (seconds) in the histogram ``name``."""
        try:
            self._series("histogram", name, labels).observe(value)
        except Exception:
            logger.debug("inturn: could not observe %s %r", name, labels, exc_info=True)

    def record(self, snapshot: inturn.Statistics) -> None:
        """Set the gauges from a ``gate.statistics()`` snapshot."""
        c = self._constant
        self._metrics["busy_keys"].labels(**c).set(len(snapshot.keys))
        self._metrics["waiting"].labels(**c).set(sum(k.waiting for k in snapshot.keys))
        queued: dict[str, int] = {}
        in_flight: dict[str, int] = {}
        for box in snapshot.boxes:
            queued[box.mailbox] = queued.get(box.mailbox, 0) + box.queued
            in_flight[box.mailbox] = in_flight.get(box.mailbox, 0) + box.in_flight
        for gauge, values in (("mailbox_queued", queued), ("mailbox_in_flight", in_flight)):
            metric = self._metrics[gauge]
            for mailbox, value in values.items():
                metric.labels(**c, mailbox=mailbox).set(value)
        for mailbox, count in snapshot.dead_letters.items():
            self._metrics["dead_letters"].labels(**c, mailbox=mailbox).set(count)

    def watch(self, gate: inturn.Gate, *, interval: float = 15.0) -> asyncio.Task[None]:
        """Refresh the gauges from ``gate.statistics()`` every ``interval`` seconds, in a
        task of the running loop (it scans the server: keep the interval long)."""

        async def loop() -> None:
            while True:
                try:
                    self.record(await gate.statistics())
                except Exception as exc:
                    logger.warning("inturn: could not read the gate's statistics: %r", exc)
                await asyncio.sleep(interval)

        if self._watcher is not None:
            self._watcher.cancel()
        self._watcher = asyncio.ensure_future(loop())
        return self._watcher


class MetricsServer:
    """A running ``/metrics`` endpoint (from :func:`serve_metrics`); ``close()`` stops it."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server, self.thread = server, thread
        self.port: int = server.server_port

    def close(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        self.thread.join(5)


def serve_metrics(
    port: int,
    addr: str = "127.0.0.1",
    *,
    registry: prometheus_client.CollectorRegistry | None = None,
) -> MetricsServer:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread (for a worker process).

    Binds to loopback by default: pass ``addr="0.0.0.0"`` to let a scraper on another
    host in. ``port=0`` picks a free port (read it from ``.port``).
    """
    chosen = prometheus_client.REGISTRY if registry is None else registry
    server, thread = prometheus_client.start_http_server(port, addr, registry=chosen)
    return MetricsServer(server, thread)
