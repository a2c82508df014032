"""Throwaway Redis and PostgreSQL servers for tests, on free loopback ports in temp dirs.

Nothing here imports pytest or the library: `conftest.py` wraps these classes in fixtures, and a
script or benchmark can use them directly (`with RedisServer() as server: ...`).

Guarantees:
- Each server runs in its own temp dir and its own process group, and is only reachable on
  127.0.0.1 on a port picked by the OS; a start that loses the port to a racing process is retried
  on a new port.
- `stop()` is idempotent, kills whatever is left of the process group and removes the temp dir;
  an `atexit` hook stops every server still alive when the interpreter exits.
- A missing binary raises `MissingServerBinary`, which callers may turn into a skip.

Why not pytest-redis / pytest-postgresql: the fault tests need to kill, pause (SIGSTOP) and
restart a server on the same port, and to run Cluster and Sentinel; pytest-postgresql starts
`pg_ctl` as the current user, which PostgreSQL refuses when that is root (as in CI here).
Starting the servers ourselves costs ~150 lines and serves tests, benchmarks and scripts alike.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

__all__ = [
    "MissingServerBinary",
    "PostgresServer",
    "RedisCluster",
    "RedisServer",
    "ServerStartError",
    "free_port",
    "postgres_bindir",
    "spawn",
]

HOST: Final = "127.0.0.1"
_PORT_ATTEMPTS: Final = 5
_LOG_TAIL_CHARS: Final = 2000
_PORT_IN_USE = re.compile(r"address already in use", re.IGNORECASE)

# Errors a process start can hit for a moment and not the next time. EFAULT was seen once in CI:
# the execve of a redis-server (a binary that was there) failed in the vfork()ed child while the
# torture lab's other threads ran. The child had exited, so starting again leaks nothing.
_TRANSIENT_SPAWN: Final = frozenset({errno.EFAULT, errno.EAGAIN, errno.ENOMEM})
_SPAWN_ATTEMPTS: Final = 3

# Backstop for servers a test forgot to stop (or a run that was interrupted): id -> stop().
_live: dict[int, Callable[[], None]] = {}


@atexit.register
def _stop_all() -> None:
    for stop in list(_live.values()):
        with contextlib.suppress(Exception):
            stop()


def spawn(args: list[str], **options: Any) -> subprocess.Popen[bytes]:
    """`subprocess.Popen(args, **options)`, started again (up to three tries in all) when the
    start fails with an error that is known to pass: EFAULT, EAGAIN or ENOMEM."""
    for attempt in range(1, _SPAWN_ATTEMPTS):
        try:
            return subprocess.Popen(args, **options)
        except OSError as exc:
            if exc.errno not in _TRANSIENT_SPAWN:
                raise
            time.sleep(0.05 * attempt)
    return subprocess.Popen(args, **options)


class ServerStartError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


class MissingServerBinary(ServerStartError):
    """A server binary is not installed (`make test` installs it)."""


class _PortTaken(Exception):
    """The server lost its port to another process between `free_port()` and bind."""


def free_port() -> int:
    """Return a loopback port that was free a moment ago (the caller must handle a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise MissingServerBinary(
            f"{binary!r} is not installed or not on PATH; `make test` installs it with apt-get"
        )
    return path


def _log_tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-_LOG_TAIL_CHARS:]


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _redis_call(
    port: int, *args: str, timeout: float = 1.0, tls: ssl.SSLContext | None = None
) -> bytes:
    """Send one command over RESP; return a bulk reply's payload or a status/error line as is."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection((HOST, port), timeout=timeout))
        if tls is not None:
            sock = stack.enter_context(tls.wrap_socket(sock, server_hostname=HOST))
        sock.sendall(payload.encode())
        with sock.makefile("rb") as reader:
            line = reader.readline()
            if line.startswith(b"$"):
                size = int(line[1:])
                return reader.read(size + 2)[:size] if size >= 0 else b""
            return line.rstrip(b"\r\n")


def _redis_conf_value(value: str) -> str:
    return '""' if value == "" else value


class RedisServer:
    """A `redis-server` on a free 127.0.0.1 port, in its own temp dir and process group.

    Persistence is off (`save ""`, `appendonly no`) unless `options` (redis.conf directives,
    e.g. `{"maxmemory": "1mb", "maxmemory-policy": "noeviction", "appendonly": "yes"}`) say
    otherwise. `kill()`, `pause()`/`resume()` and `restart()` simulate a crash, a stall and a
    restart; `start()` after `kill()` brings the server back on the same port and dir, so data
    survives when `appendonly` is on. With `tls=True` the server speaks TLS only (no plain
    port), with a self-signed certificate for 127.0.0.1 made by `openssl`; `url` is then a
    `rediss://` URL that trusts it.
    """

    DEFAULT_OPTIONS: Final[Mapping[str, str]] = {"save": "", "appendonly": "no"}

    def __init__(
        self,
        options: Mapping[str, str] | None = None,
        *,
        binary: str = "redis-server",
        startup_timeout: float = 15.0,
        tls: bool = False,
    ) -> None:
        self.binary = _require(binary)
        self.options: dict[str, str] = {**self.DEFAULT_OPTIONS, **(options or {})}
        self.tls = tls
        self.startup_timeout = startup_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="inturn-redis-"))
        self.port = 0
        self.cluster_port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://{HOST}:{self.port}/0?ssl_ca_certs={self._cert}"
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def _cert(self) -> Path:
        return self.dir / "cert.pem"

    def _tls_directives(self) -> dict[str, str]:
        """Make the certificate (once) and say where it is; the plain port is closed."""
        key = self.dir / "key.pem"
        if not self._cert.exists():
            command = [_require("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes"]
            command += ["-keyout", str(key), "-out", str(self._cert), "-days", "2"]
            command += ["-subj", f"/CN={HOST}", "-addext", f"subjectAltName=IP:{HOST}"]
            subprocess.run(command, check=True, capture_output=True)
        return {
            "tls-cert-file": str(self._cert),
            "tls-key-file": str(key),
            "tls-ca-cert-file": str(self._cert),
            "tls-auth-clients": "no",
        }

    def _tls_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self._cert)) if self.tls else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the server (on its old port if it ran before) and wait until PING answers."""
        if self.running:
            return self
        self._reap()
        if self.port:
            try:
                self._launch(self.port, self.cluster_port)
            except _PortTaken:
                raise ServerStartError(
                    f"redis port {self.port} was taken while the server was down"
                ) from None
            return self
        for _ in range(_PORT_ATTEMPTS):
            port = free_port()
            bus_port = free_port() if self._cluster_enabled else 0
            try:
                self._launch(port, bus_port)
            except _PortTaken:
                continue
            self.port, self.cluster_port = port, bus_port
            return self
        raise ServerStartError(f"redis-server lost its port {_PORT_ATTEMPTS} times in a row")

    def stop(self) -> None:
        """Shut the server down, kill any leftovers and remove its temp dir. Idempotent."""
        self._terminate()
        shutil.rmtree(self.dir, ignore_errors=True)
        _live.pop(id(self), None)

    def restart(self) -> None:
        """Graceful shutdown, then start again on the same port and dir."""
        self._terminate()
        self.start()

    def kill(self) -> None:
        """SIGKILL the server (a crash): no shutdown save, no goodbye to clients."""
        if self._proc is not None:
            _kill_group(self._proc.pid)
            self._reap()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but stops answering (a stall)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause()`."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisServer {self.url} running={self.running}>"

    @property
    def _cluster_enabled(self) -> bool:
        return self.options.get("cluster-enabled", "no") == "yes"

    def _launch(self, port: int, bus_port: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        directives = {
            "bind": HOST,
            "port": str(port),
            "dir": str(self.dir),
            "logfile": str(self.log_path),
            "daemonize": "no",
            **self.options,
        }
        if self.tls:
            directives.update(port="0", **{"tls-port": str(port)}, **self._tls_directives())
        if self._cluster_enabled:
            directives.setdefault("cluster-config-file", "nodes.conf")
            directives.setdefault("cluster-port", str(bus_port))
        conf = self.dir / "redis.conf"
        conf.write_text(
            "".join(f"{key} {_redis_conf_value(val)}\n" for key, val in directives.items())
        )
        self.log_path.unlink(missing_ok=True)
        self._proc = spawn(
            [self.binary, str(conf)],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _live[id(self)] = self.stop
        self._wait_ready(port)

    def _wait_ready(self, port: int) -> None:
        assert self._proc is not None
        pid_line = f"process_id:{self._proc.pid}\r\n".encode()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log = _log_tail(self.log_path)
                self._reap()
                if _PORT_IN_USE.search(log):
                    raise _PortTaken
                raise ServerStartError(f"redis-server exited during startup:\n{log}")
            # PING says "loading" until an AOF/RDB is read back; INFO proves the answer came
            # from our process, not from whoever else might own the port.
            tls = self._tls_context()
            with contextlib.suppress(OSError):
                if _redis_call(port, "PING", tls=tls) == b"+PONG" and pid_line in _redis_call(
                    port, "INFO", "server", tls=tls
                ):
                    return
            time.sleep(0.01)
        self._terminate()
        raise ServerStartError(
            f"redis-server did not answer PING within {self.startup_timeout}s:\n"
            f"{_log_tail(self.log_path)}"
        )

    def _terminate(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                # A paused server would sit on SIGTERM forever.
                os.killpg(self._proc.pid, signal.SIGCONT)
                self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
        _kill_group(self._proc.pid)
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            self._proc = None


class RedisCluster:
    """A Redis Cluster of `masters` nodes (no replicas), each a `RedisServer`.

    `start()` returns once every node reports `cluster_state:ok`, so all 16384 slots are served.
    """

    def __init__(
        self,
        masters: int = 3,
        options: Mapping[str, str] | None = None,
        *,
        cli: str = "redis-cli",
        startup_timeout: float = 30.0,
        replicas: int = 0,
    ) -> None:
        self.cli = _require(cli)
        node_options = {"cluster-enabled": "yes", "cluster-node-timeout": "5000"}
        count = masters * (1 + replicas)
        self.nodes = [RedisServer({**node_options, **(options or {})}) for _ in range(count)]
        self.masters = masters
        self.replicas = replicas
        self.startup_timeout = startup_timeout

    def master_of_slot(self, slot: int = 0) -> RedisServer:
        """The running node that serves ``slot`` as a master now (CLUSTER SLOTS)."""
        for node in self.nodes:
            if not node.running:
                continue
            with contextlib.suppress(OSError):
                info = _redis_call(node.port, "CLUSTER", "NODES").decode()
                for line in info.splitlines():
                    fields = line.split()
                    if "master" not in fields[2] or "fail" in fields[2]:
                        continue
                    for part in fields[8:]:
                        low, _, high = part.partition("-")
                        if low.isdigit() and int(low) <= slot <= int(high or low):
                            port = int(fields[1].split(":")[1].split("@")[0])
                            return next(n for n in self.nodes if n.port == port)
        raise ServerStartError(f"no live master serves slot {slot}")

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every running node reports ``cluster_state:ok`` again."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if all(
                    b"cluster_state:ok" in _redis_call(node.port, "CLUSTER", "INFO")
                    for node in self.nodes
                    if node.running
                ):
                    return
            time.sleep(0.05)
        raise ServerStartError(f"cluster not ok within {timeout}s")

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> Self:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [
                    self.cli,
                    "--cluster",
                    "create",
                    *(f"{host}:{port}" for host, port in self.startup_nodes),
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=self.startup_timeout,
            )
            self._wait_ok()
        except subprocess.CalledProcessError as exc:
            self.stop()
            output = (exc.stdout + exc.stderr).decode(errors="replace")
            raise ServerStartError(f"redis-cli --cluster create failed:\n{output}") from exc
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if all(
                    b"cluster_state:ok" in _redis_call(node.port, "CLUSTER", "INFO")
                    for node in self.nodes
                ):
                    return
            time.sleep(0.05)
        raise ServerStartError(f"cluster not ok within {self.startup_timeout}s")


class RedisSentinel(RedisServer):
    """A Redis Sentinel on a free 127.0.0.1 port, monitoring one primary as `service`.

    Runs `redis-sentinel` if installed, else `redis-server --sentinel`, with a config of its own
    in a temp dir (Sentinel rewrites it). Quorum 1 and no replicas: a failover can never
    happen, so the sentinel only answers where the primary is. `start()` returns once
    `SENTINEL get-master-addr-by-name <service>` names the primary.
    """

    def __init__(
        self,
        primary_port: int,
        *,
        service: str = "mymaster",
        startup_timeout: float = 15.0,
        down_after_ms: int | None = None,
    ) -> None:
        binary = "redis-sentinel" if shutil.which("redis-sentinel") else "redis-server"
        super().__init__(binary=binary, startup_timeout=startup_timeout)
        self.primary_port = primary_port
        self.service = service
        self.down_after_ms = down_after_ms

    @property
    def url(self) -> str:
        """The `redis+sentinel://` URL of the monitored primary, db 0."""
        return f"redis+sentinel://{HOST}:{self.port}/{self.service}/0"

    def master_addr(self, port: int | None = None) -> tuple[str, int] | None:
        """The primary's address as the sentinel (on `port`, default ours) reports it, or None."""
        args = ("SENTINEL", "get-master-addr-by-name", self.service)
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
        with socket.create_connection((HOST, port or self.port), timeout=1.0) as sock:
            sock.sendall(payload.encode())
            with sock.makefile("rb") as reader:
                if not reader.readline().startswith(b"*2"):  # *-1: unknown service
                    return None
                host, primary_port = (
                    reader.read(int(reader.readline()[1:]) + 2)[:-2] for _ in range(2)
                )
        return host.decode(), int(primary_port)

    def client_count(self) -> int:
        """Connections the sentinel has from clients, not counting the one that asks."""
        info = _redis_call(self.port, "INFO", "clients").decode()
        found = re.search(r"^connected_clients:(\d+)", info, re.MULTILINE)
        if found is None:
            raise ServerStartError(f"sentinel INFO clients has no connected_clients:\n{info}")
        return int(found.group(1)) - 1

    def __repr__(self) -> str:
        return f"<RedisSentinel {self.url} running={self.running}>"

    def _launch(self, port: int, bus_port: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"bind {HOST}\nport {port}\ndir {self.dir}\nlogfile {self.log_path}\n"
            "daemonize no\nprotected-mode no\n"
            f"sentinel monitor {self.service} {HOST} {self.primary_port} 1\n"
            + (
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} {max(1000, 2 * self.down_after_ms)}\n"
                if self.down_after_ms is not None
                else ""
            )
        )
        self.log_path.unlink(missing_ok=True)
        args = [self.binary, str(conf)]
        if Path(self.binary).name != "redis-sentinel":
            args.append("--sentinel")
        self._proc = spawn(
            args,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _live[id(self)] = self.stop
        self._wait_ready(port)  # PING, and INFO naming our pid (Sentinel answers both)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if self.master_addr(port) == (HOST, self.primary_port):
                    return
            time.sleep(0.02)
        self._terminate()
        raise ServerStartError(
            f"sentinel did not name {self.service} within {self.startup_timeout}s:\n"
            f"{_log_tail(self.log_path)}"
        )


__all__ += ["RedisSentinel"]

# PostgreSQL lives in its own module, which uses the helpers above.
from inturn._torture.postgres_server import PostgresServer, postgres_bindir  # noqa: E402
