"""What both benchmark scripts share to start servers and line processes up."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Protocol


class BarrierLike(Protocol):
    """`threading.Barrier` or a multiprocessing one."""

    def wait(self, timeout: float | None = None) -> int: ...

    def abort(self) -> None: ...


class EventLike(Protocol):
    """`threading.Event` or a multiprocessing one."""

    def wait(self, timeout: float | None = None) -> bool: ...

    def set(self) -> None: ...


class Shared(Protocol):
    """A multiprocessing `Value("d")`, or a plain box in one process."""

    value: float


class Server(Protocol):
    @property
    def url(self) -> str: ...

    def stop(self) -> None: ...


def start_redis() -> Server:
    """A redis-server of our own on a free loopback port, via the test suite's helper."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.servers import RedisServer

    server: Server = RedisServer().start()
    return server
