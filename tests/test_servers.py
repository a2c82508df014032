"""The server fixtures start real servers that answer."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest
import redis
import redis.cluster

from tests.servers import RedisCluster, RedisServer


def test_redis_url_answers_and_starts_empty(redis_url: str) -> None:
    """PING, SET and GET work, and each test sees an empty database."""
    with redis.Redis.from_url(redis_url) as client:
        assert client.ping()
        assert client.dbsize() == 0
        client.set("k", "v")
        assert client.get("k") == b"v"


def test_redis_url_is_flushed_between_tests(redis_url: str) -> None:
    """The key the previous test wrote is gone."""
    with redis.Redis.from_url(redis_url) as client:
        assert client.get("k") is None


def test_redis_restart_keeps_port_and_aof_data(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    """restart() and kill()+start() come back on the same port; appendonly keeps the data."""
    server = make_redis_server({"appendonly": "yes", "appendfsync": "always"})
    port = server.port
    with redis.Redis.from_url(server.url) as client:
        client.set("k", "v")
        server.restart()
        assert server.port == port
        assert client.get("k") == b"v"
        server.kill()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()
        assert client.get("k") == b"v"


def test_redis_pause_stalls_until_resume(make_redis_server: Callable[..., RedisServer]) -> None:
    """A paused server times clients out; after resume() it answers again."""
    server = make_redis_server()
    with redis.Redis.from_url(server.url, socket_timeout=0.2) as client:
        assert client.ping()
        server.pause()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        server.resume()
        assert client.ping()


def test_redis_options_apply(make_redis_server: Callable[..., RedisServer]) -> None:
    """Options such as maxmemory reach the server."""
    server = make_redis_server({"maxmemory": "2mb", "maxmemory-policy": "noeviction"})
    with redis.Redis.from_url(server.url) as client:
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("maxmemory") == {"maxmemory": str(2 * 1024 * 1024)}


def test_redis_cluster_serves_every_slot(redis_cluster: RedisCluster) -> None:
    """Keys on three different masters can be written and read back."""
    # ClusterNode is untyped in redis-py; from_url() would leak its bootstrap socket.
    nodes = [
        redis.cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]
        for host, port in redis_cluster.startup_nodes
    ]
    with redis.cluster.RedisCluster(startup_nodes=nodes) as client:
        keys = ["{a}k", "{b}k", "{c}k"]
        owners = {client.get_node_from_key(key).port for key in keys}
        assert len(owners) == 3
        for key in keys:
            client.set(key, key)
        assert [client.get(key) for key in keys] == [key.encode() for key in keys]


def test_postgres_dsn_answers_in_a_fresh_database(postgres_dsn: str) -> None:
    """select 1 works in a database of the test's own, with no tables yet."""
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        tables = conn.execute(
            "select count(*) from information_schema.tables where table_schema = 'public'"
        ).fetchone()
        assert tables == (0,)
        conn.execute("create table t (x int)")


def test_postgres_dsn_differs_per_test(postgres_dsn: str) -> None:
    """The table the previous test created is not here."""
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("select to_regclass('public.t')").fetchone() == (None,)
