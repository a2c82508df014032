"""Where a hand-off between processes spends its time, for inturn's turn on Redis.

    python benchmarks/profile_handoff.py [--flavor sync|async] [--processes 8] [--seconds 4]
                                         [--cprofile [--sort cumtime]] [--py-spy]

N processes (each with its own gate; async: its own event loop) loop {turn; hold 2 ms} on one
key against a redis-server the script starts. Each process stamps, on the shared monotonic
clock, when its body ends ("leave"), when its turn's exit returned (the RELEASE reply is in),
when its wake-up listener read the push that granted it the turn ("push read": the hook wraps
the backend's `deliver`, which the listener calls for every push), and when its body starts.
From those, for every hand-off between two processes:

    leave -> push read    RELEASE written, run, PUBLISH, the push's transit, the listener's
                          wake-up and read (in the next holder's process)
    push read -> body     from the listener to the waiting thread (sync: a lock the listener
                          thread releases) or task (async: a future), and the turn's entry
                          returning

and, in the releasing process, leave -> exit returned (the RELEASE round trip: async skips
the wait only when it hands the turn to a waiter of its own loop, never here).

The floor follows: the same N processes pass a token through the same redis-server with no
client library at all (raw sockets, one SUBSCRIBE each, a 2 ms hold, then PUBLISH to the
next process): PUBLISH -> the next process has read it, beside a raw PING after 1 ms idle.
What inturn's hand-off costs above that floor is the client's, not the server trip's. The CPU time
of all the processes over the loop, per turn, is printed too (less noisy than latencies on a
shared machine). With `--cprofile`, process 0 runs under cProfile (CPU time) and its top
functions are printed (by own time, or the `--sort` order); with `--py-spy`, `py-spy record`
samples process 0 (if py-spy is installed) and the leaf functions are summed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import io
import itertools
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(HERE), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import bench_locks as bl  # noqa: E402
from _procs import start_redis  # noqa: E402

HOLD = 0.002


def _hook(pushes: list[tuple[str, float]]) -> None:
    """Stamp every push the process's listener hands to `deliver` (token, arrival)."""
    from inturn._backends.redis import _shared

    original = _shared.ProcessChannel.deliver

    def deliver(self: Any, data: Any, waiters: Any, granted_at: float | None = None) -> Any:
        if granted_at is None:  # a push (not a reply to our own release)
            token = _shared.text(data).partition("|")[0]
            pushes.append((token, time.monotonic()))
        return original(self, data, waiters, granted_at)

    _shared.ProcessChannel.deliver = deliver  # type: ignore[method-assign]


def _worker(
    url: str,
    flavor: str,
    seconds: float,
    start: Any,
    index: int,
    out: Any,
    prof: str,
) -> None:
    import inturn

    pushes: list[tuple[str, float]] = []
    _hook(pushes)
    turns: list[tuple[float, float, float, float]] = []  # asked, body start, leave, exit returned
    # CPU time, not wall time: on a shared machine a preempted call would look slow.
    profiler = cProfile.Profile(time.thread_time) if prof and index == 0 else None
    cpu = [0.0, 0.0]  # process CPU time (all threads) when the loop starts and ends

    def run_sync() -> None:
        gate = inturn.Gate.from_url(url, namespace="prof")
        try:
            with gate.turn_sync(f"warm-{index}"):
                pass
            start.wait(timeout=60)
            deadline = time.monotonic() + seconds
            cpu[0] = time.process_time()
            if profiler:
                profiler.enable()
            while (asked := time.monotonic()) < deadline:
                with gate.turn_sync("shared"):
                    body = time.monotonic()
                    time.sleep(HOLD)
                    leave = time.monotonic()
                turns.append((asked, body, leave, time.monotonic()))
            cpu[1] = time.process_time()
            if profiler:
                profiler.disable()
        finally:
            gate.close()

    async def run_async() -> None:
        gate = inturn.Gate.from_url(url, namespace="prof")
        try:
            async with gate.turn(f"warm-{index}"):
                pass
            start.wait(timeout=60)
            deadline = time.monotonic() + seconds
            cpu[0] = time.process_time()
            if profiler:
                profiler.enable()
            while (asked := time.monotonic()) < deadline:
                async with gate.turn("shared"):
                    body = time.monotonic()
                    await asyncio.sleep(HOLD)
                    leave = time.monotonic()
                turns.append((asked, body, leave, time.monotonic()))
            cpu[1] = time.process_time()
            if profiler:
                profiler.disable()
        finally:
            await gate.aclose()

    if flavor == "sync":
        run_sync()
    else:
        asyncio.run(run_async())
    stats = ""
    if profiler:
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).sort_stats(prof).print_stats(30)
        stats = buffer.getvalue()
    out.put((index, turns, [t for _, t in pushes], stats, cpu[1] - cpu[0]))


