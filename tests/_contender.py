"""A contender in its own OS process, any backend: `python -m tests._contender MODE URL NS ...`.

MODE is `async` (one event loop, many tasks), `sync` (many threads) or `hold`
(take one key's turn, print "held <fence>", and sleep until killed).
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import inturn
from inturn.testing import History

ROOT = Path(__file__).resolve().parents[1]


def spawn(*args: str, module: str = "tests._contender") -> subprocess.Popen[str]:
    """Run `python -m <module> ARGS...` from the repo root, its output piped as text."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def contend_async(url: str, namespace: str, out: str, keys: int, tasks: int, rounds: int) -> None:
    async def main() -> None:
        gate = inturn.Gate.from_url(url, namespace=namespace)
        history = History(f"pid{os.getpid()}")
        rng = random.Random(os.getpid())

        async def task(n: int) -> None:
            for _ in range(rounds):
                async with gate.turn(f"user:{rng.randrange(keys)}", timeout=60) as turn:
                    with history.span(turn, f"pid{os.getpid()}-t{n}"):
                        await asyncio.sleep(rng.random() * 0.002)

        await asyncio.gather(*(task(n) for n in range(tasks)))
        await gate.aclose()
        history.dump(out)

    asyncio.run(main())


def contend_sync(url: str, namespace: str, out: str, keys: int, threads: int, rounds: int) -> None:
    gate = inturn.Gate.from_url(url, namespace=namespace)
    history = History(f"pid{os.getpid()}")

    def thread(n: int) -> None:
        rng = random.Random(n * 7919 + os.getpid())
        for _ in range(rounds):
            request = gate.turn_sync(f"user:{rng.randrange(keys)}", timeout=60)
            with request as turn, history.span(turn, f"pid{os.getpid()}-t{n}"):
                time.sleep(rng.random() * 0.002)

    workers = [threading.Thread(target=thread, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    gate.close()
    history.dump(out)


def hold(url: str, namespace: str, key: str, lease: float) -> None:
    async def main() -> None:
        gate = inturn.Gate.from_url(url, namespace=namespace, lease=lease)
        async with gate.turn(key) as turn:
            print(f"held {turn.fence}", flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())


if __name__ == "__main__":
    mode, url, namespace, *rest = sys.argv[1:]
    if mode == "hold":
        hold(url, namespace, rest[0], float(rest[1]))
    else:
        out, keys, workers, rounds = rest[0], int(rest[1]), int(rest[2]), int(rest[3])
        run = contend_async if mode == "async" else contend_sync
        run(url, namespace, out, keys, workers, rounds)
