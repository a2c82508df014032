"""A torture worker process: ``python -m inturn._torture.worker CONFIG.json``.

The config (JSON) says ``mode`` and its settings; every record goes to ``out`` as one JSON
line, written and flushed at once so a SIGKILLed worker leaves what it did. Records:

- ``span``: a turn as it ran (key, fence, asked, joined, start, end, worker) plus ``lost``
  (``turn.lost`` set by the end) and ``refused`` (the sink refused one of its writes); the
  spans alone also go to ``<out>.history`` in :meth:`inturn.testing.History.dump`'s format;
- ``error``: a call that raised (type and message); ``closed``: one that a gate's close
  ended with the closed error (mode ``closing``), and ``close``: how long that close took;
- ``submitted``: a message whose ``submit`` returned (acknowledged), ``submit_error`` one
  whose submit raised; ``handled``: a handler call (message id, fence, accepted by the sink).

Modes: ``turns`` (async tasks or, with ``sync``, threads, over ``keys``), ``mailbox`` (submit
``per_key`` messages per key and handle what this process drains), ``recover`` (sweep and
drain a mailbox until every key is empty), ``burst`` (a fresh process asks 5 times per key at
once; spans carry the call index), ``fork`` (a gate made and used before ``os.fork()``, then
both processes contend), ``closing`` (gates made and closed over and over while their tasks
and threads ask, hold and wait).
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from inturn._torture.sink import FencedSink
from inturn.testing import Span

__all__ = ["main"]


class _Dying:
    """``die_at`` (``waiting``, ``body``, ``released``, ``effect``) after ``die_after`` events:
    SIGKILL this process at that point."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.point = cfg.get("die_at")
        self.left = cfg.get("die_after", 1)

    def at(self, point: str) -> None:
        if point == self.point:
            self.left -= 1
            if self.left <= 0:
                os.kill(os.getpid(), signal.SIGKILL)


class Recorder:
    def __init__(self, path: str, worker: str) -> None:
        self.worker = worker
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
        self._lock = threading.Lock()

        # the spans alone, in History.dump's format (History.load reads it back)
        self._history = open(Path(path).with_suffix(".history"), "a", encoding="utf-8")  # noqa: SIM115

    def write(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"t": kind, "worker": self.worker, **fields})
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            if kind == "span":
                span = Span(
                    fields["key"],
                    fields["fence"],
                    fields["asked"],
                    fields["joined"],
                    fields["start"],
                    fields["end"],
                    f"{self.worker}-t{fields['task']}",
                )
                self._history.write(json.dumps(asdict(span)) + "\n")
                self._history.flush()

    def close(self) -> None:
        self._file.close()
        self._history.close()


def _span(rec: Recorder, key: str, turn: Any, start: float, refused: bool, task: int) -> None:
    """Record a turn as it ran, ending now (see the module docstring)."""
    rec.write(
        "span",
        key=key,
        fence=turn.fence,
        asked=turn.asked_at,
        joined=turn.joined_at,
        start=start,
        end=time.monotonic(),
        lost=turn.lost.is_set(),
        refused=refused,
        task=task,
    )


def _gate(cfg: dict[str, Any]) -> Any:
    import inturn

    return inturn.Gate.from_url(cfg["url"], namespace=cfg["namespace"], lease=cfg["lease"])


