"""A loopback TCP fault proxy, switchable at run time, one listener per tag.

Each tag (one per worker, say) gets its own listening port on 127.0.0.1 that forwards to the
server; ``set_mode(mode, tag=...)`` changes what its connections do from the next chunk of
bytes on (``tag=None``: every tag). Modes:

- ``pass``: forward both ways;
- ``delay``: forward each chunk after ``delay_ms``;
- ``blackhole``: accept and hold bytes, forward nothing (held bytes flow on when the mode
  returns to ``pass``, as TCP would deliver them after a partition heals, if both sides are
  still connected);
- ``reset``: close both sides of every connection now (RST), and each new one at once;
- ``drop_reply``: forward the client's bytes to the server, then close both sides before the
  server's reply is forwarded ("the server ran it, the client never heard"). ``drop_reply_once``
  arms it for one connection only: the next one that gets a reply.

Threads only (two per connection), bounded by ``stop()``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["FaultProxy", "Mode"]

Mode = Literal["pass", "delay", "blackhole", "reset", "drop_reply"]
_CHUNK = 65536


@dataclass
class _Conn:
    tag: str
    client: socket.socket
    server: socket.socket
    closed: threading.Event = field(default_factory=threading.Event)
    # bytes seen from the client since the last reply, for drop-reply
    asked: bool = False

    def close(self, rst: bool = True) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                if rst:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # close() alone is deferred while the other pump thread sits in recv() on
                # this socket: the peer would never see the end (a half-open link)
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class FaultProxy:
    """Forwards 127.0.0.1:<port_for(tag)> to ``target``; faults switch per tag at run time."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._listeners: dict[str, socket.socket] = {}
        self._modes: dict[str, Mode] = {}
        self._delay: dict[str, float] = {}
        self._drop_once: dict[str, int] = {}
        self._conns: list[_Conn] = []
        self._stopped = threading.Event()
        self.dropped_replies = 0
        self.resets = 0

    # -- listeners -------------------------------------------------------------------
    def port_for(self, tag: str = "default") -> int:
        """The port that tag's clients connect to (a listener is made on first use)."""
        with self._lock:
            if tag not in self._listeners:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", 0))
                sock.listen(128)
                sock.settimeout(0.2)
                self._listeners[tag] = sock
                self._modes.setdefault(tag, "pass")
                threading.Thread(target=self._accept, args=(tag, sock), daemon=True).start()
            port: int = self._listeners[tag].getsockname()[1]
            return port

    def set_mode(self, mode: Mode, *, tag: str | None = None, delay_ms: float = 0.0) -> None:
        """Switch ``tag`` (None: every tag) to ``mode``; ``reset`` closes its connections now."""
        with self._lock:
            tags = list(self._listeners) if tag is None else [tag]
            for t in tags:
                self._modes[t] = mode
                self._delay[t] = delay_ms / 1000
            victims = [c for c in self._conns if c.tag in tags] if mode == "reset" else []
        for conn in victims:
            self.resets += 1
            conn.close()

    def drop_reply_once(self, tag: str | None = None) -> None:
        """The next reply on one connection of ``tag`` (None: any) is dropped and both closed."""
        with self._lock:
            key = "*" if tag is None else tag
            self._drop_once[key] = self._drop_once.get(key, 0) + 1

    def pending_drops(self) -> int:
        with self._lock:
            return sum(self._drop_once.values())

    def mode(self, tag: str) -> Mode:
        with self._lock:
            return self._modes.get(tag, "pass")

    def connections(self, tag: str | None = None) -> int:
        with self._lock:
            self._conns = [c for c in self._conns if not c.closed.is_set()]
            return sum(1 for c in self._conns if tag is None or c.tag == tag)

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            listeners = list(self._listeners.values())
            conns = list(self._conns)
        for sock in listeners:
            with contextlib.suppress(OSError):
                sock.close()
        for conn in conns:
            conn.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- forwarding ------------------------------------------------------------------
    def _accept(self, tag: str, listener: socket.socket) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.mode(tag) == "reset":
                _Conn(tag, client, client).close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=2)
            except OSError:
                _Conn(tag, client, client).close()
                continue
            for sock in (client, server):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(tag, client, server)
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._pump, args=(conn, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(conn, False), daemon=True).start()

    def _take_drop(self, tag: str) -> bool:
        with self._lock:
            for key in (tag, "*"):
                if self._drop_once.get(key, 0) > 0:
                    self._drop_once[key] -= 1
                    return True
            return False

    def _pump(self, conn: _Conn, upstream: bool) -> None:
        src, dst = (conn.client, conn.server) if upstream else (conn.server, conn.client)
        held: list[bytes] = []
        try:
            while not conn.closed.is_set():
                try:
                    data = src.recv(_CHUNK)
                except OSError:
                    break
                if not data:
                    break
                mode = self.mode(conn.tag)
                while mode == "blackhole" and not conn.closed.is_set():
                    held.append(data)
                    data = b""
                    time.sleep(0.02)
                    mode = self.mode(conn.tag)
                if conn.closed.is_set() or mode == "reset":
                    break
                if held:
                    data = b"".join(held) + data
                    held.clear()
                if mode == "delay":
                    time.sleep(self._delay.get(conn.tag, 0.0))
                if not upstream and (mode == "drop_reply" or self._take_drop(conn.tag)):
                    self.dropped_replies += 1
                    break
                try:
                    dst.sendall(data)
                except OSError:
                    break
        finally:
            conn.close(rst=False)
