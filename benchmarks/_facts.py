"""What the benchmark scripts share besides servers: machine facts (the command, CPU,
package versions), CPU time spent by processes, percentiles, and the clean-up of a run."""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def command() -> str:
    """The command line that ran the script, as one would retype it from the repo root."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(Path.cwd())
    return shlex.join(["python", str(script), *sys.argv[1:]])


def redis_version(url: str) -> str:
    """The version the redis-server at ``url`` reports."""
    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server").get("redis_version"))
    finally:
        client.close()


def machine_facts(
    redis_url: str, packages: Iterable[str], *, redis_note: str = "", os_line: bool = True
) -> list[tuple[str, str]]:
    """The facts every report starts with: command, date, cores, Python, OS, redis-server
    (with ``redis_note`` after its version) and the versions of ``packages``."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    facts = [
        ("command", command()),
        ("date", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
        ("nproc", f"{os.cpu_count()} (usable: {affinity}); {cpu_model()}"),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
    ]
    if os_line:
        facts.append(("os", platform.platform()))
    facts.append(("redis-server", redis_version(redis_url) + redis_note))
    facts.append(("packages", ", ".join(f"{p} {version(p)}" for p in packages)))
    return facts


def fact_lines(facts: Sequence[tuple[str, str]], skipped: Sequence[str]) -> tuple[str, str]:
    """The facts and the skipped parts as (text, markdown) report heads."""
    text = "\n".join(f"{key:>14}: {value}" for key, value in facts)
    if skipped:
        text += "\n\n" + "\n".join(f"skipped: {reason}" for reason in skipped)
    md = [f"- **{key}**: " + (f"`{value}`" if key == "command" else value) for key, value in facts]
    md += [f"- **skipped**: {reason}" for reason in skipped]
    return text, "\n".join(md)


@contextlib.contextmanager
def cleaned_up(*servers: Any, workdir: str | None = None) -> Iterator[list[Any]]:
    """Stop ``servers`` and those appended to the list it yields (the last started first;
    None entries skipped), and remove ``workdir``, when the block ends, however it ends."""
    started = list(servers)
    try:
        yield started
    finally:
        for server in reversed(started):
            if server is not None:
                server.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def process_cpu(pid: int) -> float:
    """A process's CPU seconds so far (user + system, all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its live children (a Celery worker and its pool)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(entry.name) == pid or int(fields[1]) == pid:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def redis_cpu(url: str) -> float:
    """The redis-server's CPU seconds so far (INFO cpu: user + system, main thread incl.)."""
    client = redis.Redis.from_url(url)
    try:
        info = client.info("cpu")
    finally:
        client.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
