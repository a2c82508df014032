"""Tools to test code that uses inturn, without mocks.

Record what ran with a :class:`History` (one :class:`Span` per turn: key,
ask/join/start/end times on ``time.monotonic()``, fence, worker), then let
:func:`check_history` prove the contract over it: no two spans of one key
overlap, fences grow strictly in the order turns ran, and grants follow the
order of asks (FIFO). ``time.monotonic()`` is one clock for every process of a
machine on Linux, so histories written by several processes can be merged
(:meth:`History.dump` / :meth:`History.load`).

The in-memory backend (``Gate.from_url("memory://")``) is the backend to use
in a user's own unit tests.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ._turn import SyncTurn, Turn

__all__ = [
    "History",
    "HistoryReport",
    "HistoryViolation",
    "Span",
    "check_history",
    "count_overlaps",
    "find_problems",
]


@dataclass(frozen=True, slots=True)
class Span:
    """One turn as it ran: ``[start, end]`` on ``time.monotonic()``.

    ``asked``/``joined`` bracket the request's entry into the line (see
    :attr:`inturn.Turn.joined_at`).
    """

    key: str
    fence: int
    asked: float
    joined: float
    start: float
    end: float
    worker: str


class HistoryViolation(AssertionError):
    """The history breaks the contract; ``problems`` lists each breach found."""

    def __init__(self, problems: list[str]) -> None:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} contract violation(s):\n  {shown}{more}")
        self.problems = problems


@dataclass(frozen=True, slots=True)
class HistoryReport:
    """What :func:`check_history` looked at."""

    spans: int
    keys: int
    fifo_pairs_checked: int


class History:
    """A thread-safe recorder of spans: ``with history.span(turn): ...`` around a body."""

    def __init__(self, worker: str | None = None) -> None:
        self.worker = worker if worker is not None else f"pid{os.getpid()}"
        self._spans: list[Span] = []
        self._lock = threading.Lock()

    @property
    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def add(self, span: Span) -> None:
        with self._lock:
            self._spans.append(span)

    @contextmanager
    def span(self, turn: Turn | SyncTurn, worker: str | None = None) -> Iterator[None]:
        """Record the body's start and end for ``turn`` (also when the body raises)."""
        start = time.monotonic()
        try:
            yield
        finally:
            end = time.monotonic()
            self.add(
                Span(
                    key=turn.key,
                    fence=turn.fence,
                    asked=turn.asked_at,
                    joined=turn.joined_at,
                    start=start,
                    end=end,
                    worker=worker if worker is not None else self.worker,
                )
            )

    def dump(self, path: str | os.PathLike[str]) -> None:
        """Append the spans to ``path`` as JSON lines (one file per process is simplest)."""
        with open(path, "a", encoding="utf-8") as out:
            for span in self.spans:
                out.write(json.dumps(asdict(span)) + "\n")

    @staticmethod
    def load(*paths: str | os.PathLike[str]) -> list[Span]:
        """Read spans written by :meth:`dump` from one or more files."""
        spans: list[Span] = []
        for path in paths:
            for line in Path(path).read_text(encoding="utf-8").splitlines():
                if line.strip():
                    spans.append(Span(**json.loads(line)))
        return spans

    def check(self, *, fifo: bool = True) -> HistoryReport:
        """Shorthand for ``check_history(self.spans, fifo=fifo)``."""
        return check_history(self.spans, fifo=fifo)


def check_history(spans: Iterable[Span], *, fifo: bool = True) -> HistoryReport:
    """Check a history against the contract; raise :class:`HistoryViolation` on a breach.

    Per key: spans sorted by start must not overlap; their fences must be
    strictly increasing in that order (and unique); and, with ``fifo``, a span
    whose request joined the line before another request asked must have run
    first (smaller fence).
    """
    problems, report = find_problems(spans, fifo=fifo)
    if problems:
        raise HistoryViolation(problems)
    return report


def count_overlaps(spans: Iterable[Span]) -> int:
    """How many times a span of a key started before the previous one of that key ended."""
    by_key: dict[str, list[Span]] = defaultdict(list)
    for span in spans:
        by_key[span.key].append(span)
    overlaps = 0
    for group in by_key.values():
        group.sort(key=lambda s: s.start)
        latest_end = -math.inf
        for span in group:
            if span.start < latest_end:
                overlaps += 1
            latest_end = max(latest_end, span.end)
    return overlaps


def find_problems(spans: Iterable[Span], *, fifo: bool = True) -> tuple[list[str], HistoryReport]:
    """The contract breaches in a history (empty when it keeps the contract), and a summary."""
    by_key: dict[str, list[Span]] = defaultdict(list)
    count = 0
    for span in spans:
        by_key[span.key].append(span)
        count += 1
    problems: list[str] = []
    pairs = 0
    for key, group in by_key.items():
        group.sort(key=lambda s: (s.start, s.end))
        for before, after in itertools.pairwise(group):
            if after.start < before.end:
                problems.append(
                    f"key {key!r}: overlap, fence {before.fence} ({before.worker}) ran "
                    f"[{before.start:.6f}, {before.end:.6f}] and fence {after.fence} "
                    f"({after.worker}) started at {after.start:.6f}"
                )
            if after.fence <= before.fence:
                problems.append(
                    f"key {key!r}: fence {after.fence} ({after.worker}) ran after fence "
                    f"{before.fence} ({before.worker}); fences must increase strictly"
                )
        if not fifo:
            continue
        # FIFO: walk from the latest grant down; a later-granted span whose request had
        # joined before this one asked is a request that was overtaken.
        by_fence = sorted(group, key=lambda s: s.fence)
        earliest_later: Span | None = None
        for span in reversed(by_fence):
            pairs += 1
            if earliest_later is not None and earliest_later.joined < span.asked:
                problems.append(
                    f"key {key!r}: FIFO, fence {earliest_later.fence} ({earliest_later.worker}) "
                    f"joined at {earliest_later.joined:.6f}, before fence {span.fence} "
                    f"({span.worker}) asked at {span.asked:.6f}, yet was granted later"
                )
            if earliest_later is None or span.joined < earliest_later.joined:
                earliest_later = span
    return problems, HistoryReport(spans=count, keys=len(by_key), fifo_pairs_checked=pairs)
