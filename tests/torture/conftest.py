"""The torture CI set runs its scenarios four at a time in one session fixture; each test
then asserts the outcome of its own scenario. Four at once keeps the folder well under two
minutes on 2 cores without starving the workers past their leases."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from inturn._torture.scenarios import SCENARIOS, Lab, Outcome
from inturn._torture.servers import MissingServerBinary

# Every scenario runs on Redis; on PostgreSQL, its own restarts and these (all of them run in
# `inturn torture --backend postgres`).
PG_IN_CI = {
    "kill_holder",
    "kill_drainer",
    "sigstop_holder",
    "partition_one",
    "drop_reply",
    "first_burst",
    "hostile_input",
    "long_partition",
    "close_under_load",
}
CI_CASES = [
    (name, backend)
    for name, s in SCENARIOS.items()
    for backend in s.backends
    if backend == "redis" or name.startswith("pg_") or name in PG_IN_CI
]
_SLOW_FIRST = ("pg_", "drop_reply", "cluster", "sentinel", "redis_restart", "long_")


class Runs:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.pool = ThreadPoolExecutor(max_workers=int(os.environ.get("TORTURE_JOBS", "4")))
        seed = int(os.environ.get("TORTURE_SEED", "7"))
        order = sorted(CI_CASES, key=lambda c: not c[0].startswith(_SLOW_FIRST))
        self.futures: dict[tuple[str, str], Future[Outcome]] = {
            case: self.pool.submit(SCENARIOS[case[0]].fn, lab, case[1], random.Random(seed))
            for case in order
        }

    def outcome(self, name: str, backend: str) -> Outcome:
        try:
            return self.futures[(name, backend)].result(timeout=300)
        except MissingServerBinary as exc:
            pytest.skip(str(exc))


@pytest.fixture(scope="session")
def torture_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    lab = Lab(tmp_path_factory.mktemp("torture"))
    runs = Runs(lab)
    yield runs
    runs.pool.shutdown(cancel_futures=True)
    lab.close()
