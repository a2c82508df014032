"""What an operator asks of a Redis server: is it fit for inturn, and what does it hold now.

:func:`diagnose` reads the server's version and the settings that weaken a
guarantee: an eviction policy other than ``noeviction`` can evict a held
turn's key (two holders), and without an append-only file a restart loses
queued mailbox messages and leases. :func:`statistics` lists the busy keys,
mailbox queues and dead letters of one namespace. The checks themselves are
plain functions of what the server answered (:func:`eviction_finding` also
serves the warning logged at the first connection); the async and sync
drivers only send the commands.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.exceptions
import redis.sentinel

from inturn._backends.base import BoxState, Diagnostics, Finding, KeyState, Statistics
from inturn._errors import BackendUnavailable

from ._keys import KeySpace, encode
from ._shared import SCRIPTS, ProcessChannel, is_cluster, map_errors, text

__all__ = [
    "Census",
    "diagnose",
    "eviction_finding",
    "statistics",
    "statistics_sync",
    "warn_eviction",
]

logger = logging.getLogger("inturn")

MIN_VERSION = (7, 0)
"""The scripts declare flags (``#!lua flags=allow-oom``), which Redis 7.0 introduced."""

SETTINGS = (
    "maxmemory-policy",
    "appendonly",
    "appendfsync",
    "save",
    "min-replicas-to-write",
    "min-replicas-max-lag",
)


# -- the checks -------------------------------------------------------------------------


def eviction_finding(policy: str | None) -> Finding:
    """Anything but ``noeviction`` is an error: an evicted turn key means two holders."""
    if policy is None:
        return Finding(
            "warning",
            "eviction_policy",
            "could not read maxmemory-policy (CONFIG GET refused): make sure it is noeviction",
        )
    if policy == "noeviction":
        return Finding("ok", "eviction_policy", "maxmemory-policy is noeviction")
    return Finding(
        "error",
        "eviction_policy",
        f"maxmemory-policy is {policy}: Redis may evict a held turn's key (two holders) or "
        "queued messages; set maxmemory-policy noeviction",
    )


def persistence_finding(config: Mapping[str, str]) -> Finding:
    """What a restart or a crash of the server loses, given its persistence settings."""
    if config.get("appendonly") != "yes":
        snapshots = config.get("save", "")
        since = f" since the last RDB snapshot (save {snapshots!r})" if snapshots else ""
        return Finding(
            "warning",
            "persistence",
            f"appendonly is off: a restart loses what changed{since}: queued mailbox messages "
            "and leases (two holders for a while); set appendonly yes",
        )
    fsync = config.get("appendfsync", "everysec")
    if fsync == "always":
        return Finding("ok", "persistence", "appendonly yes, appendfsync always")
    lost = "about 1 s" if fsync == "everysec" else "what the OS had not flushed (up to ~30 s)"
    return Finding(
        "warning",
        "persistence",
        f"appendfsync {fsync}: a crash can lose {lost} of writes (mailbox messages, leases); "
        "appendfsync always loses none",
    )


def version_finding(version: str | None) -> Finding:
    try:
        found = tuple(int(part) for part in (version or "").split(".")[:2])
    except ValueError:
        found = ()
    need = ".".join(map(str, MIN_VERSION))
    if len(found) == 2 and found < MIN_VERSION:
        return Finding("error", "version", f"Redis {version} is too old: inturn needs {need}+")
    if not found:
        return Finding("warning", "version", f"unknown Redis version {version!r}: need {need}+")
    return Finding("ok", "version", f"Redis {version}")


def warn_eviction(process: ProcessChannel, policy: str | None) -> None:
    """Log, once per process, that the server evicts keys (see :func:`eviction_finding`).

    Sets the process channel's ``checked_eviction``. A refused CONFIG GET
    (managed Redis) is only logged at DEBUG level here; ``diagnose`` reports it.
    """
    process.checked_eviction = True
    finding = eviction_finding(policy)
    if finding.level == "error":
        logger.warning("inturn: this Redis evicts keys: %s", finding.message)
    elif policy is None:
        logger.debug("inturn: could not read maxmemory-policy")


def replication_finding(replicas: int | None, config: dict[str, str], wait: int) -> Finding:
    """Replicas copy writes after acknowledging them: a failover loses the last ones.

    ``wait``: the replicas a submit waits for (``?wait_replicas=``). With replicas and
    neither that nor ``min-replicas-to-write``, an acknowledged submit or turn grant
    can be lost to a failover (the writes of the last replication round trip).
    """
    if not replicas:
        return Finding("ok", "replication", "no replicas: a failover cannot lose writes")
    min_replicas = max(
        (int(v) for v in config.get("min-replicas-to-write", "0").split(",")), default=0
    )
    lag = config.get("min-replicas-max-lag", "?")
    if wait or min_replicas:
        how = []
        if wait:
            how.append(f"submits wait for {wait} replica(s) (WAIT)")
        if min_replicas:
            how.append(f"min-replicas-to-write {min_replicas}, min-replicas-max-lag {lag}")
        return Finding("ok", "replication", f"{replicas} replica(s); " + "; ".join(how))
    return Finding(
        "warning",
        "replication",
        f"{replicas} replica(s), copied asynchronously: a failover loses the writes of the "
        "last replication round trip (acknowledged submits, turn grants); add "
        "?wait_replicas=1 to the URL and set min-replicas-to-write 1, min-replicas-max-lag 10",
    )


def replicas_of(reply: Any) -> int | None:
    """The fewest ``connected_slaves`` of any primary in an INFO replication reply."""
    counts = [int(info.get("connected_slaves", 0)) for info in _per_node(reply)]
    return min(counts) if counts else None


def policy_of(reply: Any) -> str | None:
    """The ``maxmemory-policy`` in a CONFIG GET reply (a Cluster's: the first node's)."""
    for config in _per_node(reply):
        value = config.get("maxmemory-policy", config.get(b"maxmemory-policy"))
        return None if value is None else text(value)
    return None


def _per_node(reply: Any) -> list[dict[Any, Any]]:
    """A reply as one dict per node: a Cluster client answers ``{node: reply}``."""
    if isinstance(reply, dict) and reply and all(isinstance(v, dict) for v in reply.values()):
        return list(reply.values())
    return [reply] if isinstance(reply, dict) else []


def _merged(replies: Any) -> dict[str, str]:
    """Settings read from every node; a setting the nodes disagree on lists each value."""
    merged: dict[str, list[str]] = {}
    for config in _per_node(replies):
        for name, value in config.items():
            values = merged.setdefault(text(name), [])
            if text(value) not in values:
                values.append(text(value))
    return {name: ",".join(values) for name, values in merged.items()}


@dataclass
class _Report:
    """The facts and findings gathered so far."""

    facts: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def info(self, reply: Any) -> None:
        info = (_per_node(reply) or [{}])[0]
        for name in ("redis_version", "redis_mode", "os"):
            if name in info:
                self.facts[name] = str(info[name])
        self.findings.append(version_finding(self.facts.get("redis_version")))

    def config(
        self, reply: Any, refused: BaseException | None, replicas: int | None, wait: int
    ) -> None:
        config = {} if refused is not None else _merged(reply)
        self.findings.append(replication_finding(replicas, config, wait))
        if replicas is not None:
            self.facts["replicas"] = str(replicas)
        self.facts.update({k: v for k, v in config.items() if k in SETTINGS})
        policies = config.get("maxmemory-policy")
        if policies is None:
            self.findings.append(eviction_finding(None))
        else:  # the worst node decides
            found = [eviction_finding(p) for p in policies.split(",")]
            self.findings.append(next((f for f in found if f.level == "error"), found[0]))
        if refused is not None:
            self.findings.append(
                Finding(
                    "warning", "persistence", f"could not read the persistence settings ({refused})"
                )
            )
        else:
            self.findings.append(persistence_finding(config))

    def scripts(self, refused: BaseException | None) -> None:
        if refused is None:
            self.findings.append(Finding("ok", "scripts", "the scripts load"))
        else:
            self.findings.append(
                Finding("error", "scripts", f"cannot load the scripts ({refused}): grant +script")
            )


def topology_of(client: Any) -> str:
    if is_cluster(client):
        return "cluster"
    pool = getattr(client, "connection_pool", None)
    sentinel_pools = (
        redis.sentinel.SentinelConnectionPool,
        redis.asyncio.sentinel.SentinelConnectionPool,
    )
    if getattr(client, "_inturn_sentinel", None) is not None or isinstance(pool, sentinel_pools):
        return "sentinel"
    return "standalone"


def server_of(client: Any) -> str:
    """Where an injected client connects (host:port or socket path; never a password)."""
    if is_cluster(client):
        nodes = client.get_nodes() or getattr(client, "startup_nodes", {})
        names = [n.name for n in (nodes.values() if isinstance(nodes, dict) else nodes)]
        return "redis+cluster://" + ",".join(sorted(names))
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


async def diagnose(client: Any, server: str, *, wait: int = 0) -> Diagnostics:
    """Check an async client's server: reachable, version, eviction, persistence, rights."""
    topology = topology_of(client)
    report = _Report()
    try:
        with map_errors("diagnose"):
            report.info(await client.info("server"))
    except BackendUnavailable as exc:
        finding = Finding("error", "reachable", str(exc))
        return Diagnostics("redis", server, topology=topology, findings=(finding,))
    except redis.exceptions.ResponseError as exc:  # INFO refused (ACL): the rest may answer
        report.findings.append(Finding("warning", "version", f"could not read INFO ({exc})"))
    target = (
        {"target_nodes": redis.asyncio.cluster.RedisCluster.PRIMARIES}
        if topology == "cluster"
        else {}
    )
    with map_errors("diagnose"):  # the server may go away half-way
        try:
            replicas = replicas_of(await client.info("replication", **target))
        except redis.exceptions.ResponseError:
            replicas = None
        try:
            reply: Any = await client.config_get("*", **target)
            refused: BaseException | None = None
        except redis.exceptions.ResponseError as exc:  # CONFIG is off on managed servers
            reply, refused = None, exc
        report.config(reply, refused, replicas, wait)
        refused = None
        try:
            for lua in SCRIPTS.values():
                await client.script_load(lua)
        except redis.exceptions.ResponseError as exc:  # NOPERM, or too old to parse them
            refused = exc
    report.scripts(refused)
    return Diagnostics(
        "redis",
        server,
        version=report.facts.get("redis_version"),
        topology=topology,
        facts=report.facts,
        findings=tuple(report.findings),
    )


# -- statistics -------------------------------------------------------------------------


def _glob(text_: str) -> str:
    """``text_`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text_)


class Census:
    """The namespace's keys, sorted into busy keys, mailbox boxes and dead-letter lists.

    Feed it the scanned names (:meth:`add`), send the commands of :meth:`reads`
    in one pipeline, and build the snapshot from their replies (:meth:`result`).
    At most ``limit`` keys and boxes are kept; more set ``truncated``.
    """

    def __init__(self, keys: KeySpace, key: str | None, limit: int) -> None:
        self.keys = keys
        self.limit = limit
        self.truncated = False
        self.turns: dict[str, str] = {}
        """user key -> its key names' common stem (owner = stem + "o", line = stem + "q")."""
        self.boxes: dict[tuple[str, str], str] = {}
        self.dead: dict[str, str] = {}
        stem = keys.prefix if key is None else f"{keys.prefix}{{{encode(key)}}}:"
        self.patterns = [_glob(stem) + "*"]
        if key is not None:
            self.patterns.append(_glob(keys.prefix + "mb:") + "*")

    def add(self, raw: bytes | str) -> None:
        full = text(raw)
        name = self.keys.parse(full)
        if name is None:
            return
        stem = full[: -len(name.kind)]
        if name.key is None:
            if name.kind == "dead" and name.mailbox is not None:
                self.dead[name.mailbox] = full
            return
        if name.mailbox is not None and name.kind in ("q", "f", "d"):
            self._keep(self.boxes, (name.mailbox, name.key), stem)
        elif name.mailbox is None and name.kind in ("o", "q"):
            self._keep(self.turns, name.key, stem)

    def _keep(self, into: dict[Any, str], what: Any, stem: str) -> None:
        if what in into:
            return
        if len(self.turns) + len(self.boxes) >= self.limit:
            self.truncated = True
            return
        into[what] = stem

    def reads(self) -> list[tuple[str, str]]:
        """The commands (method, key name) whose replies :meth:`result` takes, in order."""
        reads: list[tuple[str, str]] = []
        for stem in self.turns.values():
            reads += [("get", stem + "o"), ("pttl", stem + "o"), ("llen", stem + "q")]
        for stem in self.boxes.values():
            reads += [("llen", stem + "q"), ("llen", stem + "f"), ("exists", stem + "d")]
        reads += [("llen", dead) for dead in self.dead.values()]
        return reads

    def result(self, replies: Iterable[Any]) -> Statistics:
        it = iter(replies)
        states = []
        for key in self.turns:
            owner, pttl, waiting = next(it), int(next(it)), int(next(it))
            if owner is None and not waiting:
                continue  # freed since the scan
            holder, _, fence = text(owner).partition("|") if owner is not None else ("", "", "")
            states.append(
                KeyState(
                    key,
                    holder=holder or None,
                    fence=int(fence) if fence else None,
                    lease_left=pttl / 1000 if pttl > 0 else None,
                    waiting=waiting,
                )
            )
        boxes = []
        for mailbox, key in self.boxes:
            queued, in_flight, draining = int(next(it)), int(next(it)), bool(next(it))
            if queued or in_flight or draining:
                boxes.append(BoxState(mailbox, key, queued, in_flight, draining))
        dead = {mailbox: int(next(it)) for mailbox in self.dead}
        return Statistics(
            namespace=self.keys.namespace,
            keys=tuple(sorted(states, key=lambda s: s.key)),
            boxes=tuple(sorted(boxes, key=lambda b: (b.mailbox, b.key))),
            dead_letters={m: n for m, n in sorted(dead.items()) if n},
            truncated=self.truncated,
        )


def _pipeline(client: Any) -> Any:
    return client.pipeline() if is_cluster(client) else client.pipeline(transaction=False)


async def statistics(client: Any, keys: KeySpace, key: str | None, limit: int) -> Statistics:
    """A snapshot of the namespace through an async client (SCAN on every Cluster master)."""
    census = Census(keys, key, limit)
    with map_errors("statistics"):
        for pattern in census.patterns:
            scan: AsyncIterator[Any] = client.scan_iter(match=pattern, count=1000)
            async for raw in scan:
                census.add(raw)
        pipe = _pipeline(client)
        for method, name in census.reads():
            getattr(pipe, method)(name)
        return census.result(await pipe.execute() if census.reads() else [])


def statistics_sync(client: Any, keys: KeySpace, key: str | None, limit: int) -> Statistics:
    """:func:`statistics` through a sync client."""
    census = Census(keys, key, limit)
    with map_errors("statistics"):
        for pattern in census.patterns:
            for raw in client.scan_iter(match=pattern, count=1000):
                census.add(raw)
        pipe = _pipeline(client)
        for method, name in census.reads():
            getattr(pipe, method)(name)
        return census.result(pipe.execute() if census.reads() else [])
