"""The Redis engine (``redis://``, ``rediss://``, ``unix://``, Sentinel, Cluster).

Importing this package imports redis-py; a missing driver raises
:class:`~inturn.ConfigurationError` with the install hint.

Modules, lowest first (none imports one above it): ``_keys`` (key names), ``_lua``
(the scripts), ``_mux`` (pipelined script connections), ``_shared`` (limits, error
mapping, reply decoding, waiters' bookkeeping), ``_urls`` (URLs to clients),
``_doctor`` (diagnose, statistics), ``_sync`` (the sync twin), ``_async``
(:class:`RedisBackend`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from inturn._errors import ConfigurationError

try:
    import redis  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "the Redis backend needs redis-py: pip install 'inturn[redis]'"
    ) from exc

from ._async import RedisBackend
from ._sync import SyncRedisBackend

if TYPE_CHECKING:
    from inturn._backends.base import (
        Backend,
        DedupBackend,
        MailboxBackend,
        SupersedeBackend,
        SyncBackend,
        SyncDedupBackend,
        SyncMailboxBackend,
        SyncSupersedeBackend,
    )

__all__ = ["RedisBackend", "SyncRedisBackend", "from_url"]


def from_url(url: str, *, namespace: str) -> RedisBackend:
    """Build the backend for a Redis URL (the gate's scheme registry calls this)."""
    return RedisBackend.from_url(url, namespace=namespace)


if TYPE_CHECKING:  # mypy checks that both twins keep the whole contract

    def _conforms(
        a: RedisBackend, s: SyncRedisBackend
    ) -> tuple[
        Backend,
        DedupBackend,
        SupersedeBackend,
        MailboxBackend,
        SyncBackend,
        SyncDedupBackend,
        SyncSupersedeBackend,
        SyncMailboxBackend,
    ]:
        return a, a, a, a, s, s, s, s
