"""PostgreSQL URLs: inturn's own query options apart from libpq's, and connection settings.

URLs are ``postgresql://`` or ``postgres://`` (any libpq URL, down to a bare
``postgres://`` that takes every setting from libpq's defaults and ``PG*``
environment variables) with inturn's options ``audit=1``, ``schema=<name>``
(default ``inturn``) and ``max_connections=<n>`` (per event loop, and for the
threads).
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

import psycopg
import psycopg.conninfo

from inturn._errors import BackendUnavailable, ConfigurationError

__all__ = [
    "CONNECT_TIMEOUT",
    "TCP_KEEPALIVES",
    "connect_failure",
    "connection_kwargs",
    "masked",
    "parse_url",
]

CONNECT_TIMEOUT = 5.0
"""Seconds to connect, or to wait for a free pooled connection."""
TCP_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5}
"""libpq keepalives: a dead network is noticed in about 10 + 3 * 5 seconds."""

_OPTIONS = ("audit", "schema", "max_connections")


def parse_url(url: str) -> tuple[str, dict[str, Any]]:
    """Split a URL into the libpq conninfo and inturn's own options."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("postgresql", "postgres"):
        raise ConfigurationError(f"not a PostgreSQL URL: {url!r}")
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in pairs if k in _OPTIONS}
    rest = [(k, v) for k, v in pairs if k not in _OPTIONS]
    options: dict[str, Any] = {}
    if "audit" in ours:
        value = ours["audit"].lower()
        if value not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
            raise ConfigurationError(f"audit must be 1 or 0, not {ours['audit']!r}")
        options["audit"] = value in ("1", "true", "yes", "on")
    if "schema" in ours:
        options["schema"] = ours["schema"]
    if "max_connections" in ours:
        try:
            options["max_connections"] = int(ours["max_connections"])
        except ValueError as exc:
            raise ConfigurationError("max_connections must be an integer") from exc
    # Rebuilt by hand: urlunsplit drops the "//" of a URL without a host
    # ("postgres://", "postgresql:///db?host=/run/postgresql"), which libpq then
    # cannot read. With no host, user or database, libpq's defaults apply (PGHOST,
    # PGUSER, PGDATABASE, PGPORT, the local socket, the current user).
    query = urllib.parse.urlencode(rest)
    conninfo = f"{parts.scheme.lower()}://{parts.netloc}{parts.path}" + (
        f"?{query}" if query else ""
    )
    try:
        psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"bad PostgreSQL URL {url!r}: {exc}") from exc
    return conninfo, options


def connection_kwargs() -> dict[str, Any]:
    """What every connection inturn makes is opened with."""
    # prepare_threshold=None: no server-side prepared statements (PgBouncer in transaction
    # mode before 1.21 cannot route them); inturn's statements are tiny.
    return {
        "autocommit": True,
        "prepare_threshold": None,
        "connect_timeout": int(CONNECT_TIMEOUT),
        **TCP_KEEPALIVES,
    }


def masked(conninfo: str) -> str:
    """Where a conninfo connects, as ``postgresql://user:***@host:port/dbname`` (no secrets)."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "postgresql://?"
    user = str(parts.get("user", ""))
    secret = ":***" if parts.get("password") else ""
    at = f"{user}{secret}@" if user or secret else ""
    host = str(parts.get("host", "")) or "localhost"
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{at}{host}{port}/{parts.get('dbname', '')}"


_REFUSALS = re.compile(
    r"password authentication failed|authentication failed for user|no password supplied"
    r"|role \".*\" does not exist|database \".*\" does not exist|no pg_hba\.conf entry"
    r"|Name or service not known|nodename nor servname|No such host is known",
)
"""Connect failures that waiting does not cure: a wrong password, role or database name, a
host name that does not exist, a client the server's pg_hba.conf does not let in."""


def connect_failure(
    exc: BaseException, what: str = "connect", *, first: bool = False
) -> BackendUnavailable:
    """The caller's error for a connection that could not be made, naming libpq's cause.

    A refused login, an unknown role or database, or a host name that does not
    resolve is a mistake in the URL: not ``transient``, so nobody waits for it to pass.
    Nor is any failure of the ``first`` connection (the server was never reached:
    there is no outage to ride out, and the next call tries again).
    """
    message = " ".join(str(exc).split())  # libpq's hints come on indented lines of their own
    if _REFUSALS.search(message):
        return BackendUnavailable(
            f"PostgreSQL refused the connection ({what}): {message}", transient=False
        )
    return BackendUnavailable(f"PostgreSQL did not answer ({what}): {message}", transient=not first)
