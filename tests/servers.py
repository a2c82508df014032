"""The throwaway servers moved to `inturn._torture.servers` (the torture CLI starts them too).

This module re-exports the same names so tests, benchmarks and scripts keep importing
`tests.servers`.
"""

from __future__ import annotations

from inturn._torture.servers import (
    HOST,
    MissingServerBinary,
    PostgresServer,
    RedisCluster,
    RedisSentinel,
    RedisServer,
    ServerStartError,
    _redis_call,
    free_port,
    postgres_bindir,
)

__all__ = [
    "HOST",
    "MissingServerBinary",
    "PostgresServer",
    "RedisCluster",
    "RedisSentinel",
    "RedisServer",
    "ServerStartError",
    "_redis_call",
    "free_port",
    "postgres_bindir",
]
