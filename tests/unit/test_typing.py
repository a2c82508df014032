"""mypy sees through @gate.serialize: parameters and return types are kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SNIPPET = """
import inturn

gate = inturn.Gate()

@gate.serialize(key="user_id", dedup="message_id")
async def send(user_id: int, message_id: int | None = None) -> str:
    return "ok"

@gate.serialize(key="user_id")
def send_sync(user_id: int) -> int:
    return user_id

async def good() -> str:
    n: int = send_sync(1)
    return await send(1, message_id=2) + str(n)

async def bad() -> None:
    await send("not an int")          # error: wrong argument type
    x: int = await send(1)            # error: str is not int
"""


def test_mypy_keeps_the_wrapped_signature(tmp_path: Path) -> None:
    path = tmp_path / "snippet.py"
    path.write_text(SNIPPET)
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2, out.stdout
    assert any('"send" has incompatible type "str"' in e for e in errors), errors
    assert any("Incompatible types in assignment" in e for e in errors), errors
