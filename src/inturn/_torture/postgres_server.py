"""A throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl``) on a free loopback port.

Re-exported by :mod:`inturn._torture.servers`; see that module for the guarantees.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from inturn._torture.servers import (
    _LOG_TAIL_CHARS,
    _PORT_ATTEMPTS,
    _PORT_IN_USE,
    HOST,
    MissingServerBinary,
    ServerStartError,
    _kill_group,
    _live,
    _log_tail,
    _PortTaken,
    free_port,
)

__all__ = ["PostgresServer", "postgres_bindir"]


def postgres_bindir() -> Path:
    """The bin dir of the newest PostgreSQL install (Debian keeps it off PATH)."""

    def version(bindir: str) -> tuple[int, ...]:
        name = Path(bindir).parent.name
        return tuple(int(part) for part in re.findall(r"\d+", name))

    found = sorted(
        (str(Path(p).parent) for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")), key=version
    )
    if found:
        return Path(found[-1])
    candidates: list[Path] = []
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, check=True)
            candidates.append(Path(out.stdout.decode().strip()))
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    raise MissingServerBinary(
        "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin "
        "or via pg_config; `make test` installs them with apt-get"
    )


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as: None (ourselves) unless we are root.

    PostgreSQL refuses to run as root, so root hands the cluster to `postgres` (created by the
    Debian package) or, failing that, `nobody`.
    """
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServerStartError("running as root and neither a 'postgres' nor a 'nobody' user exists")


class PostgresServer:
    """A throwaway PostgreSQL cluster (`initdb` + `pg_ctl`) on a free 127.0.0.1 port.

    Trust auth for the `postgres` superuser, unix sockets in the temp dir, `fsync=off` and
    friends (durability is not under test; a crash loses the cluster, which is thrown away
    anyway), `max_connections=200`. When run as root, the cluster belongs to an unprivileged
    user (see `_unprivileged_user`).
    """

    def __init__(
        self,
        settings: Mapping[str, str] | None = None,
        *,
        bindir: Path | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.bindir = bindir or postgres_bindir()
        self.settings: dict[str, str] = {
            "max_connections": "200",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            **(settings or {}),
        }
        self.startup_timeout = startup_timeout
        self.user = _unprivileged_user()
        self.dir = Path(tempfile.mkdtemp(prefix="inturn-pg-"))
        self.port = 0
        self._pgid: int | None = None
        self._initialized = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    def dsn_for(self, dbname: str) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/{dbname}"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        return self.dir / "postgres.log"

    def start(self) -> Self:
        """initdb on first use, then start on a free port and wait until it accepts connections."""
        if self._pgid is not None:
            return self
        if not self._initialized:
            self._initdb()
        if self.port:
            self._pg_ctl_start(self.port)
            return self
        for _ in range(_PORT_ATTEMPTS):
            port = free_port()
            try:
                self._pg_ctl_start(port)
            except _PortTaken:
                continue
            self.port = port
            return self
        raise ServerStartError(f"postgres lost its port {_PORT_ATTEMPTS} times in a row")

    def stop(self) -> None:
        """Fast shutdown, kill any leftovers and remove the temp dir. Idempotent."""
        self._terminate()
        shutil.rmtree(self.dir, ignore_errors=True)
        self._initialized = False
        _live.pop(id(self), None)

    def restart(self, mode: str = "fast") -> None:
        """Shut down (``fast``, or ``immediate``: a crash, recovered from WAL at start), then
        start again on the same port with the same data."""
        if mode == "immediate":
            self.kill()
        else:
            self._terminate()
        self.start()

    def kill(self) -> None:
        """``pg_ctl stop --mode=immediate``: every backend quits without a checkpoint."""
        if self._initialized and self._postmaster_pid() is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._run(
                    str(self.bindir / "pg_ctl"),
                    "stop",
                    "--wait",
                    "--mode=immediate",
                    "--pgdata",
                    str(self.data_dir),
                    timeout=15,
                )
        if self._pgid is not None:
            _kill_group(self._pgid)
            self._pgid = None

    def pause(self) -> None:
        """SIGSTOP the whole server (postmaster and backends): a stall."""
        if self._pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pgid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause()`."""
        if self._pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pgid, signal.SIGCONT)

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
        return f"<PostgresServer {self.dsn} running={self._pgid is not None}>"

    def _run(self, *args: str, timeout: float) -> subprocess.CompletedProcess[bytes]:
        env = {
            "PATH": f"{self.bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(self.dir),
            "LC_ALL": "C",
            "TZ": "UTC",
        }
        user = self.user
        return subprocess.run(
            args,
            cwd=self.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            start_new_session=True,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
        )

    def _initdb(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        result = self._run(
            str(self.bindir / "initdb"),
            "--pgdata",
            str(self.data_dir),
            "--username=postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            timeout=self.startup_timeout,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise ServerStartError(f"initdb failed:\n{output[-_LOG_TAIL_CHARS:]}")
        self._initialized = True

    def _pg_ctl_start(self, port: int) -> None:
        options = {
            "port": str(port),
            "listen_addresses": HOST,
            "unix_socket_directories": str(self.dir),
            **self.settings,
        }
        # pg_ctl hands `-o` to a shell.
        postgres_opts = " ".join(
            f"-c {shlex.quote(f'{key}={val}')}" for key, val in options.items()
        )
        _live[id(self)] = self.stop
        result = self._run(
            str(self.bindir / "pg_ctl"),
            "start",
            "--wait",
            f"--timeout={int(self.startup_timeout)}",
            "--pgdata",
            str(self.data_dir),
            "--log",
            str(self.log_path),
            "-o",
            postgres_opts,
            timeout=self.startup_timeout + 5,
        )
        postmaster = self._postmaster_pid()
        if postmaster is not None:
            # pg_ctl ran in a new session and postgres stays in its process group.
            with contextlib.suppress(ProcessLookupError):
                self._pgid = os.getpgid(postmaster)
        if result.returncode == 0 and self._accepts(port):
            return
        log = _log_tail(self.log_path)
        self._terminate()
        if _PORT_IN_USE.search(log):
            raise _PortTaken
        output = (result.stdout + result.stderr).decode(errors="replace")
        raise ServerStartError(f"pg_ctl start failed:\n{output}\n{log}")

    def _postmaster_pid(self) -> int | None:
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first_line)
        except (OSError, ValueError):
            return None

    def _accepts(self, port: int) -> bool:
        try:
            with socket.create_connection((HOST, port), timeout=2):
                return True
        except OSError:
            return False

    def _terminate(self) -> None:
        self.resume()
        if self._initialized and self._postmaster_pid() is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._run(
                    str(self.bindir / "pg_ctl"),
                    "stop",
                    "--wait",
                    "--mode=fast",
                    "--pgdata",
                    str(self.data_dir),
                    timeout=15,
                )
        if self._pgid is not None:
            _kill_group(self._pgid)
            self._pgid = None
