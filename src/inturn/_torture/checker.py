"""Read what the workers and the sink recorded; count what broke and who was told.

- ``overlaps``: two spans of one key that ran at once (from :func:`inturn.testing.find_problems`);
  ``overlaps_reported``: those where the holder whose turn had been taken over was told
  (``turn.lost`` set by the end, or the sink refused one of its fenced writes);
- ``fifo``: grants out of ask order; ``fence_order``: a turn that ran (without overlapping)
  after a turn with a higher fence, ``fence_order_reported`` those whose holder was told;
- ``stale_accepted``: sink attempts accepted with a fence below the highest already stored
  (must be 0, always);
- ``lost_messages``: acknowledged submits (``submit`` returned) never handled;
- ``duplicate_effects``: message ids whose effect the sink accepted more than once.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inturn._torture.sink import FencedSink
from inturn.testing import Span, find_problems

__all__ = ["Report", "check", "load_records"]


@dataclass
class Report:
    spans: int = 0
    errors: int = 0
    overlaps: int = 0
    overlaps_reported: int = 0
    fence_order_reported: int = 0
    fifo: int = 0
    fence_order: int = 0
    stale_accepted: int = 0
    refused_writes: int = 0
    submitted: int = 0
    handled: int = 0
    lost_messages: int = 0
    duplicate_effects: int = 0
    problems: list[str] = field(default_factory=list)
    error_types: dict[str, int] = field(default_factory=dict)

    @property
    def violations(self) -> int:
        """Breaches of exclusion seen by the holders: overlaps, and turns that ran after a
        higher fence had run (without overlapping it)."""
        return self.overlaps + self.fence_order

    @property
    def reported(self) -> int:
        """Violations the holder whose turn had been taken over was told about."""
        return self.overlaps_reported + self.fence_order_reported

    @property
    def silent(self) -> int:
        """Violations nobody told the overtaken holder about."""
        return self.violations - self.reported

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["problems"] = self.problems[:10]
        return out


def load_records(*paths: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # the last line of a SIGKILLed worker
                    continue
    return records


def check(records: list[dict[str, Any]], sink_path: Path | None, *, fifo: bool = True) -> Report:
    report = Report()
    spans = [r for r in records if r["t"] == "span"]
    report.spans = len(spans)
    errors = [r for r in records if r["t"] == "error"]
    report.errors = len(errors)
    report.error_types = dict(Counter(r["type"] for r in errors))
    told = {(r["key"], r["fence"]): bool(r["lost"] or r["refused"]) for r in spans}
    as_spans = [
        Span(r["key"], r["fence"], r["asked"], r["joined"], r["start"], r["end"], r["worker"])
        for r in spans
    ]
    problems, _ = find_problems(as_spans, fifo=fifo)
    report.problems = problems
    report.fifo = sum(1 for p in problems if ": FIFO," in p)
    # overlaps, and whether the holder overtaken was told
    by_key: dict[str, list[Span]] = defaultdict(list)
    for s in as_spans:
        by_key[s.key].append(s)
    for group in by_key.values():
        group.sort(key=lambda s: (s.start, s.end))
        for before, after in itertools.pairwise(group):
            # the stale one is the lower fence: its lease was given away
            stale = before if before.fence < after.fence else after
            stale_told = told.get((stale.key, stale.fence), False)
            if after.start < before.end:
                report.overlaps += 1
                report.overlaps_reported += stale_told
            elif after.fence <= before.fence:
                # ran after a higher fence had run: a holder that started late (stalled
                # between its grant and its body, or granted twice)
                report.fence_order += 1
                report.fence_order_reported += stale_told
    if sink_path is not None and sink_path.exists():
        sink = FencedSink(sink_path)
        attempts = sink.attempts()
        sink.close()
        highest: dict[str, int] = {}
        effects: Counter[str] = Counter()
        for a in attempts:
            top = highest.get(a.key)
            if a.accepted:
                if top is not None and a.fence < top:
                    report.stale_accepted += 1
                highest[a.key] = a.fence if top is None else max(top, a.fence)
                if a.msg is not None:
                    effects[a.msg] += 1
            else:
                report.refused_writes += 1
        report.duplicate_effects = sum(1 for n in effects.values() if n > 1)
    submitted = {r["id"] for r in records if r["t"] == "submitted"}
    handled = {r["id"] for r in records if r["t"] == "handled"}
    report.submitted = len(submitted)
    report.handled = len(handled)
    report.lost_messages = len(submitted - handled)
    return report
