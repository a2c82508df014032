"""A loopback TCP proxy to Redis whose subclasses decide what to do with each read."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any


class PumpProxy:
    """Forward bytes both ways between clients and ``target``, through :meth:`forward`.

    Each accepted connection gets two pump threads (client -> server is "upstream") and a
    ``link`` dict they share. ``admit`` may refuse a connection (it is closed at once).
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def admit(self) -> bool:
        return True

    def forward(self, data: bytes, upstream: bool, link: dict[str, Any]) -> tuple[bytes, bool]:
        """What to send on of ``data``, and whether the connection goes on after it."""
        return data, True

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self.admit():
                client.close()
                continue
            server = socket.create_connection(self.target)
            link: dict[str, Any] = {}
            for args in ((client, server, True, link), (server, client, False, link)):
                thread = threading.Thread(target=self._pump, args=args, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(
        self, source: socket.socket, sink: socket.socket, upstream: bool, link: dict[str, Any]
    ) -> None:
        source.settimeout(0.2)
        try:
            while not self._closed.is_set():
                try:
                    data = source.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                data, going_on = self.forward(data, upstream, link)
                if data:
                    sink.sendall(data)
                if not going_on:
                    break
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(2)