async def _turns_async(cfg: dict[str, Any], rec: Recorder, gate: Any) -> None:
    import inturn

    keys: list[str] = cfg["keys"]
    deadline = time.monotonic() + cfg.get("duration", 30.0)
    hold = cfg.get("hold", 0.01)
    block = cfg.get("block", 0.0)  # seconds the loop is blocked inside some bodies
    block_p = cfg.get("block_p", 0.0)
    cancel_p = cfg.get("cancel_p", 0.0)
    timeout = cfg.get("timeout", 3.0)
    rng = random.Random(cfg.get("seed", os.getpid()))
    dying = _Dying(cfg)

    async def one(n: int, key: str) -> None:
        sink = sinks[n]
        start = 0.0
        refused = False
        called = time.monotonic()
        try:
            request = gate.turn(key, timeout=timeout)
            if dying.point == "waiting":
                asyncio.get_running_loop().call_later(0.01, dying.at, "waiting")
            async with request as turn:
                start = time.monotonic()
                try:
                    refused |= not sink.write(key, turn.fence, rec.worker)
                    dying.at("body")
                    if block and rng.random() < block_p:
                        time.sleep(block)  # noqa: ASYNC251 - a blocked event loop, on purpose
                    await asyncio.sleep(rng.random() * hold)
                    refused |= not sink.write(key, turn.fence, rec.worker)
                finally:
                    _span(rec, key, turn, start, refused, n)
        except asyncio.CancelledError:
            raise
        except (inturn.InturnError, OSError) as exc:
            rec.write(
                "error",
                key=key,
                type=type(exc).__name__,
                message=str(exc)[:200],
                elapsed=time.monotonic() - called,
            )
            await asyncio.sleep(0.05)

    async def task(n: int) -> None:
        while time.monotonic() < deadline:
            key = rng.choice(keys)
            if cancel_p:
                job = asyncio.create_task(one(n, key))
                await asyncio.sleep(rng.random() * hold * 2)
                if not job.done() and rng.random() < cancel_p:
                    job.cancel()
                    rec.write("cancelled", key=key)
                await asyncio.gather(job, return_exceptions=True)
            else:
                await one(n, key)

    tasks = cfg.get("tasks", 4)
    sinks = [FencedSink(cfg["sink"]) for _ in range(tasks)]
    await asyncio.gather(*(task(n) for n in range(tasks)))


