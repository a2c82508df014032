"""inturn: each user's work runs in turn — one at a time, in arrival order, once.

A :class:`Gate` hands out *turns* of keys (a user id, a chat id): for one key,
one holder at a time, granted in the order asked, with a fencing token and a
lease renewed in the background. Different keys run in parallel.

    gate = inturn.Gate.from_url("memory://")
    async with gate.turn(user_id, timeout=30) as turn:
        await send_ai_response(user_id, text, fence=turn.fence)

``import inturn`` loads only the standard library; backends and integrations
import their drivers when first used.
"""

from ._backend import Backend, Grant, SyncBackend
from ._errors import (
    BackendUnavailable,
    Busy,
    ConfigurationError,
    InturnError,
    InvalidKey,
    LeaseLost,
    TurnTimeout,
)
from ._gate import Gate
from ._keys import MAX_KEY_BYTES
from ._memory import MemoryBackend, SyncMemoryBackend
from ._turn import SyncTurn, SyncTurnRequest, Turn, TurnRequest

__version__ = "0.1.0"

_LAZY = {
    "RedisBackend": "inturn._redis",
    "SyncRedisBackend": "inturn._redis",
}


def __getattr__(name: str) -> object:
    """Backends with third-party drivers load on first use (``import inturn`` stays light)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'inturn' has no attribute {name!r}")


__all__ = [
    "MAX_KEY_BYTES",
    "Backend",
    "BackendUnavailable",
    "Busy",
    "ConfigurationError",
    "Gate",
    "Grant",
    "InturnError",
    "InvalidKey",
    "LeaseLost",
    "MemoryBackend",
    "RedisBackend",
    "SyncBackend",
    "SyncMemoryBackend",
    "SyncRedisBackend",
    "SyncTurn",
    "SyncTurnRequest",
    "Turn",
    "TurnRequest",
    "TurnTimeout",
    "__version__",
]
