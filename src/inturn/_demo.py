"""``inturn demo``: a chat bot that answers one user twice, reproduced and fixed, in memory.

A burst of users each send a few messages (the bot's handler answers each
one) while the proactive job picks the same users at the same moment; every
call runs ``send_ai_response``, which thinks for a while (the LLM) and sends a
reply. Run once as such a bot does (every call at once) and once through
``gate.turn(user)``; count the calls for one user that ran at the same time
and the replies that went out in another order than the messages came in.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from ._gate import Gate
from .testing import History, Span, count_overlaps, find_problems


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


@dataclass(frozen=True)
class DemoResult:
    """What one demo run counted."""

    calls: int
    overlaps: int
    out_of_order: int
    seconds: float
    contract_ok: bool


async def _send_ai_response(run: _Run, user: int, seq: int | None, rng: random.Random) -> None:
    await asyncio.sleep(rng.uniform(0.002, 0.012))  # the LLM thinks
    if seq is not None:
        run.replies.setdefault(user, []).append(seq)
    await asyncio.sleep(rng.uniform(0.0005, 0.002))  # the reply is sent


async def _scenario(gate: Gate | None, users: int, messages: int, seed: int) -> tuple[_Run, int]:
    rng = random.Random(seed)
    run = _Run()
    calls: list[asyncio.Task[None]] = []

    async def call(user: int, seq: int | None) -> None:
        if gate is None:
            started = time.monotonic()
            await _send_ai_response(run, user, seq, rng)
            # No turn, no fence: number the calls so only overlaps are judged.
            ended, n = time.monotonic(), len(run.history.spans)
            run.history.add(Span(str(user), n, started, started, started, ended, "unguarded bot"))
            return
        async with gate.turn(user) as turn:
            with run.history.span(turn):
                await _send_ai_response(run, user, seq, rng)

    started = time.monotonic()
    for seq in range(messages):
        for user in range(users):
            calls.append(asyncio.ensure_future(call(user, seq)))  # bot.py: a message arrives
            if seq == messages // 2:
                calls.append(asyncio.ensure_future(call(user, None)))  # proactive_messaging.py
        await asyncio.sleep(0.001)
    await asyncio.gather(*calls)
    run.seconds = time.monotonic() - started
    return run, len(calls)


async def run_demo(
    url: str = "memory://", *, users: int = 40, messages: int = 5, seed: int = 1
) -> tuple[DemoResult, DemoResult]:
    """Run the scenario without and with inturn; return what each run counted."""
    results = []
    for use_gate in (False, True):
        gate = Gate.from_url(url) if use_gate else None
        try:
            run, calls = await _scenario(gate, users, messages, seed)
        finally:
            if gate is not None:
                await gate.aclose()
        spans = run.history.spans
        problems, _ = find_problems(spans, fifo=use_gate)
        results.append(
            DemoResult(
                calls=calls,
                overlaps=count_overlaps(spans),
                out_of_order=run.out_of_order(),
                seconds=run.seconds,
                contract_ok=not problems,
            )
        )
    return results[0], results[1]


def main(url: str, users: int, messages: int) -> int:
    """Print the two runs side by side; exit status 0 when inturn's run kept the contract."""
    print(
        f"inturn demo: {users} users x ({messages} messages + 1 proactive call) "
        f"hit send_ai_response at once, on {url}"
    )
    without, with_ = asyncio.run(run_demo(url, users=users, messages=messages))
    print(f"  {'':16}{'calls':>7}{'overlaps':>10}{'out of order':>14}{'seconds':>9}")
    for name, r in (("without inturn", without), ("with inturn", with_)):
        print(f"  {name:16}{r.calls:>7}{r.overlaps:>10}{r.out_of_order:>14}{r.seconds:>9.2f}")
    ok = with_.overlaps == 0 and with_.out_of_order == 0 and with_.contract_ok
    verdict = "each user's calls ran one at a time, in arrival order" if ok else "CONTRACT BROKEN"
    print(f"with inturn: {verdict} (fences and FIFO checked by inturn.testing)")
    return 0 if ok else 1
