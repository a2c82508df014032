"""`python -m benchmarks` in its seconds-long mode, so that the harness cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_locks  # noqa: E402
import bench_scale  # noqa: E402


def _run(rec: list[bench_locks.Record], window: float = 10.0) -> bench_locks.ContentionRun:
    plan = bench_scale.Size("t", 1, 1, 1, window, 2, 1, 1, 1, 1, 1).lock_plan()
    return bench_locks.ContentionRun("x", "inturn", "processes", [rec], [], 0.0, plan)


def test_handoff_stats_measure_gaps_and_catch_an_overtaking_grant() -> None:
    # (asked, granted, released, joined); everyone waits before the first release.
    fifo = [(0.0, 0.0, 1.0, 0.0), (0.1, 1.002, 2.0, 0.11), (0.2, 2.004, 3.0, 0.21)]
    stats = bench_scale.handoff_stats(_run(fifo), "sync")
    assert stats["handoffs"] == 2
    assert stats["handoff_p50_ms"] == pytest.approx(3.0)
    assert stats["overtaken_pct"] == 0
    assert stats["overlaps"] == 0
    assert stats["fifo_breaches"] == 0
    # The third asker is granted before the second, who asked 100 ms earlier and was in
    # line before the third asked: overtaken, and a breach of the FIFO promise.
    barging = [(0.0, 0.0, 1.0, 0.0), (0.2, 1.002, 2.0, 0.21), (0.1, 2.004, 3.0, 0.11)]
    stats = bench_scale.handoff_stats(_run(barging), "sync")
    assert stats["overtaken_pct"] == pytest.approx(100 / 3)
    assert stats["fifo_breaches"] == 1
    # Asked first, but in line only after the other asked: overtaken, not a breach.
    late_join = [(0.0, 0.0, 1.0, 0.0), (0.2, 1.002, 2.0, 0.21), (0.1, 2.004, 3.0, 0.25)]
    stats = bench_scale.handoff_stats(_run(late_join), "sync")
    assert stats["overtaken_pct"] == pytest.approx(100 / 3)
    assert stats["fifo_breaches"] == 0
    # A lock without a line has no breaches to count.
    no_line = [(0.0, 0.0, 1.0, math.nan), (0.1, 1.002, 2.0, math.nan)]
    assert bench_scale.handoff_stats(_run(no_line), "sync")["fifo_breaches"] is None
    # A grant before the previous holder left is an overlap, not a hand-off.
    overlapping = [(0.0, 0.0, 1.0, 0.0), (0.1, 0.9, 2.0, 0.1)]
    assert bench_scale.handoff_stats(_run(overlapping), "sync")["overlaps"] == 1


def test_tiny_run_writes_the_report_and_the_plots(redis_url: str, tmp_path: Path) -> None:
    # redis_url: a missing redis-server skips here (fails in CI) instead of deep in the run.
    out, img = tmp_path / "report.md", tmp_path / "img"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--out", str(out), "--img-dir", str(img)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    for expected in (
        "- **redis-server**: ",
        "- **inturn git**: ",
        "| scale | ",
        "Loopback round trip",
        "Uncontended acquire + release",
        "hand-off release -> next body",
        "Many users",
        "Round trips and bytes per turn",
        "| redis | turn, uncontended (async) | 2.",
    ):
        assert expected in report, expected
    assert ("script ops/s" in report) == (shutil.which("redis-benchmark") is not None)
    assert "error" not in report.split("## scale", 1)[1].lower(), report
    if importlib.util.find_spec("matplotlib") is not None:
        expected = {"cycle.png", "handoff.png", "users.png"}
        if shutil.which("redis-benchmark"):
            expected.add("script-ops.png")
        assert {p.name for p in img.iterdir()} == expected


def test_unknown_names_are_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "nonsense"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown benchmark(s): nonsense" in proc.stderr
