"""``inturn torture``: the long random mix of scenarios, and its table."""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from inturn._torture.scenarios import SCENARIOS, Lab, Outcome
from inturn._torture.servers import (
    MissingServerBinary,
    PostgresServer,
    ServerStartError,
    postgres_bindir,
)

__all__ = ["Row", "main", "missing_binaries", "table"]


@dataclass
class Row:
    scenario: str
    backend: str
    runs: int = 0
    violations: int = 0
    reported: int = 0
    lost: int = 0
    duplicates: int = 0
    stale: int = 0
    breached_runs: int = 0
    breaches: list[str] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        r = outcome.report
        self.runs += 1
        self.violations += r.violations
        self.reported += r.reported
        self.lost += r.lost_messages
        self.duplicates += r.duplicate_effects
        self.stale += r.stale_accepted
        self.breaches.extend(outcome.breaches)
        self.breached_runs += bool(outcome.breaches)


def missing_binaries(backend: str) -> list[str]:
    missing: list[str] = []
    if backend in ("redis", "all"):
        missing += [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if backend in ("postgres", "all"):
        try:
            postgres_bindir()
        except MissingServerBinary:
            missing.append("PostgreSQL (initdb, pg_ctl)")
    return missing


def table(rows: list[Row]) -> str:
    head = (
        "scenario",
        "backend",
        "runs",
        "violations",
        "reported to holder",
        "messages lost",
        "duplicate effects",
        "stale writes accepted",
        "runs breaching a promise",
    )
    lines = [head] + [
        (
            r.scenario,
            r.backend,
            str(r.runs),
            str(r.violations),
            str(r.reported),
            str(r.lost),
            str(r.duplicates),
            str(r.stale),
            str(r.breached_runs),
        )
        for r in rows
    ]
    out = ["| " + " | ".join(line) + " |" for line in lines]
    out.insert(1, "|" + "|".join("---" for _ in head) + "|")
    return "\n".join(out)


def main(minutes: float, backend: str, seed: int | None, jobs: int = 3) -> int:
    missing = missing_binaries(backend)
    if missing:
        print(
            f"inturn torture: needs real servers on this machine; missing: {', '.join(missing)}",
            file=sys.stderr,
        )
        return 2
    seed = seed if seed is not None else random.randrange(1 << 31)
    rng = random.Random(seed)
    backends = ("redis", "postgres") if backend == "all" else (backend,)
    plan = [(s.name, b) for s in SCENARIOS.values() for b in s.backends if b in backends]
    rows = {key: Row(*key) for key in plan}
    deadline = time.monotonic() + minutes * 60
    print(
        f"inturn torture: seed {seed}, {len(plan)} scenario/backend pairs, {minutes:g} min, "
        f"{jobs} at a time",
        flush=True,
    )
    root = Path(tempfile.mkdtemp(prefix="inturn-torture-"))
    shared = PostgresServer().start() if "postgres" in backends else None
    lock = threading.Lock()
    queue: list[tuple[str, str]] = []

    def next_pair() -> tuple[str, str, int] | None:
        with lock:
            if time.monotonic() >= deadline:
                return None
            if not queue:  # every pair once per round, in a random order
                queue.extend(plan)
                rng.shuffle(queue)
            name, b = queue.pop()
            return name, b, rng.randrange(1 << 31)

    def worker() -> None:
        while (pair := next_pair()) is not None:
            name, b, run_seed = pair
            lab = Lab(root / f"{name}-{b}-{run_seed}", postgres=shared)
            try:
                outcome = SCENARIOS[name].fn(lab, b, random.Random(run_seed))
            except ServerStartError as exc:
                print(f"  {name} on {b}: a server did not start: {exc}", flush=True)
                continue
            finally:
                lab.close()
            with lock:
                rows[(name, b)].add(outcome)
            mark = "BREACH: " + "; ".join(outcome.breaches) if outcome.breaches else "ok"
            print(f"  {name:24} {b:8} {outcome.seconds:5.1f}s  {mark}", flush=True)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(jobs)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except KeyboardInterrupt:
        print("interrupted: finishing the runs under way", file=sys.stderr)
        with lock:
            deadline = 0.0
        for t in threads:
            t.join(120)
    finally:
        if shared is not None:
            shared.stop()
    ran = [r for r in rows.values() if r.runs]
    print()
    print(table(ran))
    breached = [r for r in ran if r.breaches]
    for r in breached:
        print(f"NEVER ALLOWED: {r.scenario} on {r.backend}: {'; '.join(sorted(set(r.breaches)))}")
    return 1 if breached else 0
