"""The fault scenarios: each runs workers against a real server, injects its fault, checks.

A scenario is a function ``(lab, backend, rng) -> Outcome`` registered in
:data:`inturn._torture.lab.SCENARIOS`; its :class:`~inturn._torture.lab.Expect` says what must
hold under that fault. Importing this module registers them all.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
from collections import defaultdict

from inturn._torture.lab import (
    SCENARIOS,
    Expect,
    Lab,
    Outcome,
    Run,
    _backend,
    _liveness,
    _outcome,
    _turn_workers,
    breaches,
    run,
    scenario,
)
from inturn._torture.servers import HOST, RedisCluster, RedisSentinel

__all__ = ["SCENARIOS", "Expect", "Lab", "Outcome", "breaches", "run"]


@scenario("kill_holder")
def kill_holder(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """SIGKILL holders at several points: one kills itself while waiting in line, one in the
    body (holding), one right after a release, one from outside at a random moment. The
    turn passes on within the lease, nobody overlaps."""
    t0 = time.monotonic()
    with _backend(lab, backend, "kill_holder") as (run_, _, _):
        procs = [
            run_.spawn(
                f"d{i}",
                "turns",
                duration=2.5,
                hold=0.1,
                tasks=2,
                die_at=point,
                die_after=rng.randint(1, 6),
            )
            for i, point in enumerate(("waiting", "body", "released"))
        ]
        procs += _turn_workers(run_, 2, 2.5, hold=0.1, tasks=2)
        run_.ready(*procs[:3])
        run_.until_active()
        time.sleep(rng.uniform(0.1, 0.5))
        procs[3].kill()
        lab.wait(procs, 20)
        return _liveness(run_, _outcome("kill_holder", backend, Expect(exclusion=True), run_, t0))


@scenario("kill_drainer")
def kill_drainer(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """SIGKILL mailbox drainers: one right after a handler's effect (before the ack), one from
    outside at a random moment; the sweeper resumes their queues: none lost. A message whose
    effect was applied but not acknowledged may be applied again (a duplicate effect: counted,
    at-least-once)."""
    t0 = time.monotonic()
    with _backend(lab, backend, "kill_drainer") as (run_, _, _):
        keys = [f"user:{n}" for n in range(4)]
        procs = [
            run_.spawn(
                f"m{i}",
                "mailbox",
                keys=keys,
                per_key=6,
                pace=0.02,
                hold=0.02,
                **({"die_at": "effect", "die_after": rng.randint(1, 10)} if i else {}),
            )
            for i in range(3)
        ]
        run_.ready(*procs)
        run_.until_active()
        time.sleep(rng.uniform(0.1, 0.4))
        procs[0].kill()
        lab.wait(procs, 30)
        lab.wait([run_.spawn("recover", "recover", keys=keys, duration=10)], 20)
        return _outcome("kill_drainer", backend, Expect(no_loss=True), run_, t0)


@scenario("sigstop_holder")
def sigstop_holder(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """SIGSTOP a holder past its lease, then SIGCONT: it may overlap, it must be told."""
    t0 = time.monotonic()
    with _backend(lab, backend, "sigstop_holder", lease=0.5) as (run_, _, _):
        procs = _turn_workers(run_, 3, 3.0, hold=0.2, tasks=2)
        run_.until_active()
        time.sleep(rng.uniform(0.1, 0.5))
        procs[0].send_signal(signal.SIGSTOP)
        time.sleep(run_.lease * 3)
        procs[0].send_signal(signal.SIGCONT)
        lab.wait(procs, 30)
        return _liveness(
            run_, _outcome("sigstop_holder", backend, Expect(exclusion=False), run_, t0)
        )


@scenario("blocked_loop")
def blocked_loop(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """A holder's event loop blocked (time.sleep) past its lease: told when it runs again."""
    t0 = time.monotonic()
    with _backend(lab, backend, "blocked_loop", lease=0.5) as (run_, _, _):
        procs = [
            run_.spawn("w0", "turns", duration=2.5, hold=0.1, tasks=2, block=1.2, block_p=0.3),
            run_.spawn("w1", "turns", duration=2.5, hold=0.1, tasks=2),
        ]
        run_.ready(*procs)
        lab.wait(procs, 30)
        return _outcome("blocked_loop", backend, Expect(exclusion=False), run_, t0)


