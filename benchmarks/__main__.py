"""Run inturn's benchmarks with one command: one Markdown report and PNG plots.

    python -m benchmarks [NAME ...] [--quick | --tiny] [--out PATH] [--img-dir DIR] [--no-plots]

NAME is any of: locks, mailbox, scale, footprint, pgbouncer, celery, bot. Without names,
``--quick`` runs locks, mailbox, scale and footprint (about 3.5 minutes on an idle 2-core
machine), the full mode runs every one of them (about an hour: the footprint run alone takes
1,000,000 keys through Redis and 100,000 through PostgreSQL), and ``--tiny`` runs the
scale benchmark's seconds-long smoke mode (what the test suite runs). Each benchmark runs as
its own process and starts its own servers (redis-server, a throwaway PostgreSQL, a Celery
worker, PgBouncer); a benchmark that fails is reported as such and the others still run.

The report (stdout, and ``--out``, by default ``docs/benchmarks-latest.md``) starts with the
command, the versions (Python, redis-server, PostgreSQL, redis-py, psycopg, inturn's git
commit) and the machine (cores, CPU), followed by each benchmark's own tables. The plots
(``--img-dir``, by default ``docs/img``) are drawn from the scale benchmark's results, and each
one carries the same command, versions and machine in its footer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(HERE), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _facts import cpu_model, version  # noqa: E402

NAMES = ("locks", "mailbox", "scale", "footprint", "pgbouncer", "celery", "bot")
QUICK_DEFAULT = ("locks", "mailbox", "scale", "footprint")


@dataclass(frozen=True)
class Mode:
    name: str  # "tiny", "quick" or "full"

    @property
    def flag(self) -> list[str]:
        return [] if self.name == "full" else [f"--{self.name}"]


@dataclass
class Outcome:
    name: str
    command: str
    seconds: float
    markdown: str = ""
    error: str | None = None
    skipped: str | None = None
    data: dict[str, Any] | None = None


def _commands(name: str, mode: Mode, workdir: Path) -> tuple[list[str], Path | None] | str:
    """The argv that runs one benchmark (and the Markdown file it writes), or why it cannot."""
    py = sys.executable
    md = workdir / f"{name}.md"
    quick = mode.name != "full"
    if name == "locks":
        if mode.name == "tiny":
            return "no tiny mode (its --quick takes about a minute)"
        return [py, "benchmarks/bench_locks.py", *mode.flag, "--markdown", str(md)], md
    if name == "mailbox":
        if mode.name == "tiny":
            return "no tiny mode (its --quick takes about 40 s)"
        return [py, "benchmarks/bench_mailbox.py", *mode.flag, "--markdown", str(md)], md
    if name == "scale":
        extra = [] if quick else ["--cluster"]
        argv = [py, "benchmarks/bench_scale.py", *mode.flag, *extra, "--markdown", str(md)]
        return [*argv, "--json", str(workdir / "scale.json")], md
    if name == "footprint":
        if not (HERE / "bench_footprint.py").exists():
            return "benchmarks/bench_footprint.py is not in this checkout"
        if mode.name == "tiny":
            return "not run in tiny mode"
        code = (
            "import sys; sys.path[:0] = ['benchmarks', '.']; "
            "from benchmarks.bench_footprint import main; "
        )
        if quick:  # 20,000 keys on each engine
            code += "sys.exit(main(['--quick']))"
        else:  # 1,000,000 on Redis (~7 min); PostgreSQL takes ~330 keys/s: 100,000 there
            code += "sys.exit(main(['--no-postgres']) or main(['--no-redis', '--keys', '100000']))"
        return [py, "-c", code], None
    if name == "pgbouncer":
        if mode.name == "tiny":
            return "not run in tiny mode"
        if not (shutil.which("pgbouncer") or os.path.exists("/usr/sbin/pgbouncer")):
            return "pgbouncer is not installed"
        return [py, "benchmarks/bench_pgbouncer.py"], None
    if name == "celery":
        if mode.name == "tiny":
            return "not run in tiny mode"
        return [py, "benchmarks/bench_celery.py", *(["--quick"] if quick else [])], None
    if name == "bot":
        if mode.name == "tiny":
            return "not run in tiny mode"
        return [py, "benchmarks/bench_bot.py", *(["--users", "50"] if quick else [])], None
    raise ValueError(name)


def run_one(name: str, mode: Mode, workdir: Path) -> Outcome:
    planned = _commands(name, mode, workdir)
    if isinstance(planned, str):
        return Outcome(name, "-", 0.0, skipped=planned)
    argv, md = planned
    shown = shlex.join(["python", *argv[1:]]).replace(str(workdir) + "/", "")
    print(f"\n== {name}: {shown}", file=sys.stderr, flush=True)
    began = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    try:
        proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    except OSError as exc:
        return Outcome(name, shown, time.monotonic() - began, error=str(exc))
    seconds = time.monotonic() - began
    outcome = Outcome(name, shown, seconds)
    text = md.read_text() if md is not None and md.exists() else proc.stdout
    outcome.markdown = text.replace(str(workdir) + "/", "")  # a temp dir says nothing
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
        outcome.error = f"exit status {proc.returncode} (stderr above); last output: {tail}"
    data = workdir / "scale.json"
    if name == "scale" and data.exists():
        outcome.data = json.loads(data.read_text())
    return outcome


# -- facts --------------------------------------------------------------------------------


def _run(argv: Sequence[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip()
    return "not found"


def _postgres_version() -> str:
    with contextlib.suppress(Exception):
        from inturn._torture.postgres_server import postgres_bindir

        return _run([str(postgres_bindir() / "postgres"), "--version"])
    binary = shutil.which("postgres")
    return _run([binary, "--version"]) if binary else "not found"


def facts(argv: Sequence[str]) -> dict[str, str]:
    sha = _run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"])
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    return {
        "command": shlex.join(["python", "-m", "benchmarks", *argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{os.cpu_count()} cores (usable: {affinity}); {cpu_model()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "redis-server": _run(["redis-server", "--version"]).split(" sha=")[0],
        "postgresql": _postgres_version(),
        "redis-py": version("redis"),
        "psycopg": version("psycopg"),
        "inturn git": sha + (" (src/ modified)" if dirty and dirty != "not found" else ""),
    }


def footer(f: dict[str, str]) -> str:
    """One line of provenance for a figure."""
    return (
        f"{f['command']}  |  inturn {f['inturn git']}  |  {f['python']}  |  "
        f"{f['redis-server']}  |  {f['postgresql']}  |  redis-py {f['redis-py']}  |  "
        f"{f['machine']}  |  {f['date']}"
    )


# -- plots --------------------------------------------------------------------------------


def plot(data: dict[str, Any], f: dict[str, str], img_dir: Path) -> list[Path]:
    """PNG figures from the scale benchmark's results; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "plots skipped: matplotlib is not installed (pip install -e '.[bench]')",
            file=sys.stderr,
        )
        return []
    img_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    note = footer(f)

    def finish(fig: Any, name: str) -> None:
        fig.text(0.01, 0.01, note, fontsize=6, color="#555555", wrap=True)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        path = img_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    rtt = data.get("rtt") or {}
    handoff = [r for r in data.get("handoff") or [] if not r.get("error") or r.get("handoffs")]
    if handoff:
        fig, ax = plt.subplots(figsize=(10, 4.8))
        labels = [f"{r['lock']}\n({r['flavor']})" for r in handoff]
        xs = range(len(handoff))
        ax.bar([x - 0.2 for x in xs], [r["handoff_p50_ms"] for r in handoff], 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], [r["handoff_p99_ms"] for r in handoff], 0.4, label="p99")
        for flavor, style in (("sync", "--"), ("async", ":")):
            ping = rtt.get(f"{flavor} after 1 ms idle", {}).get("p50")
            if ping:
                ax.axhline(ping, linestyle=style, color="black", linewidth=1)
                ax.text(
                    len(handoff) - 0.5,
                    ping,
                    f"PING p50 after 1 ms idle ({flavor})",
                    fontsize=7,
                    ha="right",
                    va="bottom",
                )
        ax.set_yscale("log")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_ylabel("release -> next holder's body (ms, log)")
        procs = handoff[0]["processes"]
        ax.set_title(f"Hand-off across {procs} processes on one key (hold 2 ms)")
        ax.legend()
        finish(fig, "handoff.png")
    cycles = [r for r in data.get("cycles") or [] if not r.get("error")]
    if cycles:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        labels = [f"{r['lock']}\n({r['flavor']})" for r in cycles]
        colors = ["#4c72b0" if r["lock"].startswith("inturn") else "#999999" for r in cycles]
        ax.bar(range(len(cycles)), [r["us"] for r in cycles], color=colors)
        for i, r in enumerate(cycles):
            ax.text(i, r["us"], f"x{r['x_pings']:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(cycles)), labels, fontsize=7)
        ax.set_ylabel("us per acquire + release (label: x two PINGs)")
        ax.set_title("Uncontended cycle against two plain round trips")
        finish(fig, "cycle.png")
    users = [r for r in data.get("users") or [] if r.get("turns")]
    if users:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        labels = [f"{r['lock']}\n{r['flavor']}, {r['where']}" for r in users]
        ax.bar(range(len(users)), [r["turns_s"] for r in users], color="#55a868")
        for i, r in enumerate(users):
            ax.text(
                i, r["turns_s"], f"p99 {r['p99_ms']:.1f} ms", ha="center", va="bottom", fontsize=7
            )
        ax.set_xticks(range(len(users)), labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("turns/s, log (label: latency p99)")
        first = users[0]
        ax.set_title(f"Many users, mostly uncontended ({first['turns']:,} turns per row)")
        finish(fig, "users.png")
    ops = [r for r in data.get("ops") or [] if not r.get("error")]
    if ops:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        xs = range(len(ops))
        ax.bar([x - 0.2 for x in xs], [r["ops_s"] for r in ops], 0.4, label="redis-benchmark ops/s")
        ax.bar(
            [x + 0.2 for x in xs],
            [r["server_ceiling_s"] for r in ops],
            0.4,
            label="server-bound (1e6 / server us per call)",
        )
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [r["command"] for r in ops], fontsize=7)
        ax.set_ylabel("operations/s (log)")
        ax.set_title("One redis-server: script ops/s")
        ax.legend(fontsize=7)
        finish(fig, "script-ops.png")
    return written


# -- report -------------------------------------------------------------------------------


def _demote(markdown: str) -> str:
    """Put a benchmark's own headings under the report's."""
    out = []
    for line in markdown.splitlines():
        out.append("#" + line if line.startswith("#") else line)
    return "\n".join(out)


def report(
    outcomes: Sequence[Outcome], f: dict[str, str], images: Sequence[Path], out: Path | None
) -> str:
    lines = ["# inturn benchmarks", ""]
    lines += [f"- **{k}**: " + (f"`{v}`" if k == "command" else v) for k, v in f.items()]
    lines += ["", "| benchmark | command | seconds | result |", "|---|---|---:|---|"]
    for o in outcomes:
        result = (
            "skipped: " + o.skipped
            if o.skipped
            else ("failed: " + o.error.splitlines()[0] if o.error else "ok")
        )
        lines.append(f"| {o.name} | `{o.command}` | {o.seconds:.0f} | {result} |")
    if images:
        lines.append("")
        base = out.parent if out is not None else Path.cwd()
        for image in images:
            rel = os.path.relpath(image, base)
            lines.append(f"![{image.stem}]({rel})")
    for o in outcomes:
        if o.skipped:
            continue
        lines += ["", f"## {o.name}", "", f"`{o.command}`", ""]
        if o.error:
            lines += [f"**failed**: {o.error}", ""]
        body = o.markdown.strip()
        if any(line.startswith(("#", "|")) for line in body.splitlines()):
            lines.append(_demote(body))
        else:
            lines += ["```text", body, "```"]  # output, not code to run
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(NAMES)}")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="about 3.5 minutes on 2 cores")
    size.add_argument(
        "--tiny", action="store_true", help="seconds: the scale benchmark's smoke run"
    )
    parser.add_argument(
        "--out",
        default="docs/benchmarks-latest.md",
        help="the Markdown report (default: %(default)s)",
    )
    parser.add_argument(
        "--img-dir", default="docs/img", help="where the PNGs go (default: %(default)s)"
    )
    parser.add_argument("--no-plots", action="store_true", help="no PNGs")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)} (known: {', '.join(NAMES)})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    mode = Mode("tiny" if args.tiny else "quick" if args.quick else "full")
    names = args.names or (
        ["scale"] if mode.name == "tiny" else QUICK_DEFAULT if mode.name == "quick" else NAMES
    )
    f = facts(argv)
    workdir = Path(tempfile.mkdtemp(prefix="inturn-benchmarks-"))
    try:
        outcomes = [run_one(name, mode, workdir) for name in names]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    images: list[Path] = []
    out = Path(args.out) if args.out else None
    data = next((o.data for o in outcomes if o.data), None)
    if data and not args.no_plots:
        images = plot(data, f, Path(args.img_dir))
    text = report(outcomes, f, images, out)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}" + "".join(f", {p}" for p in images), file=sys.stderr)
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
