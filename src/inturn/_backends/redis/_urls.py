"""Redis URLs (``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://``,
``redis+cluster://``) turned into redis-py client factories, one async and one sync.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.cluster
import redis.exceptions
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from inturn._errors import ConfigurationError

from ._errors import unknown_host
from ._shared import CONNECT_TIMEOUT, MAX_CONNECTIONS, SOCKET_TIMEOUT, ReplicaWait

__all__ = [
    "aclose_client",
    "close_client",
    "factories",
    "masked",
    "replica_wait",
    "wait_options",
]


def masked(url: str) -> str:
    """The URL with its password (in the user part or a ``password=`` parameter) as ``***``."""
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc:
        auth, _, hosts = parts.netloc.rpartition("@")
        user, colon, _ = auth.partition(":")
        parts = parts._replace(netloc=f"{user}:***@{hosts}" if colon else f"***@{hosts}")
    if "password=" in parts.query:
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        hidden = [(k, "***" if k == "password" else v) for k, v in query]
        parts = parts._replace(query=urllib.parse.urlencode(hidden, safe="*/"))
    return urllib.parse.urlunsplit(parts)


_WAIT_OPTIONS = ("wait_replicas", "wait_timeout")


def wait_options(url: str) -> tuple[str, tuple[int, float]]:
    """The URL without inturn's ``wait_replicas`` and ``wait_timeout`` parameters (redis-py
    does not know them), and their values (default 0 replicas, 0.1 s)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    found = {k: v for k, v in query if k in _WAIT_OPTIONS}
    if not found:
        return url, (0, 0.1)
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k not in _WAIT_OPTIONS], safe="/")
    try:
        replicas = int(found.get("wait_replicas", "0"))
        timeout = float(found.get("wait_timeout", "0.1"))
    except ValueError as exc:
        raise ConfigurationError(f"bad wait_replicas or wait_timeout in {masked(url)!r}") from exc
    return urllib.parse.urlunsplit(parts._replace(query=rest)), (replicas, timeout)


def replica_wait(replicas: int, timeout: float) -> ReplicaWait | None:
    """What a submit waits for (None: nothing), checked."""
    if replicas < 0 or timeout < 0:
        raise ConfigurationError("wait_replicas and wait_timeout must not be negative")
    if not replicas:
        return None
    return ReplicaWait(replicas, timeout)


class _Refused(Exception):
    """Carries a refused login or an unknown host past a Retry (it retries
    ConnectionError, their base)."""

    def __init__(self, error: redis.exceptions.ConnectionError) -> None:
        super().__init__(error)
        self.error = error


def _final(exc: redis.exceptions.ConnectionError) -> bool:
    """A connect failure that trying again at once cannot cure."""
    return isinstance(exc, redis.exceptions.AuthenticationError) or unknown_host(exc)


class _SyncRetry(Retry):
    """redis-py's Retry, except that a refused login (a wrong password) or a host name that
    does not exist is not tried again: the caller learns it at once, not after the backoff."""

    def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        def once() -> Any:
            try:
                return do()
            except redis.exceptions.ConnectionError as exc:
                if _final(exc):
                    raise _Refused(exc) from None
                raise

        try:
            return super().call_with_retry(once, fail, *args, **kwargs)
        except _Refused as refused:
            error = refused.error
        raise error  # outside the except: its own cause (the resolver's error) stays chained


class _AsyncRetry(redis.asyncio.retry.Retry):
    """The async twin of :class:`_SyncRetry`."""

    async def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        async def once() -> Any:
            try:
                return await do()
            except redis.exceptions.ConnectionError as exc:
                if _final(exc):
                    raise _Refused(exc) from None
                raise

        try:
            return await super().call_with_retry(once, fail, *args, **kwargs)
        except _Refused as refused:
            error = refused.error
        raise error


def _client_options(*, asynchronous: bool, cluster: bool = False) -> dict[str, Any]:
    # Each flavour needs its own Retry class: the sync one, given to an async client,
    # "succeeds" at once with an un-awaited coroutine, so nothing would ever be retried.
    retry_class = _AsyncRetry if asynchronous else _SyncRetry
    options: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_keepalive": True,
        "retry": retry_class(ExponentialBackoff(cap=0.5, base=0.05), 2),
        "retry_on_error": [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    }
    if not cluster:  # cluster clients do not take it
        options["health_check_interval"] = 30
    return options