def _turns_sync(cfg: dict[str, Any], rec: Recorder, gate: Any) -> None:
    import inturn

    keys: list[str] = cfg["keys"]
    deadline = time.monotonic() + cfg.get("duration", 30.0)
    hold = cfg.get("hold", 0.01)
    timeout = cfg.get("timeout", 3.0)

    def thread(n: int) -> None:
        rng = random.Random(cfg.get("seed", os.getpid()) * 31 + n)
        sink = FencedSink(cfg["sink"])
        while time.monotonic() < deadline:
            key = rng.choice(keys)
            called = time.monotonic()
            try:
                with gate.turn_sync(key, timeout=timeout) as turn:
                    start = time.monotonic()
                    refused = not sink.write(key, turn.fence, rec.worker)
                    time.sleep(rng.random() * hold)
                    refused |= not sink.write(key, turn.fence, rec.worker)
                    _span(rec, key, turn, start, refused, n)
            except (inturn.InturnError, OSError) as exc:
                rec.write(
                    "error",
                    key=key,
                    type=type(exc).__name__,
                    message=str(exc)[:200],
                    elapsed=time.monotonic() - called,
                )
                time.sleep(0.05)

    threads = [threading.Thread(target=thread, args=(n,)) for n in range(cfg.get("tasks", 4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _handler(cfg: dict[str, Any], rec: Recorder) -> Any:
    sink = FencedSink(cfg["sink"])
    hold = cfg.get("hold", 0.005)
    dying = _Dying(cfg)

    async def handler(msg: Any) -> None:
        payload = msg.payload
        mid = payload["id"] if isinstance(payload, dict) else str(payload)
        start = time.monotonic()
        accepted = sink.write(msg.key, msg.fence, rec.worker, msg=mid)
        rec.write(
            "handled",
            key=msg.key,
            id=mid,
            fence=msg.fence,
            accepted=accepted,
            attempt=msg.attempt,
            start=start,
            size=len(json.dumps(payload)),
            intact=payload == cfg.get("expect", {}).get(mid, payload),
        )
        dying.at("effect")
        await asyncio.sleep(random.random() * hold)

    return handler


async def _mailbox(cfg: dict[str, Any], rec: Recorder, gate: Any) -> None:
    import inturn

    box = gate.mailbox(
        cfg.get("box", "torture"),
        handler=_handler(cfg, rec),
        sweep_interval=cfg.get("sweep", 0.5),
        max_payload_bytes=cfg.get("max_payload", 64 * 1024),
        backoff=(0.1, 0.2, 0.5),
        max_attempts=20,
    )
    keys: list[str] = cfg["keys"]
    pad = "x" * cfg.get("pad", 0)
    for n in range(cfg.get("per_key", 3)):
        for i, key in enumerate(keys):
            mid = f"{rec.worker}-{i}-{n}"
            payload = {"id": mid, "pad": pad} if pad else {"id": mid}
            try:
                await box.submit(key, payload, id=mid)
            except Exception as exc:  # a raw driver error is recorded, and judged, too
                rec.write(
                    "submit_error",
                    key=key,
                    id=mid,
                    type=type(exc).__name__,
                    inturn_error=isinstance(exc, inturn.InturnError),
                    message=str(exc)[:200],
                )
                await asyncio.sleep(0.05)
            else:
                rec.write("submitted", key=key, id=mid)
            await asyncio.sleep(cfg.get("pace", 0.0))
    await box.drained(timeout=cfg.get("drain_timeout", 20.0))
    await asyncio.sleep(cfg.get("linger", 0.0))
    await gate.aclose()


async def _recover(cfg: dict[str, Any], rec: Recorder, gate: Any) -> None:
    box = gate.mailbox(
        cfg.get("box", "torture"),
        handler=_handler(cfg, rec),
        sweep_interval=None,
        backoff=(0.1, 0.2, 0.5),
        max_attempts=20,
    )
    deadline = time.monotonic() + cfg.get("duration", 20.0)
    quiet = 0  # quiet checks in a row: pending() may not count a dead drainer's in-flight
    while time.monotonic() < deadline:
        try:
            resumed = await box.sweep()
            await box.drained(timeout=1.0)
            pending = [await box.pending(k) for k in cfg["keys"]]
            draining = [await box.is_draining(k) for k in cfg["keys"]]
        except Exception as exc:  # a backend still coming back: try again
            rec.write("error", key="", type=type(exc).__name__, message=str(exc)[:200])
            await asyncio.sleep(0.2)
            continue
        quiet = quiet + 1 if not (any(pending) or any(draining) or resumed) else 0
        if quiet >= 2:
            break
        # a dead drainer's role lapses after its lease: wait that long between quiet checks
        await asyncio.sleep(cfg["lease"] * 1.5 if quiet else 0.2)
    await gate.aclose()


async def _burst(cfg: dict[str, Any], rec: Recorder, gate: Any) -> None:
    sink = FencedSink(cfg["sink"])

    async def call(key: str, index: int) -> None:
        async with gate.turn(key, timeout=cfg.get("timeout", 10.0)) as turn:
            start = time.monotonic()
            refused = not sink.write(key, turn.fence, rec.worker)
            await asyncio.sleep(0.001)
            _span(rec, key, turn, start, refused, index)

    await asyncio.gather(*(call(k, i) for k in cfg["keys"] for i in range(5)))
    await gate.aclose()


CLOSING_TASKS = 3
CLOSING_THREADS = 2


class _Closer:
    """Mode ``closing``: until ``duration``, a new gate whose tasks and threads ask for turns
    of ``keys`` (a body writes to the sink, asks ``turn.check()``, and writes again at most
    ``hold`` later), closed with
    ``aclose()`` after 0.05-0.4 s whatever they are doing. A call that the close ends with
    the closed error is a ``closed`` record, anything else an ``error``; each close a
    ``close`` record."""

    def __init__(self, cfg: dict[str, Any], rec: Recorder) -> None:
        self.cfg, self.rec = cfg, rec
        self.keys: list[str] = cfg["keys"]
        self.hold = cfg.get("hold", 0.05)
        self.timeout = cfg.get("timeout", 3.0)
        self.rng = random.Random(cfg.get("seed", os.getpid()))
        self.sinks = [FencedSink(cfg["sink"]) for _ in range(CLOSING_TASKS)]
        """The tasks' (a thread opens its own: SQLite connections stay in their thread)."""

    async def run(self) -> None:
        deadline = time.monotonic() + self.cfg.get("duration", 3.0)
        while time.monotonic() < deadline:
            if not await self.round(_gate(self.cfg)):
                return

    async def round(self, gate: Any) -> bool:
        """One gate, closed under its callers; False if a caller outlived the close."""
        closing = threading.Event()
        tasks = [asyncio.ensure_future(self.task(gate, closing, n)) for n in range(CLOSING_TASKS)]
        threads = [
            threading.Thread(target=self.thread, args=(gate, closing, n), daemon=True)
            for n in range(CLOSING_TASKS, CLOSING_TASKS + CLOSING_THREADS)
        ]
        for t in threads:
            t.start()
        await asyncio.sleep(self.rng.uniform(0.05, 0.4))
        began = time.monotonic()
        closing.set()
        await gate.aclose()  # the threads' side too
        self.rec.write("close", seconds=time.monotonic() - began)
        _, hung = await asyncio.wait(tasks, timeout=10)
        for t in threads:
            await asyncio.to_thread(t.join, 10)
        if hung or any(t.is_alive() for t in threads):
            self.rec.write("error", key="", type="Hung", message="a caller outlived the close")
            return False
        return True

    async def task(self, gate: Any, closing: threading.Event, n: int) -> None:
        while not closing.is_set():
            key, called = self.rng.choice(self.keys), time.monotonic()
            try:
                async with gate.turn(key, timeout=self.timeout) as turn:
                    start = time.monotonic()
                    refused = not self.sinks[n].write(key, turn.fence, self.rec.worker)
                    await turn.check()  # a call through the client, as the close may cut it
                    await asyncio.sleep(self.rng.random() * self.hold)
                    refused |= not self.sinks[n].write(key, turn.fence, self.rec.worker)
                    _span(self.rec, key, turn, start, refused, n)
            except Exception as exc:
                if self.ended(key, exc, called):
                    return

    def thread(self, gate: Any, closing: threading.Event, n: int) -> None:
        rng, sink = random.Random(n), FencedSink(self.cfg["sink"])
        try:
            while not closing.is_set():
                key, called = rng.choice(self.keys), time.monotonic()
                try:
                    with gate.turn_sync(key, timeout=self.timeout) as turn:
                        start = time.monotonic()
                        refused = not sink.write(key, turn.fence, self.rec.worker)
                        turn.check()
                        time.sleep(rng.random() * self.hold)
                        refused |= not sink.write(key, turn.fence, self.rec.worker)
                        _span(self.rec, key, turn, start, refused, n)
                except Exception as exc:
                    if self.ended(key, exc, called):
                        return
        finally:
            sink.close()

    def ended(self, key: str, exc: Exception, called: float) -> bool:
        """Record how a call ended; True when the close ended it."""
        import inturn

        closed = isinstance(exc, inturn.BackendUnavailable) and not exc.transient
        closed = closed and "closed" in str(exc)
        self.rec.write(
            "closed" if closed else "error",
            key=key,
            type=type(exc).__name__,
            message=str(exc)[:200],
            elapsed=time.monotonic() - called,
        )
        return closed


def _fork(cfg: dict[str, Any], rec: Recorder) -> None:
    gate = _gate(cfg)
    sink = FencedSink(cfg["sink"])
    with gate.turn_sync(cfg["keys"][0], timeout=10) as turn:  # used before the fork
        sink.write(turn.key, turn.fence, rec.worker)
    sink.close()
    pid = os.fork()
    if pid == 0:
        rec = Recorder(cfg["out"], rec.worker + "-child")
        code = 0
        try:
            asyncio.run(_turns_async(cfg, rec, gate))
        except BaseException as exc:
            rec.write("error", key="", type=type(exc).__name__, message=str(exc)[:200])
            code = 1
        os._exit(code)
    asyncio.run(_turns_async(cfg, rec, gate))
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        rec.write("error", key="", type="ChildFailed", message=str(status))


def main(config_path: str) -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the harness asks a hung worker
    cfg = json.loads(Path(config_path).read_text(encoding="utf-8"))
    rec = Recorder(cfg["out"], cfg["worker"])
    mode = cfg["mode"]
    print("ready", flush=True)
    if mode == "fork":
        _fork(cfg, rec)
        return
    gate = _gate(cfg)
    if mode == "turns" and cfg.get("sync"):
        _turns_sync(cfg, rec, gate)
        gate.close()
        return

    async def run() -> None:
        if mode == "turns":
            await _turns_async(cfg, rec, gate)
            await gate.aclose()
        elif mode == "mailbox":
            await _mailbox(cfg, rec, gate)
        elif mode == "recover":
            await _recover(cfg, rec, gate)
        elif mode == "burst":
            await _burst(cfg, rec, gate)
        elif mode == "closing":
            await gate.aclose()  # each round makes a gate of its own
            await _Closer(cfg, rec).run()
        else:
            raise SystemExit(f"unknown mode {mode!r}")

    asyncio.run(run())


if __name__ == "__main__":
    main(sys.argv[1])
