"""The example bot (examples/ai_bot) under load: U users x M messages, a slow model.

    python benchmarks/bench_bot.py [--users 200] [--messages 5] [--latency 0.3] [--redis]
                                   [--debounce 0.3] [--gap 0.05]

Runs ``python -m ai_bot`` as a subprocess (long polling) against the local fakes of the
Telegram Bot API and of an OpenAI-compatible API (``tests/fakes``), on memory:// (or on a
redis-server the script starts, with ``--redis``) and SQLite in a temp dir. Every user sends
M messages ``--gap`` seconds apart, all users at once. Reported:

- total: first message sent -> last reply received by the fake Telegram;
- the longest user's serial time: the sum of that user's model calls (each ``--latency``
  s), the least time that user's replies can take one after another; and M x latency, one
  model call per message (no batching);
- total / longest serial (the goal: within 1.3x);
- the bot's overhead per message: its CPU time (user + sys, from /proc) during the run,
  after a warm-up message, divided by the messages; and the pick-up time, message sent ->
  its model call began, for each user's first call (it waited for no earlier reply);
- checks: every message answered once, in order; no two model calls of a user overlapped.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakes.llm import FakeLLM, answered_texts  # noqa: E402
from tests.fakes.telegram import FakeTelegram  # noqa: E402


def _cpu(pid: int) -> float:
    """A process's CPU seconds so far (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.3)
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between a user's messages")
    parser.add_argument(
        "--debounce", type=float, default=0.0, help="REPLY_DEBOUNCE: wait for a burst to end"
    )
    parser.add_argument("--redis", action="store_true", help="INTURN_URL on a local redis-server")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--py-spy",
        metavar="FILE",
        default="",
        help="sample the bot under load with py-spy (installed apart); raw stacks to FILE",
    )
    args = parser.parse_args()

    server = None
    inturn_url = "memory://"
    if args.redis:
        from tests.servers import RedisServer

        server = RedisServer().start()
        inturn_url = server.url
    tmp = Path(tempfile.mkdtemp(prefix="bench-bot-"))
    try:
        with FakeTelegram() as tg, FakeLLM(latency=args.latency) as llm:
            return run(args, tg, llm, inturn_url, tmp)
    finally:
        if server is not None:
            server.stop()


def run(
    args: argparse.Namespace, tg: FakeTelegram, llm: FakeLLM, inturn_url: str, tmp: Path
) -> int:
    env = {
        **os.environ,
        "BOT_TOKEN": tg.token,
        "TELEGRAM_API_URL": tg.url,
        "LLM_BASE_URL": llm.url,
        "LLM_API_KEY": "bench",
        "LLM_MODEL": "fake-model",
        "INTURN_URL": inturn_url,
        "DATABASE_URL": f"sqlite:///{tmp / 'bot.sqlite3'}",
        "PYTHONUNBUFFERED": "1",
        "REPLY_DEBOUNCE": str(args.debounce),
    }
    log = (tmp / "bot.log").open("wb")
    bot = subprocess.Popen(
        [sys.executable, "-m", "ai_bot", "--log-level", "WARNING"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while tg.polls == 0:  # the bot is polling
        if bot.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the bot did not start:\n{(tmp / 'bot.log').read_text()}")
        time.sleep(0.05)
    # warm up (first model call, first queries, lazy imports), then count from here
    tg.send_text(user_id=1, text="warm-up")
    tg.wait_for(lambda sent: sent, 60)
    time.sleep(0.5)
    cpu_start = _cpu(bot.pid)
    spy = None
    if args.py_spy:
        spy = subprocess.Popen(
            ["py-spy", "record", "-p", str(bot.pid), "-o", args.py_spy, "-f", "raw", "-r", "200"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
    users = list(range(100_000, 100_000 + args.users))
    texts = {u: [f"u{u}m{i}" for i in range(args.messages)] for u in users}
    sent_at: dict[str, float] = {}
    total_messages = args.users * args.messages
    first = time.monotonic()
    for i in range(args.messages):
        round_start = time.monotonic()
        for u in users:
            sent_at[texts[u][i]] = time.monotonic()
            tg.send_text(user_id=u, text=texts[u][i])
        left = args.gap - (time.monotonic() - round_start)
        if left > 0 and i < args.messages - 1:
            time.sleep(left)

    expected = {t for ts in texts.values() for t in ts}

    def all_answered(sent: list[object]) -> bool:  # the warm-up's reply does not count
        answered = (t for c in sent for t in answered_texts(getattr(c, "text", "") or ""))
        return sum(t in expected for t in answered) >= total_messages

    tg.wait_for(all_answered, args.timeout)
    last = max(c.at for c in tg.sent if c.chat_id in texts)
    total = last - first
    cpu = _cpu(bot.pid) - cpu_start
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
    bot.send_signal(signal.SIGTERM)
    bot.wait(60)
    log.close()

    # checks
    problems = []
    for u in users:
        got = [t for c in tg.sent if c.chat_id == u for t in answered_texts(c.text or "")]
        if got != texts[u]:
            problems.append(f"user {u}: answered {got}")
    overlaps = llm.overlaps()
    if overlaps:
        problems.append(f"{len(overlaps)} overlapping model calls of one user")

    chains = {u: sum((r.end or r.start) - r.start for r in llm.for_user(u)) for u in users}
    longest = max(chains.values())
    calls = [len(llm.for_user(u)) for u in users]
    pickups = []
    for u in users:
        reqs = sorted(llm.for_user(u), key=lambda r: r.start)
        if reqs and reqs[0].answering:
            pickups.append(reqs[0].start - sent_at[reqs[0].answering[0]])
    pickups.sort()

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    print(f"command: python benchmarks/bench_bot.py {' '.join(sys.argv[1:])}")
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    print(f"backend: {inturn_url.split('@')[-1]}; database: SQLite")
    print(
        f"load: {args.users} users x {args.messages} messages ({total_messages}), "
        f"{args.gap * 1000:.0f} ms apart, model latency {args.latency:g} s, "
        f"debounce {args.debounce:g} s"
    )
    print(f"model calls: {sum(calls)} ({statistics.mean(calls):.2f} per user; batched)")
    print(f"total: {total:.2f} s")
    print(f"longest user's serial time: {longest:.2f} s (its model calls one after another)")
    print(f"one call per message, serially: {args.messages * args.latency:.2f} s")
    print(f"total / longest serial: {total / longest:.2f}x (goal: within 1.3x)")
    print(f"total / one call per message: {total / (args.messages * args.latency):.2f}x")
    print(
        f"bot CPU: {cpu:.2f} s = {cpu / total_messages * 1000:.2f} ms per message "
        f"(aiogram, inturn, SQLite, HTTP clients)"
    )
    print(
        f"bot CPU / total: {cpu / total:.0%} of one core"
        + (" (the bot process is the bottleneck: one event loop)" if cpu / total > 0.8 else "")
    )
    print(
        f"pick-up (message sent -> its model call): p50 {pct(pickups, 0.5) * 1000:.0f} ms, "
        f"p95 {pct(pickups, 0.95) * 1000:.0f} ms, max {pickups[-1] * 1000:.0f} ms"
    )
    print(f"bot exit code after SIGTERM: {bot.returncode}")
    if problems:
        print("PROBLEMS:\n  " + "\n  ".join(problems[:20]))
        return 1
    print("checks: every message answered once, in order; no overlapping calls per user")
    return 0


if __name__ == "__main__":
    sys.exit(main())
