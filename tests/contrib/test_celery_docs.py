"""docs/celery.md: what the page's Python blocks promise about Celery's configuration.

Every block of the page runs as written in `tests/docs/test_code_blocks.py`; this module
adds the Celery-specific checks on top of those same blocks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.docs._blocks import ROOT, extract

BLOCKS = [b for b in extract(ROOT / "docs" / "celery.md") if b.lang == "python"]


def run(text: str, tmp_path: Path) -> str:
    script = tmp_path / "proj.py"
    script.write_text(text, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_page_shows_every_mode_in_python() -> None:
    """Configuration, mailbox mode, turn mode, async bodies, checks and routing each have code."""
    texts = [b.text for b in BLOCKS]
    for needle in ('"mode": "turn"', '"batch": True', "async def", "check_configuration(app)"):
        assert any(needle in text for text in texts), needle
    assert any("KeyedRouter(" in text for text in texts)


def test_the_recommended_configuration_draws_no_warning(tmp_path: Path) -> None:
    """The configuration the page recommends passes every check a worker runs at start."""
    (config,) = [b for b in BLOCKS if b.text.startswith("# proj.py")]
    out = run(
        config.text + "\nfrom inturn.contrib.celery import check_configuration\n"
        "print(check_configuration(app))\n",
        tmp_path,
    )
    assert out.strip().splitlines()[-1] == "[]"


def test_the_check_example_prints_the_warning_it_is_about(tmp_path: Path) -> None:
    """The check_configuration example names its unsafe setting (prefetch 4) in its output."""
    (block,) = [b for b in BLOCKS if "for warning in check_configuration(app)" in b.text]
    out = run(block.text, tmp_path)
    assert "worker_prefetch_multiplier is 4" in out
