"""Prometheus metrics, checked by scraping a real /metrics endpoint."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest

import inturn

prometheus_client = pytest.importorskip("prometheus_client")

from inturn.contrib.prometheus import PrometheusMetrics, serve_metrics  # noqa: E402


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            samples[series] = float(value)
    return samples


async def test_a_gate_reports_to_a_scraped_endpoint() -> None:
    """Grants, waits, holds, busy nowaits, mailbox counts and queue gauges reach /metrics,
    labelled by namespace and backend, never by user key."""
    registry = prometheus_client.CollectorRegistry()
    metrics = PrometheusMetrics(namespace="bot", backend="memory", registry=registry)
    server = serve_metrics(0, registry=registry)
    port = server.port
    gate = inturn.Gate.from_url("memory://", namespace="bot", metrics=metrics)
    try:
        async with gate.turn("user-12345"):
            with pytest.raises(inturn.Busy):
                await asyncio.ensure_future(_nowait(gate))
        release = asyncio.Event()

        async def handler(msg: inturn.Message) -> None:
            await release.wait()

        box = gate.mailbox("replies", handler=handler)
        for n in range(3):
            await box.submit("user-12345", n)
        await asyncio.sleep(0.05)
        metrics.record(await gate.statistics())
        samples = _scrape(port)
        release.set()
        assert await box.drained(5)
    finally:
        await gate.aclose()
        server.close()
    base = 'namespace="bot"'
    assert samples[f'inturn_turns_granted_total{{backend="memory",{base}}}'] >= 1
    assert samples[f'inturn_turns_busy_total{{backend="memory",{base}}}'] == 1
    assert samples[f'inturn_turn_wait_seconds_count{{backend="memory",{base}}}'] >= 1
    submitted = f'inturn_mailbox_submitted_total{{backend="memory",mailbox="replies",{base}}}'
    assert samples[submitted] == 3
    queued = f'inturn_mailbox_queued{{backend="memory",mailbox="replies",{base}}}'
    assert samples[queued] == 2  # one in flight, two waiting
    assert samples[f'inturn_busy_keys{{backend="memory",{base}}}'] == 1
    assert not any("user-12345" in series for series in samples)


async def _nowait(gate: inturn.Gate) -> None:
    async with gate.turn_nowait("user-12345"):
        pass


async def test_a_broken_series_never_breaks_the_gate() -> None:
    """A name reported with labels that do not fit its series is dropped, not raised."""
    metrics = PrometheusMetrics(registry=prometheus_client.CollectorRegistry())
    metrics.count("leases_lost", reason="expired")
    metrics.count("leases_lost", unexpected="label")  # wrong labels: logged, not raised
    metrics.observe("turn_wait_seconds", 0.1, mailbox="x")
    metrics.count("a_new_counter", kind="x")  # unknown names are exported as they come
    metrics.count("a_new_counter", kind="y")
