"""Find the fenced code blocks of the user docs, with the marker that precedes each.

A block is a fence of three or more backticks or tildes (indented or not, as inside a list
item) up to the matching closing fence. Its *marker* is an HTML comment on the last
non-blank line before the opening fence: `<!-- not run: reason -->` or `<!-- continues -->`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*(?P<body>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block: its page, 1-based line of the opening fence, language and text."""

    page: str
    line: int
    lang: str
    text: str
    marker: str | None  # the preceding HTML comment's body, e.g. "continues"

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def not_run(self) -> str | None:
        """The reason given by `<!-- not run: reason -->`, else None."""
        if self.marker is None or not self.marker.startswith("not run"):
            return None
        return self.marker.partition(":")[2].strip()

    @property
    def continues(self) -> bool:
        return self.marker == "continues"


def pages() -> list[Path]:
    """README.md and every docs/*.md, in a stable order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def page_name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def extract(path: Path) -> list[Block]:
    """Every fenced block of one page, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        j = i + 1
        while j < len(lines) and closing.match(lines[j]) is None:
            j += 1
        if j == len(lines):
            raise ValueError(f"{page_name(path)}:{i + 1}: a fence that is never closed")
        body = [
            line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : j]
        ]
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        found = MARKER.match(lines[k]) if k >= 0 else None
        blocks.append(
            Block(
                page=page_name(path),
                line=i + 1,
                lang=opening["info"].strip().split(" ")[0].lower(),
                text="\n".join(body) + "\n",
                marker=found["body"] if found else None,
            )
        )
        i = j + 1
    return blocks


def fence_lines(path: Path) -> int:
    """How many lines of the page open or close a fence: a count independent of `extract`."""
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if FENCE.match(line))
