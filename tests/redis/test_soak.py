"""Soak runs (`bash scripts/test -m slow`): longer, bounded contention across processes."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from inturn.testing import History, check_history

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_soak_eight_processes(redis_url: str, tmp_path: Path, mode: str) -> None:
    """8 processes x 25 contenders x 40 turns on 10 keys: the history keeps the contract."""
    namespace = f"soak{secrets.token_hex(4)}"
    outs = [tmp_path / f"w{i}.jsonl" for i in range(8)]
    worker = [sys.executable, "-m", "tests._contender", mode, redis_url, namespace]
    procs = [
        subprocess.Popen(
            [*worker, str(o), "10", "25", "40"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for o in outs
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=540)
        assert proc.returncode == 0, err
    report = check_history(History.load(*outs))
    assert report.spans == 8 * 25 * 40
