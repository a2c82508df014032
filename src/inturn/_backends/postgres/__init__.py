"""The PostgreSQL engine (``postgresql://``, ``postgres://``).

Importing this package imports psycopg 3; a missing driver raises
:class:`~inturn.ConfigurationError` with the install hint.
"""

from ._engine import PostgresBackend, SyncPostgresBackend, from_url

__all__ = ["PostgresBackend", "SyncPostgresBackend", "from_url"]