def _link(port: int) -> Any:
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _ring_player(port: int, me: int, n: int, rounds: int, start: Any, out: Any) -> None:
    """Wait for the token on channel ring<me>, hold 2 ms, PUBLISH it to the next process."""
    from hiredis import pack_command  # what inturn's own connections pack with

    sub, pub = _link(port), _link(port)
    sub.sendall(pack_command(("SUBSCRIBE", f"ring{me}")))
    sub.recv(1024)
    start.wait(timeout=60)
    if me == 0:
        pub.sendall(pack_command(("PUBLISH", "ring1", repr(time.monotonic()))))
        pub.recv(64)
    transits = []
    for _ in range(rounds):
        data = sub.recv(4096)
        transits.append(time.monotonic() - float(data.split(b"\r\n")[-2]))
        time.sleep(HOLD)
        pub.sendall(pack_command(("PUBLISH", f"ring{(me + 1) % n}", repr(time.monotonic()))))
        pub.recv(64)
    out.put(transits)


def _floor(ctx: Any, port: int, processes: int, rounds: int = 150) -> None:
    from hiredis import pack_command

    start, out = ctx.Barrier(processes), ctx.Queue()
    ring = [
        ctx.Process(target=_ring_player, args=(port, i, processes, rounds, start, out))
        for i in range(processes)
    ]
    for proc in ring:
        proc.start()
    transits = [t for _ in ring for t in out.get(timeout=120)]
    for proc in ring:
        proc.join(timeout=5)
        proc.kill()
    probe, pings, ping = _link(port), [], pack_command(("PING",))
    for _ in range(300):
        time.sleep(0.001)
        sent = time.monotonic()
        probe.sendall(ping)
        probe.recv(64)
        pings.append(time.monotonic() - sent)
    probe.close()
    print(
        f"floor, no client library ({processes} processes pass a token by PUBLISH, hold 2 ms): "
        f"PUBLISH -> next process read p50 {_ms(transits, 50)} ms, p90 {_ms(transits, 90)}; "
        f"raw PING after 1 ms idle p50 {_ms(pings, 50)} ms"
    )


