"""Every Python block of docs/celery.md runs as written (no broker needed to define tasks)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "celery.md").read_text(), re.S)


def test_the_page_has_python_blocks() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_a_python_block_of_the_celery_page_runs(block: str, tmp_path: Path) -> None:
    # Each block runs in a fresh interpreter, as a user would paste it into a file.
    script = tmp_path / "proj.py"
    script.write_text(block)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
