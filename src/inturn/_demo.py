"""``inturn demo``: a chat bot that answers one user twice, reproduced and fixed, in memory.

A burst of users each send a few messages (the bot's handler answers each one),
one message of each user is delivered twice (a re-polled update, a webhook
retry), and the proactive job picks the same users at the same moment. Every
call runs ``send_ai_response``, which thinks for a while (the LLM) and sends a
reply. Run once as such a bot does (every call at once) and once through
``@gate.serialize``; count the replies that overlapped, went out of order, were
sent twice, or never came.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import random
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import Duplicate
from ._gate import Gate
from .testing import History, Span, count_overlaps, find_problems

THE_FIX = """\
gate = inturn.Gate.from_url("memory://")           # or redis://..., postgresql://...

@gate.serialize(key="user_id", dedup="update_id")  # one at a time, in order, once per update
async def send_ai_response(user_id: int, update_id: int | None, text: str) -> None: ..."""


@dataclass
class _Run:
    history: History = field(default_factory=lambda: History("demo"))
    replies: dict[int, list[int]] = field(default_factory=dict)
    seconds: float = 0.0

    def out_of_order(self) -> int:
        """Replies to a message sent after the reply to a later message of that user."""
        late = 0
        for answered in self.replies.values():
            highest = -1
            for seq in answered:
                if seq < highest:
                    late += 1
                highest = max(highest, seq)
        return late

    def answered_twice(self) -> int:
        return sum(len(a) - len(set(a)) for a in self.replies.values())

    def lost(self, users: int, messages: int) -> int:
        return sum(messages - len(set(self.replies.get(user, ()))) for user in range(users))


@dataclass(frozen=True)
class DemoResult:
    """What one demo run counted."""

    calls: int
    overlaps: int
    out_of_order: int
    answered_twice: int
    lost: int
    seconds: float
    contract_ok: bool
    spans: tuple[Span, ...] = ()


async def _think_and_reply(run: _Run, user: int, seq: int | None, rng: random.Random) -> None:
    await asyncio.sleep(rng.uniform(0.002, 0.012))  # the LLM thinks
    if seq is not None:
        run.replies.setdefault(user, []).append(seq)
    await asyncio.sleep(rng.uniform(0.0005, 0.002))  # the reply is sent


def _unguarded(run: _Run, rng: random.Random) -> Callable[[int, int | None], Awaitable[None]]:
    async def send_ai_response(user_id: int, update_id: int | None) -> None:
        started = time.monotonic()
        await _think_and_reply(run, user_id, update_id, rng)
        # No turn, no fence: number the calls so only overlaps are judged.
        ended, n = time.monotonic(), len(run.history.spans)
        run.history.add(Span(str(user_id), n, started, started, started, ended, "unguarded"))

    return send_ai_response


def _guarded(
    gate: Gate, run: _Run, rng: random.Random
) -> Callable[[int, int | None], Awaitable[None]]:
    @gate.serialize(key="user_id", dedup="update_id")
    async def send_ai_response(user_id: int, update_id: int | None, fence: int = 0) -> None:
        started = time.monotonic()
        await _think_and_reply(run, user_id, update_id, rng)
        run.history.add(Span(str(user_id), fence, started, started, started, time.monotonic(), ""))

    async def call(user_id: int, update_id: int | None) -> None:
        with contextlib.suppress(Duplicate):  # a redelivered update: already answered
            await send_ai_response(user_id, update_id)

    return call


async def _scenario(
    gate: Gate | None, users: int, messages: int, seed: int, progress: Callable[[], None]
) -> tuple[_Run, int]:
    rng = random.Random(seed)
    run = _Run()
    send = _unguarded(run, rng) if gate is None else _guarded(gate, run, rng)
    calls: list[asyncio.Task[None]] = []

    def fire(user: int, seq: int | None) -> None:
        task = asyncio.ensure_future(send(user, seq))
        task.add_done_callback(lambda _: progress())
        calls.append(task)

    started = time.monotonic()
    for seq in range(messages):
        for user in range(users):
            fire(user, seq)  # bot.py: a message arrives
            if seq == messages // 2:
                fire(user, None)  # proactive_messaging.py picks the same user
            if seq == 1:
                fire(user, 0)  # message 0 is delivered again (a re-polled update)
        await asyncio.sleep(0.001)
    await asyncio.gather(*calls)
    run.seconds = time.monotonic() - started
    return run, len(calls)


async def run_demo(
    url: str = "memory://",
    *,
    users: int = 40,
    messages: int = 5,
    seed: int = 1,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[DemoResult, DemoResult]:
    """Run the scenario without and with inturn; return what each run counted."""
    results = []
    total = users * (messages + 2)
    for use_gate in (False, True):
        label = "with inturn" if use_gate else "without inturn"
        done = 0

        def tick(label: str = label) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(label, done, total)

        gate = Gate.from_url(url, namespace=f"demo-{seed}-{time.time_ns()}") if use_gate else None
        try:
            run, calls = await _scenario(gate, users, messages, seed, tick)
        finally:
            if gate is not None:
                await gate.aclose()
        spans = run.history.spans
        problems, _ = find_problems(spans, fifo=False)
        results.append(
            DemoResult(
                calls=calls,
                overlaps=count_overlaps(spans),
                out_of_order=run.out_of_order(),
                answered_twice=run.answered_twice(),
                lost=run.lost(users, messages),
                seconds=run.seconds,
                contract_ok=not problems,
                spans=tuple(spans),
            )
        )
    return results[0], results[1]


# -- the timeline picture ----------------------------------------------------------------


def _lanes(result: DemoResult, users: int) -> list[list[tuple[float, float, bool]]]:
    """Per user (the first ``users``): each call's (start, end, collided) bar."""
    lanes: list[list[tuple[float, float, bool]]] = []
    for user in range(users):
        bars = sorted((s.start, s.end) for s in result.spans if s.key == str(user))
        marked = []
        for i, (start, end) in enumerate(bars):
            hit = any(
                j != i and other_start < end and start < other_end
                for j, (other_start, other_end) in enumerate(bars)
            )
            marked.append((start, end, hit))
        lanes.append(marked)
    return lanes


