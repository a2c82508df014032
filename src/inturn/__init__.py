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

from ._backends.base import (
    Backend,
    BoxState,
    ClaimResult,
    DedupBackend,
    Diagnostics,
    Finding,
    Grant,
    KeyState,
    MailboxBackend,
    Migrating,
    ResumeStatus,
    Statistics,
    SubmitStatus,
    Submitted,
    SupersedeBackend,
    SyncBackend,
    SyncDedupBackend,
    SyncMailboxBackend,
    SyncMigrating,
    SyncSupersedeBackend,
    Taken,
)
from ._backends.memory import MemoryBackend, SyncMemoryBackend
from ._dedup import Claim, Deduplicator, content_id
from ._errors import (
    BackendUnavailable,
    Busy,
    ConfigurationError,
    Duplicate,
    InturnError,
    InvalidKey,
    InvalidPayload,
    LeaseLost,
    MailboxFull,
    Skipped,
    Superseded,
    TurnTimeout,
)
from ._gate import Gate
from ._keys import MAX_KEY_BYTES, log_keys
from ._mailbox import DeadLetter, Mailbox, Message
from ._metrics import InProcessMetrics, MetricsSink, Summary
from ._serialize import Serializer
from ._turn import SyncTurn, Turn
from ._turn_async import TurnRequest
from ._turn_sync import SyncTurnRequest

__version__ = "0.1.0"

_LAZY = {
    "PostgresBackend": "inturn._backends.postgres",
    "RedisBackend": "inturn._backends.redis",
    "SyncPostgresBackend": "inturn._backends.postgres",
    "SyncRedisBackend": "inturn._backends.redis",
}
"""Names whose modules import a third-party driver: loaded on first use."""


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
    "BoxState",
    "Busy",
    "Claim",
    "ClaimResult",
    "ConfigurationError",
    "DeadLetter",
    "DedupBackend",
    "Deduplicator",
    "Diagnostics",
    "Duplicate",
    "Finding",
    "Gate",
    "Grant",
    "InProcessMetrics",
    "InturnError",
    "InvalidKey",
    "InvalidPayload",
    "KeyState",
    "LeaseLost",
    "Mailbox",
    "MailboxBackend",
    "MailboxFull",
    "MemoryBackend",
    "Message",
    "MetricsSink",
    "Migrating",
    "PostgresBackend",
    "RedisBackend",
    "ResumeStatus",
    "Serializer",
    "Skipped",
    "Statistics",
    "SubmitStatus",
    "Submitted",
    "Summary",
    "SupersedeBackend",
    "Superseded",
    "SyncBackend",
    "SyncDedupBackend",
    "SyncMailboxBackend",
    "SyncMemoryBackend",
    "SyncMigrating",
    "SyncPostgresBackend",
    "SyncRedisBackend",
    "SyncSupersedeBackend",
    "SyncTurn",
    "SyncTurnRequest",
    "Taken",
    "Turn",
    "TurnRequest",
    "TurnTimeout",
    "__version__",
    "content_id",
    "log_keys",
]
