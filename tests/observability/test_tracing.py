"""OpenTelemetry spans around a turn's wait and hold (recorded with the SDK's in-memory
exporter; the API alone, with no provider set, records nothing)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

import inturn
from inturn import _tracing

trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
export = pytest.importorskip("opentelemetry.sdk.trace.export")
in_memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[in_memory.InMemorySpanExporter]:
    """An SDK provider with an in-memory exporter, made the global one for the test."""
    exporter = in_memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    # The API lets the global provider be set once per process: swap it by hand.
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    _tracing.reset()
    yield exporter
    provider.shutdown()
    _tracing.reset()


@pytest.fixture
def hashed_keys() -> Iterator[None]:
    inturn.log_keys("hash")
    yield
    inturn.log_keys("full")


def by_name(exporter: in_memory.InMemorySpanExporter, name: str) -> list[object]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def test_wait_and_hold_spans(spans: in_memory.InMemorySpanExporter) -> None:
    gate = inturn.Gate.from_url("memory://", namespace="bot")
    tracer = trace.get_tracer("app")
    with tracer.start_as_current_span("handle update") as parent:
        async with gate.turn("user-1", timeout=5) as turn:
            await asyncio.sleep(0.05)
    await gate.aclose()
    (wait,) = by_name(spans, "inturn.wait")
    (hold,) = by_name(spans, "inturn.hold")
    for span in (wait, hold):
        assert span.parent.span_id == parent.get_span_context().span_id
        assert span.attributes["inturn.namespace"] == "bot"
        assert span.attributes["inturn.backend"] == "memory"
        assert span.attributes["inturn.fence"] == turn.fence
        assert span.attributes["inturn.key"] == "user-1"
    assert wait.attributes["inturn.outcome"] == "granted"
    assert hold.attributes["inturn.outcome"] == "released"
    assert hold.end_time - hold.start_time >= 40_000_000  # the 50 ms body, in ns
    assert wait.end_time <= hold.start_time + 1_000_000


async def test_timeout_and_busy_outcomes(spans: in_memory.InMemorySpanExporter) -> None:
    gate = inturn.Gate.from_url("memory://")
    async with gate.turn("k"):  # held by this task: the others below are other callers

        async def nowait() -> None:
            async with gate.turn_nowait("k"):
                pass

        async def other() -> None:
            async with gate.turn("k", timeout=0.1):
                pass

        with pytest.raises(inturn.Busy):
            await asyncio.create_task(nowait())
        with pytest.raises(inturn.TurnTimeout):
            await asyncio.create_task(other())
    await gate.aclose()
    outcomes = sorted(s.attributes["inturn.outcome"] for s in by_name(spans, "inturn.wait"))
    assert outcomes == ["busy", "granted", "timeout"]
    (timed_out,) = [
        s for s in by_name(spans, "inturn.wait") if s.attributes["inturn.outcome"] == "timeout"
    ]
    assert timed_out.end_time - timed_out.start_time >= 90_000_000
    assert "inturn.fence" not in timed_out.attributes


def test_sync_turns_and_a_lost_hold(spans: in_memory.InMemorySpanExporter) -> None:
    """Threads are traced alike; a hold that outlived ``max_hold`` ends as ``lost``."""
    gate = inturn.Gate.from_url("memory://", lease=1.0, max_hold=0.1)
    with gate.turn_sync("a", timeout=5):
        pass
    with gate.turn_sync("b", timeout=5) as turn:
        time.sleep(0.3)
        assert turn.lost.is_set()
    gate.close()
    holds = {s.attributes["inturn.key"]: s for s in by_name(spans, "inturn.hold")}
    assert holds["a"].attributes["inturn.outcome"] == "released"
    assert "inturn.lost_reason" not in holds["a"].attributes
    assert holds["b"].attributes["inturn.outcome"] == "lost"
    assert holds["b"].attributes["inturn.lost_reason"] == "max_hold"
    assert len(by_name(spans, "inturn.wait")) == 2


async def test_unavailable_outcome_is_an_error(
    spans: in_memory.InMemorySpanExporter, unused_tcp_port: int
) -> None:
    gate = inturn.Gate.from_url(f"redis://127.0.0.1:{unused_tcp_port}/0")
    with pytest.raises(inturn.BackendUnavailable):
        async with gate.turn("k", timeout=5):
            pass
    await gate.aclose()
    (wait,) = by_name(spans, "inturn.wait")
    assert wait.attributes["inturn.outcome"] == "unavailable"
    assert wait.attributes["inturn.backend"] == "redis"
    assert wait.status.status_code == trace.StatusCode.ERROR


async def test_keys_follow_the_log_setting(
    spans: in_memory.InMemorySpanExporter, hashed_keys: None
) -> None:
    gate = inturn.Gate.from_url("memory://")
    async with gate.turn("alice@example.com"):
        pass
    await gate.aclose()
    keys = {s.attributes["inturn.key"] for s in spans.get_finished_spans()}
    assert keys == {inturn._keys.shown("alice@example.com")}
    assert all(k.startswith("#") and "alice" not in k for k in keys)


async def test_no_provider_records_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    _tracing.reset()
    assert _tracing.active() is None
    gate = inturn.Gate.from_url("memory://")
    async with gate.turn("k"):
        pass
    await gate.aclose()
