"""What the scenarios share: expectations, outcomes, the Lab (servers, proxies, workers), a Run.

A scenario is a function ``(lab, backend, rng) -> Outcome``. :class:`Expect` says what must
hold under that fault (0 stale writes accepted by the sink, always; the rest per scenario and
backend: exclusion, every violation reported to its holder, no acknowledged message lost,
order). :func:`breaches` lists what did not hold. Servers are started by the :class:`Lab` on
loopback ports in temp dirs and stopped at ``close()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inturn._torture.checker import Report, check, load_records
from inturn._torture.proxy import FaultProxy
from inturn._torture.servers import (
    HOST,
    PostgresServer,
    RedisServer,
    spawn,
)

__all__ = [
    "SCENARIOS",
    "Expect",
    "Lab",
    "Outcome",
    "Run",
    "Scenario",
    "breaches",
    "run",
    "scenario",
]


@dataclass(frozen=True)
class Expect:
    """What must hold. Stale writes accepted by the sink must be 0 in every scenario."""

    exclusion: bool = True
    """0 overlapping turns (the backend promises exclusion under this fault)."""
    reported: bool = True
    """Every overlap that happened was reported to the holder that was overtaken."""
    no_loss: bool = False
    """No acknowledged message lost (persistence promises it under this fault)."""
    order: bool = False
    """No FIFO breach (checked where the backend promises exact order)."""
    no_errors: bool = False
    """No call raised (a fault the library must absorb)."""


@dataclass
class Outcome:
    scenario: str
    backend: str
    expect: Expect
    report: Report
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def breaches(self) -> list[str]:
        return breaches(self)


def breaches(outcome: Outcome) -> list[str]:
    """The promises this outcome broke (empty: the scenario passed)."""
    r, e = outcome.report, outcome.expect
    found: list[str] = []
    if r.stale_accepted:
        found.append(f"{r.stale_accepted} stale write(s) accepted by the sink")
    if e.exclusion and r.overlaps:
        found.append(f"{r.overlaps} overlapping turn(s)")
    if e.exclusion and r.fence_order:
        found.append(f"{r.fence_order} turn(s) ran after a higher fence")
    if e.reported and r.silent:
        found.append(f"{r.silent} violation(s) never reported to the holder")
    if e.no_loss and r.lost_messages:
        found.append(f"{r.lost_messages} acknowledged message(s) lost")
    if e.order and r.fifo:
        found.append(f"{r.fifo} FIFO breach(es)")
    if e.no_errors and r.errors:
        found.append(f"{r.errors} call(s) raised: {r.error_types}")
    found.extend(n.removeprefix("BREACH ") for n in outcome.notes if n.startswith("BREACH"))
    return found


class Lab:
    """Servers, proxies, temp files and worker processes of a torture run; ``close()`` ends all."""

    def __init__(self, root: Path | None = None, *, postgres: PostgresServer | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="inturn-torture-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self._pg: PostgresServer | None = postgres
        """A PostgreSQL server shared with other labs (not stopped by ``close()``), or None."""
        self._cleanup: list[Callable[[], None]] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.hung: list[str] = []
        """Config paths of workers killed because they outlived their bounded wait."""

    # -- servers ----------------------------------------------------------------------
    def redis(self, options: dict[str, str] | None = None) -> RedisServer:
        server = RedisServer(options).start()
        self._cleanup.append(server.stop)
        return server

    def postgres(self) -> PostgresServer:
        if self._pg is None:
            self._pg = PostgresServer().start()
            self._cleanup.append(self._pg.stop)
        self._pg.resume()
        self._pg.start()
        return self._pg

    def postgres_db(self, private: bool = False) -> tuple[PostgresServer, str]:
        import psycopg

        if private:  # one this run may restart without disturbing the others
            server = PostgresServer().start()
            self._cleanup.append(server.stop)
        else:
            server = self.postgres()
        name = f"t_{secrets.token_hex(5)}"
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return server, name

    def proxy(self, port: int) -> FaultProxy:
        proxy = FaultProxy(port)
        self._cleanup.append(proxy.stop)
        return proxy

    # -- workers ----------------------------------------------------------------------
    def spawn(self, cfg: dict[str, Any]) -> subprocess.Popen[bytes]:
        base = Path(cfg["out"]).with_suffix("")
        path = base.with_suffix(".json")
        path.write_text(json.dumps(cfg), encoding="utf-8")
        with open(base.with_suffix(".err"), "wb") as err:
            proc = spawn(
                [sys.executable, "-m", "inturn._torture.worker", str(path)],
                stdout=subprocess.PIPE,
                stderr=err,
            )
        self.procs.append(proc)
        return proc

    def wait(self, procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
        """Wait for the workers to exit; SIGKILL (and note in ``hung``) any still running
        ``timeout`` seconds later: a worker stuck past its deadlines."""
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.hung.append(proc.args[-1] if isinstance(proc.args, list) else str(proc))
                os.kill(proc.pid, signal.SIGCONT)
                os.kill(proc.pid, signal.SIGUSR1)  # every thread's stack to its .err file
                time.sleep(0.3)
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        stops, self._cleanup = list(reversed(self._cleanup)), []

        def quietly(stop: Callable[[], None]) -> None:
            with contextlib.suppress(Exception):
                stop()

        with ThreadPoolExecutor(max_workers=8) as pool:  # servers shut down side by side
            list(pool.map(quietly, stops))


@dataclass
class Run:
    """One scenario run: its namespace, files and the workers' settings."""

    lab: Lab
    name: str
    url: Callable[[str], str]
    """The backend URL for a worker tag (through the proxy when there is one)."""
    lease: float = 0.8
    dir: Path = field(init=False)
    namespace: str = field(init=False)
    workers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.namespace = f"tt{secrets.token_hex(4)}"
        self.dir = self.lab.root / f"{self.name}-{self.namespace}"
        self.dir.mkdir(parents=True)

    @property
    def sink(self) -> Path:
        return self.dir / "sink.db"

    def spawn(self, worker: str, mode: str, **cfg: Any) -> subprocess.Popen[bytes]:
        self.workers.append(worker)
        base = {
            "mode": mode,
            "worker": worker,
            "url": self.url(worker),
            "namespace": self.namespace,
            "lease": self.lease,
            "sink": str(self.sink),
            "out": str(self.dir / f"{worker}.jsonl"),
            "keys": [f"user:{n}" for n in range(3)],
            "seed": random.randrange(1 << 30),
        }
        return self.lab.spawn({**base, **cfg, "out": str(self.dir / f"{worker}.jsonl")})

    def ready(self, *procs: subprocess.Popen[bytes]) -> None:
        for proc in procs:
            assert proc.stdout is not None
            proc.stdout.readline()

    def report(self, *, fifo: bool = False) -> Report:
        records = load_records(*(self.dir / f"{w}.jsonl" for w in self.workers))
        return check(records, self.sink, fifo=fifo)

    def until_active(
        self, spans: int = 2, within: float = 15.0, workers: tuple[str, ...] = ()
    ) -> None:
        """Wait until the workers (or each of ``workers``) have run ``spans`` turns or
        handled messages (connected and busy), so the fault lands on work in progress."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            busy = [r for r in self.records() if r["t"] in ("span", "handled")]
            if workers:
                done = min(sum(1 for r in busy if r["worker"] == w) for w in workers)
            else:
                done = len(busy)
            if done >= spans:
                return
            time.sleep(0.05)

    def records(self) -> list[dict[str, Any]]:
        return load_records(*(self.dir / f"{w}.jsonl" for w in self.workers))


@dataclass(frozen=True)
class Scenario:
    name: str
    backends: tuple[str, ...]
    fn: Callable[[Lab, str, random.Random], Outcome]
    doc: str


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    name: str, backends: tuple[str, ...] = ("redis", "postgres")
) -> Callable[
    [Callable[[Lab, str, random.Random], Outcome]], Callable[[Lab, str, random.Random], Outcome]
]:
    def register(
        fn: Callable[[Lab, str, random.Random], Outcome],
    ) -> Callable[[Lab, str, random.Random], Outcome]:
        SCENARIOS[name] = Scenario(name, backends, fn, (fn.__doc__ or "").strip())
        return fn

    return register


@contextlib.contextmanager
def _backend(
    lab: Lab,
    backend: str,
    name: str,
    lease: float = 0.8,
    redis_options: dict[str, str] | None = None,
    private: bool = False,
) -> Iterator[tuple[Run, Any, FaultProxy]]:
    """A fresh server (Redis) or database (PostgreSQL) behind a fault proxy, and a Run."""
    if backend == "redis":
        server: Any = lab.redis(redis_options)
        proxy = lab.proxy(server.port)
        run_ = Run(lab, name, lambda tag: f"redis://{HOST}:{proxy.port_for(tag)}/0", lease)
    else:
        server, db = lab.postgres_db(private)
        proxy = lab.proxy(server.port)
        run_ = Run(
            lab, name, lambda tag: f"postgresql://postgres@{HOST}:{proxy.port_for(tag)}/{db}", lease
        )
    yield run_, server, proxy


def _outcome(
    name: str,
    backend: str,
    expect: Expect,
    run_: Run,
    t0: float,
    fifo: bool = False,
    notes: list[str] | None = None,
) -> Outcome:
    notes = list(notes or [])
    for config in run_.lab.hung:
        if config.startswith(str(run_.dir)):
            worker = Path(config).stem
            notes.append(f"BREACH worker {worker} was still running past every timeout (hung)")
    return Outcome(name, backend, expect, run_.report(fifo=fifo), time.monotonic() - t0, notes)


def _liveness(run_: Run, out: Outcome) -> Outcome:
    """After the fault healed, a fresh process must get every key's turn (5 calls each)
    within 5 s: a key left wedged by the fault is a breach."""
    run_.lab.wait([run_.spawn("after", "burst", timeout=5.0)], 30)
    late = [r for r in run_.records() if r["worker"] == "after"]
    spans = sum(1 for r in late if r["t"] == "span")
    if spans != 15:
        errors = sorted({f"{r['key']}: {r['type']}" for r in late if r["t"] == "error"})
        out.notes.append(f"BREACH a key stayed wedged after the fault: {spans}/15 turns, {errors}")
    return out


def _turn_workers(run_: Run, n: int, duration: float, **cfg: Any) -> list[subprocess.Popen[bytes]]:
    procs = [
        run_.spawn(f"w{i}", "turns", duration=duration, sync=(i == n - 1 and n > 1), **cfg)
        for i in range(n)
    ]
    run_.ready(*procs)
    return procs


def run(name: str, backend: str, *, seed: int | None = None, lab: Lab | None = None) -> Outcome:
    """Run one scenario on one backend (in its own :class:`Lab` unless one is given)."""
    own = lab is None
    lab = lab or Lab()
    try:
        return SCENARIOS[name].fn(lab, backend, random.Random(seed))
    finally:
        if own:
            lab.close()
