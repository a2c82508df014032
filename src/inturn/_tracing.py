"""OpenTelemetry spans for a turn's wait and hold, when ``opentelemetry-api`` is installed.

Two spans per turn, made when each phase ends (so that nothing is paid while it
runs) with the times it began and ended, as children of the span current in
the caller:

- ``inturn.wait``: from asking for the turn to getting it (or giving up);
- ``inturn.hold``: from getting the turn to releasing it.

Attributes: ``inturn.namespace``, ``inturn.backend`` (``memory``, ``redis``,
``postgres``), ``inturn.outcome`` (wait: ``granted``, ``timeout``, ``busy``,
``unavailable``, ``cancelled``, ``error``; hold: ``released``, ``lost``),
``inturn.fence`` once granted, ``inturn.lost_reason`` for a lost hold, and
``inturn.key`` as log records show keys (:func:`inturn.log_keys`,
``INTURN_LOG_KEYS``: in full, hashed or truncated).

Without the package each hook returns after one check; while no tracer
provider is set, after one clock read (a provider set later is found within
:data:`LOOK_EVERY` seconds).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from ._errors import BackendUnavailable, Busy, TurnTimeout
from ._keys import shown

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["active", "record_hold", "record_wait", "reset", "wait_outcome"]

_trace: Any = None
"""``opentelemetry.trace`` once imported (on first use: ``import inturn`` stays light)."""
_absent = False
"""True once ``opentelemetry`` failed to import: tracing is off for good."""
_tracer: Any = None
"""The tracer, once a provider is set (the API sets the global provider only once)."""
_next_look = 0.0
"""While no provider is set: when (``time.monotonic()``) to look for one again."""
_BACKENDS = {
    "MemoryBackend": "memory",
    "RedisBackend": "redis",
    "PostgresBackend": "postgres",
}

LOOK_EVERY = 1.0
"""Seconds between two looks for a tracer provider while none is set: one set later
(after the gate was made) is used within this long, and a process without one pays
one clock read per hook."""


def active() -> Any:
    """The tracer to record with, or None: no ``opentelemetry-api``, or no provider set."""
    if _tracer is not None or _absent:
        return _tracer
    now = time.monotonic()
    if now < _next_look:
        return None
    return _look(now)


def _look(now: float) -> Any:
    global _trace, _absent, _tracer, _next_look
    _next_look = now + LOOK_EVERY
    if _trace is None:
        try:
            from opentelemetry import trace
        except ImportError:  # the extra is not installed: every hook is a no-op
            _absent = True
            return None
        _trace = trace
    provider = _trace.get_tracer_provider()
    if isinstance(provider, _trace.ProxyTracerProvider | _trace.NoOpTracerProvider):
        return None
    from . import __version__

    _tracer = provider.get_tracer("inturn", __version__)
    return _tracer


def reset() -> None:
    """Forget the tracer and look for the provider again at the next hook (tests that
    swap the global provider)."""
    global _tracer, _next_look
    _tracer, _next_look = None, 0.0


def wait_outcome(exc: BaseException) -> str:
    """The ``inturn.outcome`` of a wait that ended with ``exc``."""
    if isinstance(exc, TurnTimeout):
        return "timeout"
    if isinstance(exc, Busy):
        return "busy"
    if isinstance(exc, BackendUnavailable):
        return "unavailable"
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | GeneratorExit):
        return "cancelled"
    return "error"


def _attributes(runtime: Runtime, key: str, outcome: str) -> dict[str, Any]:
    backend = type(runtime.backend).__name__
    domain = runtime.domain
    namespace = (
        domain.rpartition("#")[2]
        if "#" in domain
        else str(getattr(runtime.backend, "namespace", "default"))
    )
    return {
        "inturn.namespace": namespace,
        "inturn.backend": _BACKENDS.get(backend, backend),
        "inturn.outcome": outcome,
        "inturn.key": shown(key),
    }


def _span(
    tracer: Any, name: str, began: float, ended: float, attributes: dict[str, Any], error: str
) -> None:
    """A span from ``began`` to ``ended`` (``time.monotonic()``), in wall-clock time."""
    now_ns, now = time.time_ns(), time.monotonic()
    start_ns = now_ns - int((now - began) * 1e9)
    span = tracer.start_span(name, start_time=start_ns, attributes=attributes)
    if error:
        span.set_status(_trace.Status(_trace.StatusCode.ERROR, error))
    span.end(end_time=now_ns - int((now - ended) * 1e9))


def record_wait(
    runtime: Runtime,
    key: str,
    asked_at: float,
    *,
    fence: int | None = None,
    error: BaseException | None = None,
    ended: float | None = None,
) -> None:
    """The ``inturn.wait`` span of a request that asked at ``asked_at`` and was granted
    ``fence``, or failed with ``error``, at ``ended`` (default: now)."""
    tracer = _tracer if _tracer is not None or _absent else active()
    if tracer is None:  # no opentelemetry-api, or no provider set
        return
    ended = time.monotonic() if ended is None else ended
    outcome = "granted" if error is None else wait_outcome(error)
    attributes = _attributes(runtime, key, outcome)
    if fence is not None:
        attributes["inturn.fence"] = fence
    failed = type(error).__name__ if outcome in ("unavailable", "error") else ""
    _span(tracer, "inturn.wait", asked_at, ended, attributes, failed)


def record_hold(
    runtime: Runtime, key: str, fence: int, acquired_at: float, lost_reason: str | None
) -> None:
    """The ``inturn.hold`` span of a turn granted at ``acquired_at`` and released now."""
    tracer = _tracer if _tracer is not None or _absent else active()
    if tracer is None:  # no opentelemetry-api, or no provider set
        return
    ended = time.monotonic()
    attributes = _attributes(runtime, key, "released" if lost_reason is None else "lost")
    attributes["inturn.fence"] = fence
    if lost_reason is not None:
        attributes["inturn.lost_reason"] = lost_reason
    _span(tracer, "inturn.hold", acquired_at, ended, attributes, "")