def _ms(values: list[float], q: float) -> str:
    return f"{bl.percentile(values, q) * 1e3:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--flavor", choices=("sync", "async"), default="sync")
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--cprofile", action="store_true", help="cProfile process 0")
    parser.add_argument(
        "--sort", default="tottime", help="with --cprofile: pstats order (tottime, cumtime)"
    )
    parser.add_argument("--py-spy", action="store_true", help="py-spy record process 0")
    args = parser.parse_args(argv)
    server = start_redis()
    workdir = tempfile.mkdtemp(prefix="inturn-prof-")
    try:
        ctx = bl._process_context()
        start = ctx.Barrier(args.processes + 1)
        out = ctx.Queue()
        procs = [
            ctx.Process(
                target=_worker,
                args=(
                    server.url,
                    args.flavor,
                    args.seconds,
                    start,
                    i,
                    out,
                    args.sort if args.cprofile else "",
                ),
                daemon=True,
            )
            for i in range(args.processes)
        ]
        for proc in procs:
            proc.start()
        start.wait(timeout=60)  # py-spy samples the loop, not the imports
        spy = None
        spy_bin = shutil.which("py-spy") or shutil.which(
            "py-spy", path=str(Path(sys.executable).parent)
        )
        if args.py_spy and spy_bin is None:
            print("py-spy is not installed (pip install py-spy): no sampling", file=sys.stderr)
        if args.py_spy and spy_bin:
            spy_out = Path(workdir) / "spy.txt"
            spy = subprocess.Popen(
                [
                    spy_bin,
                    "record",
                    "--pid",
                    str(procs[0].pid),
                    "--duration",
                    str(max(1, int(args.seconds) - 1)),
                    "--rate",
                    "500",
                    "--format",
                    "raw",
                    "--output",
                    str(spy_out),
                    "--threads",
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
            )
        results = [out.get(timeout=args.seconds + 60) for _ in procs]
        for proc in procs:
            proc.join(timeout=5)
        # Every body start, with its process, and every push read, with its process.
        bodies = sorted((t[1], i, t) for i, turns, _, _, _ in results for t in turns)
        pushes = {i: sorted(p) for i, _, p, _, _ in results}
        leave_to_push, push_to_body, leave_to_body = [], [], []
        for (_, i_prev, prev), (body, i_next, _) in itertools.pairwise(bodies):
            leave = prev[2]
            if i_prev == i_next or body < leave:
                continue
            leave_to_body.append(body - leave)
            read = [p for p in pushes[i_next] if leave <= p <= body]
            if read:
                leave_to_push.append(read[0] - leave)
                push_to_body.append(body - read[0])
        release_rtt = [t[3] - t[2] for _, turns, _, _, _ in results for t in turns]
        n = len(leave_to_body)
        print(
            f"inturn turn ({args.flavor}), {args.processes} processes, one key, hold 2 ms, "
            f"{args.seconds:g} s"
        )
        print(f"hand-offs between processes: {n}; turns: {len(bodies)}")
        print(f"{'segment':<44}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}")
        for label, values in (
            ("leave -> next holder's body (the hand-off)", leave_to_body),
            ("leave -> push read by next holder's listener", leave_to_push),
            ("push read -> body (listener to waiter)", push_to_body),
            ("leave -> own turn exit returned (RELEASE)", release_rtt),
        ):
            print(f"{label:<44}{_ms(values, 50):>9}{_ms(values, 90):>9}{_ms(values, 99):>9}")
        cpu = sum(r[4] for r in results)
        per_turn = cpu / max(len(bodies), 1) * 1e3
        print(f"client CPU per turn (all processes, all threads): {per_turn:.3f} ms")
        _floor(ctx, int(server.url.rsplit(":", 1)[1].split("/")[0]), args.processes)
        stats = next((s for _, _, _, s, _ in results if s), "")
        if stats:
            print("\ncProfile of process 0 (its whole loop; CPU seconds), by the --sort order:")
            print("\n".join(stats.splitlines()[:52]))
        if spy is not None:
            spy.wait(timeout=args.seconds + 30)
            where: collections.Counter[str] = collections.Counter()
            total = 0
            with contextlib_suppress():
                for line in (Path(workdir) / "spy.txt").read_text().splitlines():
                    stack, _, count = line.rpartition(" ")
                    frames = stack.split(";")
                    # The thread, the deepest frame of inturn's own code, and the leaf.
                    ours = [f for f in frames if "inturn/" in f] or ["(not in inturn)"]
                    thread = "listener" if "wakeups" in stack or "_listen" in stack else "main"
                    leaf = frames[-1].split(" (")[0]
                    where[f"{thread:<8} {ours[-1].split(' (')[0]} > {leaf}"] += int(count)
                    total += int(count)
            print(f"\npy-spy of process 0: {total} CPU samples at 500/s over the loop")
            for name, count in where.most_common(20):
                print(f"{100 * count / max(total, 1):6.1f}%  {name}")
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def contextlib_suppress() -> Any:
    import contextlib

    return contextlib.suppress(OSError, ValueError)


if __name__ == "__main__":
    sys.exit(main())
