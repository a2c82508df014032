"""The CI set of the torture suite: every scenario at least once, small (few users, leases
of 0.5-0.8 s).

Each asserts its scenario's invariant (:func:`inturn._torture.scenarios.breaches`): 0 stale
writes accepted by the fenced sink, always; 0 overlaps where the backend promises exclusion;
every violation reported to the holder that was overtaken; no acknowledged message lost where
persistence promises it; no key left wedged after the fault. `inturn torture --minutes N`
runs the same scenarios as a long random mix.
"""

from __future__ import annotations

import pytest

from tests.torture.conftest import CI_CASES, Runs

# Scenarios that fail today because of a known bug, each named in its reason.
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def _case(name: str, backend: str) -> object:
    reason = KNOWN_BUGS.get((name, backend))
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(name, backend, id=f"{name}-{backend}", marks=marks)


@pytest.mark.parametrize(("name", "backend"), [_case(*c) for c in CI_CASES])
def test_scenario_keeps_its_promises(torture_runs: Runs, name: str, backend: str) -> None:
    outcome = torture_runs.outcome(name, backend)
    report = outcome.report
    assert report.spans or report.submitted, f"nothing ran: {report.as_dict()}"
    assert outcome.breaches == [], (outcome.breaches, report.as_dict(), outcome.notes)