def write_svg(path: Path, runs: list[tuple[str, DemoResult]], users: int) -> None:
    """One panel per run, one lane per user, each reply a bar; collisions in red."""
    width, lane_h, top, left = 900, 16, 34, 70
    panel_h = top + users * lane_h + 20
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{panel_h * len(runs)}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{panel_h * len(runs)}" fill="white"/>',
    ]
    for p, (title, result) in enumerate(runs):
        y0 = p * panel_h
        lanes = _lanes(result, users)
        starts = [b[0] for lane in lanes for b in lane] or [0.0]
        ends = [b[1] for lane in lanes for b in lane] or [1.0]
        t0, t1 = min(starts), max(ends)
        scale = (width - left - 10) / max(t1 - t0, 1e-9)
        red = sum(b[2] for lane in lanes for b in lane)
        parts.append(
            f'<text x="8" y="{y0 + 18}" font-size="13" font-weight="bold">'
            f"{html.escape(title)}: {red} colliding replies in these {users} users "
            f"({(t1 - t0) * 1000:.0f} ms)</text>"
        )
        for u, lane in enumerate(lanes):
            y = y0 + top + u * lane_h
            parts.append(f'<text x="8" y="{y + 11}">user {u}</text>')
            for start, end, hit in lane:
                x = left + (start - t0) * scale
                w = max(1.0, (end - start) * scale)
                color = "#d62728" if hit else "#2ca02c"
                parts.append(
                    f'<rect x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="{lane_h - 5}" '
                    f'fill="{color}" fill-opacity="0.75" stroke="black" stroke-width="0.3"/>'
                )
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def write_png(path: Path, runs: list[tuple[str, DemoResult]], users: int) -> bool:
    """The same picture as a PNG, where matplotlib is installed; False if it is not."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return False
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2 + 0.25 * users * len(runs)))
    for ax, (title, result) in zip(axes, runs, strict=True):
        lanes = _lanes(result, users)
        t0 = min((b[0] for lane in lanes for b in lane), default=0.0)
        for u, lane in enumerate(lanes):
            for start, end, hit in lane:
                color = "#d62728" if hit else "#2ca02c"
                ax.barh(u, (end - start) * 1000, left=(start - t0) * 1000, color=color, alpha=0.75)
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylabel("user")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# -- the command -------------------------------------------------------------------------


def _progress(label: str, done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\r  running {label}: {done}/{total} calls ", end="", file=sys.stderr, flush=True)


def main(url: str, users: int, messages: int, picture: str | None = "") -> int:
    """Print the two runs side by side; exit status 0 when inturn's run kept every promise.

    ``picture``: where to write the timeline (``""``: the system's temp folder; None: none).
    """
    print(
        f"inturn demo: {users} users x ({messages} messages, one of them delivered twice, "
        f"+ 1 proactive call) hit send_ai_response at once, on {url}"
    )
    without, with_ = asyncio.run(run_demo(url, users=users, messages=messages, progress=_progress))
    if sys.stderr.isatty():
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
    print(
        f"  {'':16}{'calls':>7}{'overlaps':>10}{'out of order':>14}"
        f"{'answered twice':>16}{'lost':>6}{'seconds':>9}"
    )
    for name, r in (("without inturn", without), ("with inturn", with_)):
        print(
            f"  {name:16}{r.calls:>7}{r.overlaps:>10}{r.out_of_order:>14}"
            f"{r.answered_twice:>16}{r.lost:>6}{r.seconds:>9.2f}"
        )
    ok = (
        with_.overlaps == 0
        and with_.out_of_order == 0
        and with_.answered_twice == 0
        and with_.lost == 0
        and with_.contract_ok
    )
    verdict = (
        "one reply at a time per user, in order, each message answered once"
        if ok
        else "A PROMISE WAS BROKEN"
    )
    print(f"with inturn: {verdict} (fences and overlaps checked by inturn.testing)")
    print("\nThe code that made the difference:\n")
    print(textwrap.indent(THE_FIX, "    "))
    if picture is not None:
        folder = Path(picture) if picture else Path(tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        runs = [("without inturn", without), ("with inturn", with_)]
        lanes = min(users, 12)
        svg = folder / "inturn-demo-timeline.svg"
        write_svg(svg, runs, lanes)
        png = folder / "inturn-demo-timeline.png"
        where = f"{svg} and {png}" if write_png(png, runs, lanes) else str(svg)
        print(f"\nTimeline (one lane per user, each reply a bar, collisions in red): {where}")
    print(
        "\nNext: run it across processes with `inturn demo --url redis://localhost:6379/0`, "
        "and read docs/serialize.md and docs/mailbox.md."
    )
    return 0 if ok else 1