def _restart_redis(
    lab: Lab, name: str, options: dict[str, str], rng: random.Random, no_loss: bool
) -> Outcome:
    t0 = time.monotonic()
    with _backend(lab, "redis", name, redis_options=options) as (run_, server, _):
        keys = [f"user:{n}" for n in range(4)]
        procs = _turn_workers(run_, 2, 3.0, hold=0.1, tasks=2)
        procs.append(run_.spawn("m0", "mailbox", keys=keys, per_key=8, pace=0.03, drain_timeout=8))
        run_.ready(procs[-1])
        run_.until_active(4)
        time.sleep(rng.uniform(0.1, 0.5))
        server.kill()
        time.sleep(0.3)
        server.start()
        lab.wait(procs, 40)
        lab.wait([run_.spawn("recover", "recover", keys=keys, duration=10)], 20)
        out = _outcome(name, "redis", Expect(exclusion=False, no_loss=no_loss), run_, t0)
        return _liveness(run_, out)


@scenario("redis_restart_aof", ("redis",))
def redis_restart_aof(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """kill -9 Redis with AOF appendfsync always, restart: no acknowledged message lost;
    leases that lapsed meanwhile are reported to their holders."""
    options = {"appendonly": "yes", "appendfsync": "always"}
    return _restart_redis(lab, "redis_restart_aof", options, rng, no_loss=True)


@scenario("redis_restart_empty", ("redis",))
def redis_restart_empty(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """kill -9 Redis without persistence, restart empty: leases and queued messages may be
    lost (not promised); the sink refuses stale writes and the holder is told."""
    return _restart_redis(lab, "redis_restart_empty", {}, rng, no_loss=False)


def _restart_pg(lab: Lab, name: str, mode: str, rng: random.Random) -> Outcome:
    t0 = time.monotonic()
    with _backend(lab, "postgres", name, private=True) as (run_, server, _):
        keys = [f"user:{n}" for n in range(4)]
        procs = _turn_workers(run_, 2, 3.0, hold=0.1, tasks=2)
        procs.append(run_.spawn("m0", "mailbox", keys=keys, per_key=8, pace=0.03, drain_timeout=8))
        run_.ready(procs[-1])
        run_.until_active(4)
        time.sleep(rng.uniform(0.1, 0.5))
        server.restart(mode)
        lab.wait(procs, 40)
        lab.wait([run_.spawn("recover", "recover", keys=keys, duration=10)], 20)
        out = _outcome(name, "postgres", Expect(exclusion=False, no_loss=True), run_, t0)
        return _liveness(run_, out)


@scenario("pg_restart_fast", ("postgres",))
def pg_restart_fast(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """PostgreSQL fast shutdown and start: every lock is dropped; holders are told; nothing
    committed is lost."""
    return _restart_pg(lab, "pg_restart_fast", "fast", rng)


@scenario("pg_restart_immediate", ("postgres",))
def pg_restart_immediate(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """PostgreSQL immediate shutdown (crash recovery from WAL) and start."""
    return _restart_pg(lab, "pg_restart_immediate", "immediate", rng)


@scenario("stalled_server")
def stalled_server(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """Every connection delayed (200 ms), then blackholed past the lease, then healed."""
    t0 = time.monotonic()
    with _backend(lab, backend, "stalled_server", lease=0.6) as (run_, _, proxy):
        procs = _turn_workers(run_, 2, 3.5, hold=0.1, tasks=2)
        run_.until_active()
        proxy.set_mode("delay", delay_ms=200)
        time.sleep(0.6)
        proxy.set_mode("blackhole")
        time.sleep(run_.lease * 2)
        proxy.set_mode("pass")
        lab.wait(procs, 40)
        return _liveness(
            run_, _outcome("stalled_server", backend, Expect(exclusion=False), run_, t0)
        )


@scenario("partition_one")
def partition_one(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """One worker's connections blackholed longer than the lease, the others untouched."""
    t0 = time.monotonic()
    with _backend(lab, backend, "partition_one", lease=0.6) as (run_, _, proxy):
        procs = _turn_workers(run_, 3, 3.5, hold=0.15, tasks=2)
        run_.until_active()
        time.sleep(rng.uniform(0.1, 0.4))
        proxy.set_mode("blackhole", tag="w0")
        time.sleep(run_.lease * 2.5)
        proxy.set_mode("pass", tag="w0")
        lab.wait(procs, 40)
        return _liveness(
            run_, _outcome("partition_one", backend, Expect(exclusion=False), run_, t0)
        )


@scenario("long_partition")
def long_partition(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """One worker (async and threads) partitioned for 3x its calls' timeout: every call
    returns by its timeout (granted, TurnTimeout or BackendUnavailable), none hangs."""
    t0 = time.monotonic()
    timeout = 1.5
    with _backend(lab, backend, "long_partition", lease=0.6) as (run_, _, proxy):
        procs = [
            run_.spawn("w0", "turns", duration=3.0, hold=0.05, tasks=2, timeout=timeout),
            run_.spawn("w1", "turns", duration=3.0, hold=0.05, tasks=2, timeout=timeout, sync=True),
            run_.spawn("w2", "turns", duration=3.0, hold=0.05, tasks=2, timeout=timeout),
        ]
        run_.ready(*procs)
        run_.until_active(workers=("w0", "w1"))
        proxy.set_mode("blackhole", tag="w0")
        proxy.set_mode("blackhole", tag="w1")
        time.sleep(timeout * 3)
        proxy.set_mode("pass")
        lab.wait(procs, 30)
        out = _outcome("long_partition", backend, Expect(exclusion=False), run_, t0)
        # A thread's wait on a dead PostgreSQL link is cut 0.5 s past its deadline, and
        # leaving the line after a timeout takes at most 0.5 s more (LEAVE_GRACE).
        bound = timeout + 1.5
        for r in run_.records():
            waited = r["start"] - r["asked"] if r["t"] == "span" else r.get("elapsed", 0.0)
            if r["t"] in ("span", "error") and waited > bound:
                out.notes.append(
                    f"BREACH {r['worker']} waited {waited:.1f}s for {r['key']} "
                    f"(timeout {timeout}s){': ' + r['type'] if r['t'] == 'error' else ''}"
                )
        return _liveness(run_, out)


@scenario("drop_reply")
def drop_reply(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """One reply dropped at a time (the server ran it, the client never heard), over and over,
    under turns and mailbox submits: no overlap unreported, no acknowledged message lost."""
    t0 = time.monotonic()
    with _backend(lab, backend, "drop_reply") as (run_, _, proxy):
        keys = [f"user:{n}" for n in range(3)]
        procs = _turn_workers(run_, 2, 3.0, hold=0.05, tasks=2)
        procs.append(run_.spawn("m0", "mailbox", keys=keys, per_key=8, pace=0.02, drain_timeout=8))
        run_.ready(procs[-1])
        run_.until_active()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if proxy.pending_drops() == 0:
                proxy.drop_reply_once(rng.choice(run_.workers))
            time.sleep(rng.uniform(0.05, 0.15))
        lab.wait(procs, 40)
        lab.wait([run_.spawn("recover", "recover", keys=keys, duration=10)], 20)
        out = _outcome("drop_reply", backend, Expect(exclusion=False, no_loss=True), run_, t0)
        out.notes.append(f"{proxy.dropped_replies} replies dropped")
        return _liveness(run_, out)


@scenario("maxmemory", ("redis",))
def maxmemory(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """Redis full (maxmemory + noeviction): calls are refused loudly, never half-done:
    no overlap, no acknowledged message lost."""
    import redis

    t0 = time.monotonic()
    opts = {"maxmemory": "3mb", "maxmemory-policy": "noeviction"}
    with _backend(lab, "redis", "maxmemory", redis_options=opts) as (run_, server, _):
        with redis.Redis(port=server.port) as client:
            with contextlib.suppress(redis.exceptions.ResponseError):
                for n in range(10_000):
                    client.set(f"junk:{n}", "x" * 1000)
            freed = 0
            for n in range(400):  # leave some room, so some calls pass and some do not
                freed += int(client.delete(f"junk:{n}"))
        keys = [f"user:{n}" for n in range(3)]
        procs = _turn_workers(run_, 2, 2.0, hold=0.05, tasks=2, timeout=2.0)
        procs.append(run_.spawn("m0", "mailbox", keys=keys, per_key=10, pad=2000))
        run_.ready(procs[-1])
        lab.wait(procs, 40)
        with redis.Redis(port=server.port) as client:
            # room again (the junk only: the queues hold acknowledged messages), so the
            # recovery can drain them
            for junk in client.scan_iter(match="junk:*", count=1000):
                client.delete(junk)
        lab.wait([run_.spawn("recover", "recover", keys=keys, duration=10)], 30)
        return _outcome("maxmemory", "redis", Expect(exclusion=True, no_loss=True), run_, t0)


@scenario("cancel_storm")
def cancel_storm(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """Many waiters cancelled at random: no overlap, and the keys are not stuck afterwards
    (a last worker gets every key at once)."""
    t0 = time.monotonic()
    with _backend(lab, backend, "cancel_storm") as (run_, _, _):
        procs = [
            run_.spawn(f"w{i}", "turns", duration=2.0, hold=0.03, tasks=8, cancel_p=0.6)
            for i in range(2)
        ]
        run_.ready(*procs)
        lab.wait(procs, 30)
        return _liveness(run_, _outcome("cancel_storm", backend, Expect(exclusion=True), run_, t0))


@scenario("first_burst")
def first_burst(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """Fresh processes ask 5 times at once per key: each process's calls are granted in
    call order, none overlap."""
    t0 = time.monotonic()
    with _backend(lab, backend, "first_burst") as (run_, _, _):
        keys = [f"user:{n}" for n in range(4)]
        procs = [run_.spawn(f"b{i}", "burst", keys=keys) for i in range(2)]
        lab.wait(procs, 30)
        out = _outcome("first_burst", backend, Expect(exclusion=True, no_errors=True), run_, t0)
        order: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
        for r in run_.records():
            if r["t"] == "span":
                order[(r["worker"], r["key"])].append((r["fence"], r["task"]))
        spans = sum(len(v) for v in order.values())
        for (worker, key), calls in order.items():
            tasks = [t for _, t in sorted(calls)]
            if tasks != sorted(tasks):
                out.notes.append(f"BREACH {worker} {key}: calls granted in order {tasks}")
        if spans != 2 * 4 * 5:
            out.notes.append(f"BREACH {spans} of 40 calls ran")
        return out


@scenario("fork_gate")
def fork_gate(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """A gate made (and used) before fork(): parent and child both contend, no overlap."""
    t0 = time.monotonic()
    with _backend(lab, backend, "fork_gate") as (run_, _, _):
        proc = run_.spawn("f0", "fork", duration=1.5, hold=0.02, tasks=2)
        other = run_.spawn("w1", "turns", duration=1.5, hold=0.02, tasks=2)
        lab.wait([proc, other], 30)
        out = _outcome("fork_gate", backend, Expect(exclusion=True, no_errors=True), run_, t0)
        if not any(r["worker"] == "f0-child" and r["t"] == "span" for r in run_.records()):
            out.notes.append("BREACH the forked child ran no turn")
        return out


CLOSE_WITHIN = 5.0
"""Seconds a gate's close may take with callers waiting, holding and asking (the waiters
leave their lines in at most 0.5 s on Redis, 1 s on PostgreSQL)."""


@scenario("close_under_load")
def close_under_load(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """Gates closed over and over while their tasks and threads wait, hold and ask, with
    other processes contending for the same keys: no overlap; every call that a close ends
    fails with the closed error, never another; no close is slow; no key is left wedged."""
    t0 = time.monotonic()
    with _backend(lab, backend, "close_under_load") as (run_, _, _):
        procs = [run_.spawn("c0", "closing", duration=3.0, hold=0.05)]
        run_.ready(*procs)
        procs += _turn_workers(run_, 2, 3.0, hold=0.05, tasks=2)
        lab.wait(procs, 40)
        out = _outcome("close_under_load", backend, Expect(exclusion=True), run_, t0)
        mine = [r for r in run_.records() if r["worker"] == "c0"]
        odd = [r for r in mine if r["t"] == "error" and r["type"] != "TurnTimeout"]
        if odd:
            kinds = sorted({f"{r['type']}: {r['message'][:80]}" for r in odd})
            out.notes.append(f"BREACH {len(odd)} call(s) ended by a close raised {kinds}")
        closes = [r["seconds"] for r in mine if r["t"] == "close"]
        if not closes or not any(r["t"] == "closed" for r in mine):
            out.notes.append(f"BREACH no close ended a call ({len(closes)} closes)")
        elif max(closes) > CLOSE_WITHIN:
            out.notes.append(f"BREACH a close took {max(closes):.1f} s")
        return _liveness(run_, out)


HOSTILE_KEYS = [
    "nul\x00key",
    "{brace",
    "brace}",
    "{}",
    "a:b:c",
    "line\nbreak\r\n",
    "k" * 1024,
    "ключ-ユーザー-🙂",
    " ",
    "'\";--",
]


@scenario("hostile_input")
def hostile_input(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """Keys with NUL, braces, colons, newlines, 1 KiB, unicode; payloads near the 64 KiB cap:
    turns exclude, every message arrives intact."""
    t0 = time.monotonic()
    with _backend(lab, backend, "hostile_input") as (run_, _, _):
        procs = [
            run_.spawn("w0", "turns", keys=HOSTILE_KEYS, duration=1.5, hold=0.01, tasks=3),
            run_.spawn(
                "w1", "turns", keys=HOSTILE_KEYS, duration=1.5, hold=0.01, tasks=3, sync=True
            ),
            run_.spawn("m0", "mailbox", keys=HOSTILE_KEYS, per_key=2, pad=60_000),
        ]
        lab.wait(procs, 40)
        out = _outcome(
            "hostile_input", backend, Expect(exclusion=True, no_loss=True, no_errors=True), run_, t0
        )
        records = run_.records()
        handled = [r for r in records if r["t"] == "handled"]
        keys = {r["key"] for r in handled}
        accepted = {r["key"] for r in records if r["t"] == "submitted"}
        if keys != accepted:
            out.notes.append(f"BREACH keys came back changed: {sorted(keys ^ accepted)!r:.200}")
        for r in records:
            if r["t"] == "submit_error" and not r["inturn_error"]:
                out.notes.append(
                    f"BREACH submit({r['key']!r:.20}) raised a raw {r['type']}, not an "
                    f"InturnError: {r['message']}"
                )
        if not accepted:
            out.notes.append("BREACH no hostile key was accepted at all")
        if any(r["size"] < 60_000 for r in handled):
            out.notes.append("BREACH a payload came back truncated")
        return out


@scenario("cluster_failover", ("redis",))
def cluster_failover(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """Kill the Cluster master that serves the keys; its replica takes over."""
    t0 = time.monotonic()
    cluster = RedisCluster(3, {"cluster-node-timeout": "1000"}, replicas=1).start()
    lab._cleanup.append(cluster.stop)
    url = f"redis+cluster://{HOST}:{cluster.nodes[0].port}/0"
    run_ = Run(lab, "cluster_failover", lambda tag: url, 0.8)
    procs = _turn_workers(run_, 2, 4.0, hold=0.1, tasks=2, timeout=10)
    run_.until_active(4)
    victim = cluster.master_of_slot(rng.randrange(16384))
    victim.kill()
    lab.wait(procs, 60)
    # As for Sentinel: the replica may not have every grant the master acknowledged.
    return _outcome("cluster_failover", "redis", Expect(exclusion=False, reported=False), run_, t0)


def _sentinel_failover(lab: Lab, name: str, pause: bool, rng: random.Random) -> Outcome:
    t0 = time.monotonic()
    primary = lab.redis()
    replica = lab.redis({"replicaof": f"{HOST} {primary.port}"})
    sentinel = RedisSentinel(primary.port, down_after_ms=800).start()
    lab._cleanup.append(sentinel.stop)
    run_ = Run(lab, name, lambda tag: sentinel.url, 0.8)
    procs = _turn_workers(run_, 2, 4.0, hold=0.1, tasks=2, timeout=10)
    run_.until_active(4)
    if pause:
        primary.pause()
        time.sleep(3.0)
        primary.resume()
    else:
        primary.kill()
    lab.wait(procs, 60)
    # Replication is asynchronous: a grant the old master acknowledged may never reach the
    # promoted replica, and a paused master resumes still taking writes for a moment.
    out = _outcome(name, "redis", Expect(exclusion=False, reported=False), run_, t0)
    out.notes.append(f"sentinel names {sentinel.master_addr()}; replica was :{replica.port}")
    return out


@scenario("sentinel_failover_kill", ("redis",))
def sentinel_failover_kill(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """Kill the Sentinel master; the replica is promoted and the workers follow."""
    return _sentinel_failover(lab, "sentinel_failover_kill", False, rng)


@scenario("sentinel_failover_pause", ("redis",))
def sentinel_failover_pause(lab: Lab, backend: str, rng: random.Random) -> Outcome:
    """Pause the Sentinel master past down-after (it is failed over), then resume it."""
    return _sentinel_failover(lab, "sentinel_failover_pause", True, rng)
