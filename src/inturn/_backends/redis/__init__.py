"""The Redis engine (``redis://``, ``rediss://``, ``unix://``, Sentinel, Cluster).

Importing this package imports redis-py; a missing driver raises
:class:`~inturn.ConfigurationError` with the install hint.
"""

from ._engine import RedisBackend, SyncRedisBackend, from_url

__all__ = ["RedisBackend", "SyncRedisBackend", "from_url"]