def _hosts(netloc: str, scheme: str) -> tuple[str | None, list[tuple[str, int]]]:
    password = None
    if "@" in netloc:
        auth, _, netloc = netloc.rpartition("@")
        password = urllib.parse.unquote(auth.partition(":")[2] or auth) or None
    hosts = []
    for part in netloc.split(","):
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        if not host:
            raise ConfigurationError(f"{scheme}:// needs host:port[,host:port...], got {part!r}")
        try:
            hosts.append((host.strip("[]"), int(port or (26379 if "sentinel" in scheme else 6379))))
        except ValueError as exc:
            raise ConfigurationError(f"bad port in {part!r}") from exc
    return password, hosts


def factories(url: str) -> tuple[Any, Any]:
    """Two zero-argument factories (async client, sync client) for a URL."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    options = _client_options(asynchronous=False)
    async_options = _client_options(asynchronous=True)
    if scheme == "unix":  # a unix socket connection takes no TCP keepalive
        del options["socket_keepalive"], async_options["socket_keepalive"]
    if scheme in ("redis", "rediss", "unix"):
        try:
            redis.Redis.from_url(url)  # validate now, not on first use
        except ValueError as exc:
            raise ConfigurationError(f"bad Redis URL {url!r}: {exc}") from exc

        # Blocking pools: a burst of requests waits for one of MAX_CONNECTIONS connections
        # instead of failing ("Too many connections"); waiting itself holds no connection.
        def make_async_client() -> Any:
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                url, max_connections=MAX_CONNECTIONS, timeout=CONNECT_TIMEOUT, **async_options
            )
            return redis.asyncio.Redis(connection_pool=pool)

        def make_sync_client() -> Any:
            pool = redis.BlockingConnectionPool.from_url(
                url, max_connections=MAX_CONNECTIONS, timeout=CONNECT_TIMEOUT, **options
            )
            return redis.Redis(connection_pool=pool)

        return make_async_client, make_sync_client
    if scheme == "redis+cluster":
        password, hosts = _hosts(parts.netloc, scheme)
        cluster_options = _client_options(asynchronous=False, cluster=True)
        async_cluster_options = _client_options(asynchronous=True, cluster=True)

        def make_async() -> Any:
            nodes = [redis.asyncio.cluster.ClusterNode(h, p) for h, p in hosts]
            return redis.asyncio.cluster.RedisCluster(
                startup_nodes=nodes, password=password, **async_cluster_options
            )

        def make_sync() -> Any:
            nodes = [redis.cluster.ClusterNode(h, p) for h, p in hosts]  # type: ignore[no-untyped-call]
            return redis.cluster.RedisCluster(
                startup_nodes=nodes, password=password, **cluster_options
            )

        return make_async, make_sync
    if scheme == "redis+sentinel":
        password, hosts = _hosts(parts.netloc, scheme)
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ConfigurationError(
                "redis+sentinel:// needs a service name: redis+sentinel://host:26379/mymaster[/db]"
            )
        service = path[0]
        db = int(path[1]) if len(path) > 1 else 0

        def make_async_sentinel() -> Any:
            import redis.asyncio.sentinel

            sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
                hosts, socket_connect_timeout=CONNECT_TIMEOUT
            )
            client = sentinel.master_for(service, db=db, password=password, **async_options)
            client._inturn_sentinel = sentinel  # closed with the client: see aclose_client
            return client

        def make_sync_sentinel() -> Any:
            import redis.sentinel

            sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
                hosts, socket_connect_timeout=CONNECT_TIMEOUT
            )
            client = sentinel.master_for(  # type: ignore[no-untyped-call]
                service, db=db, password=password, **options
            )
            client._inturn_sentinel = sentinel  # closed with the client: see close_client
            return client

        return make_async_sentinel, make_sync_sentinel
    raise ConfigurationError(f"not a Redis URL: {url!r}")


async def aclose_client(client: Any) -> None:
    """Close a client made here, with its connection pool(s) and its Sentinel, if any."""
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        await client.aclose()  # closes every node's connections
    else:
        await client.aclose(close_connection_pool=True)
    sentinel = getattr(client, "_inturn_sentinel", None)
    if sentinel is not None:
        await sentinel.aclose()


def close_client(client: Any) -> None:
    """Close a sync client made here, with its connection pool(s) and its Sentinel, if any."""
    if isinstance(client, redis.cluster.RedisCluster):  # one pool per node
        for node in client.get_nodes():  # type: ignore[no-untyped-call]
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()
    else:
        client.connection_pool.disconnect()
    client.close()
    sentinel = getattr(client, "_inturn_sentinel", None)
    if sentinel is not None:
        sentinel.close()
