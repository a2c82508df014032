"""``inturn torture``: the long random mix of scenarios, and its table."""

from __future__ import annotations

import random
import shutil
import sys
import time
from dataclasses import dataclass, field

from inturn._torture.scenarios import SCENARIOS, Lab, Outcome, run
from inturn._torture.servers import MissingServerBinary, ServerStartError, postgres_bindir

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
        self.reported += r.overlaps_reported
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
        )
        for r in rows
    ]
    out = ["| " + " | ".join(line) + " |" for line in lines]
    out.insert(1, "|" + "|".join("---" for _ in head) + "|")
    return "\n".join(out)


def main(minutes: float, backend: str, seed: int | None) -> int:
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
        f"inturn torture: seed {seed}, {len(plan)} scenario/backend pairs, {minutes:g} min",
        flush=True,
    )
    lab = Lab()
    try:
        queue: list[tuple[str, str]] = []
        while time.monotonic() < deadline:
            if not queue:  # every pair once per round, in a random order
                queue = plan[:]
                rng.shuffle(queue)
            name, b = queue.pop()
            try:
                outcome = run(name, b, seed=rng.randrange(1 << 31), lab=lab)
            except ServerStartError as exc:
                print(f"  {name} on {b}: server did not start: {exc}", flush=True)
                continue
            rows[(name, b)].add(outcome)
            mark = "BREACH: " + "; ".join(outcome.breaches) if outcome.breaches else "ok"
            print(f"  {name:24} {b:8} {outcome.seconds:5.1f}s  {mark}", flush=True)
            lab.close()
            lab = Lab()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        lab.close()
    ran = [r for r in rows.values() if r.runs]
    print()
    print(table(ran))
    breached = [r for r in ran if r.breaches]
    for r in breached:
        print(f"NEVER ALLOWED: {r.scenario} on {r.backend}: {'; '.join(sorted(set(r.breaches)))}")
    return 1 if breached else 0
