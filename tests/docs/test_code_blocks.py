"""Every fenced code block of README.md and docs/*.md runs, as a user would run it.

How a block runs depends on its language (the fence's info string):

- ``python``: written to a file in a fresh temp dir and run with this interpreter, in a
  process of its own; it must exit 0. The file is named by a first-line comment such as
  ``# proj.py`` (Celery's ``-A proj``), else ``block.py``.
- ``sql``: run on a fresh PostgreSQL database on which ``inturn migrate`` ran.
- ``sh`` / ``bash`` / ``shell``: run by ``bash -e``; ``console``: each ``$ `` line is a
  command (the other lines are its sample output) and must exit 0. The venv's ``bin`` (the
  ``inturn`` command) comes first on ``PATH``.
- ``text``: never run (output samples, trees, signatures).

Servers: a block whose text reads ``os.environ.get("INTURN_URL", "redis://...")`` (or
``"postgresql://..."``; in a shell ``${INTURN_URL:-postgresql://...}``) gets ``INTURN_URL``
pointing at the real server the fixtures start (a flushed Redis, an empty PostgreSQL
database); every other block gets no ``INTURN_URL``.
So a reader runs each block as written against a local server, and the test against its own.

Telegram: a block that starts a bot (``start_polling(`` or ``run_polling(``) runs against
the fake Bot API of ``tests/fakes/telegram.py``. The test points aiogram's and
python-telegram-bot's default API server at the fake (a ``sitecustomize`` module, so the
block itself stays as written), sends the bot "hello", the same update again, then "bye",
and expects replies that quote "hello" once and "bye" after it (the docs' bots echo the
text); then it stops the bot with SIGINT, as Ctrl+C would, and the bot must exit 0.

Two markers, an HTML comment on the last non-blank line before a fence (invisible on the
rendered page), are the only conventions:

- ``<!-- continues -->``: the block goes on from the previous block of the same language on
  the page; it runs as that program followed by this block.
- ``<!-- not run: reason -->``: the block is not run (``pip install``, a long-running server
  command, a benchmark); the reason is required.

A block in any other language (or none) that is not marked fails, as does an unknown marker:
no block can be skipped without saying so.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.docs._blocks import ROOT, Block, extract, fence_lines, page_name, pages
from tests.fakes.telegram import FakeTelegram

BLOCKS = [block for path in pages() for block in extract(path)]
RUNNERS = {"python", "sql", "sh", "bash", "shell", "console"}
NEVER_RUN = {"text"}
BIN = Path(sys.executable).parent
TOKEN = "123456:TOKEN"  # the token the docs' bots use; the fake Bot API accepts it

# How many fenced blocks each page has: a block added or lost shows up here, and the
# fence-line count below proves the extractor saw every fence of every page.
EXPECTED = {
    "README.md": 10,
    "docs/celery.md": 9,
    "docs/fix-your-bot.md": 7,
    "docs/guarantees.md": 2,
    "docs/mailbox.md": 5,
    "docs/observability.md": 3,
    "docs/operations.md": 7,
    "docs/postgres.md": 4,
    "docs/redis.md": 1,
    "docs/serialize.md": 5,
    "docs/telegram.md": 8,
    "docs/turn.md": 3,
}

SITECUSTOMIZE = '''\
"""Points aiogram's and python-telegram-bot's default Bot API server at a local fake."""
import os

_URL = os.environ["INTURN_DOCS_TELEGRAM_API"]
try:
    from aiogram.client.telegram import PRODUCTION, TelegramAPIServer
except ImportError:
    pass
else:
    _local = TelegramAPIServer.from_base(_URL)
    object.__setattr__(PRODUCTION, "base", _local.base)  # a frozen dataclass
    object.__setattr__(PRODUCTION, "file", _local.file)
try:
    from telegram.ext import ApplicationBuilder
except ImportError:
    pass
else:
    _init = ApplicationBuilder.__init__

    def _patched(self):
        _init(self)
        self.base_url(_URL + "/bot")

    ApplicationBuilder.__init__ = _patched
'''


def program(block: Block) -> str:
    """The block's text, after the blocks it continues (``<!-- continues -->``)."""
    if not block.continues:
        return block.text
    same = [b for b in BLOCKS if b.page == block.page and b.lang == block.lang]
    before = [b for b in same if b.line < block.line]
    assert before, f"{block.id}: `continues`, but no earlier {block.lang} block on the page"
    assert before[-1].not_run is None, f"{block.id} continues a block that is not run"
    return program(before[-1]) + "\n" + block.text


def server_env(text: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """INTURN_URL for a block that reads it with a Redis or PostgreSQL default."""
    found = re.search(r"""INTURN_URL(["'],\s*["']|:-)(?P<scheme>redis|postgresql)://""", text)
    if found is None:
        return {}
    if found["scheme"] == "redis":
        return {"INTURN_URL": request.getfixturevalue("redis_url")}
    return {"INTURN_URL": request.getfixturevalue("postgres_dsn")}


def base_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTURN_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PTB_TIMEDELTA"] = "1"  # python-telegram-bot 22: no deprecation warning per retry
    env.update(extra)
    return env


def run(args: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 90) -> None:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"


def script_name(text: str) -> str:
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    named = re.fullmatch(r"#\s*(?P<name>[\w.-]+\.py)\s*", first)
    return named["name"] if named else "block.py"


def run_python(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    text = program(block)
    script = tmp_path / script_name(text)
    script.write_text(text, encoding="utf-8")
    env = base_env(server_env(text, request))
    if "start_polling(" in text or "run_polling(" in text:
        run_bot(script, tmp_path, env)
    else:
        run([sys.executable, str(script)], cwd=tmp_path, env=env)


def run_bot(script: Path, tmp_path: Path, env: dict[str, str]) -> None:
    """Start the bot against the fake Bot API, send it one message, expect a reply, Ctrl+C."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    with FakeTelegram(token=TOKEN) as tg:
        env = {**env, "INTURN_DOCS_TELEGRAM_API": tg.url, "PYTHONPATH": str(site)}
        out, err = tmp_path / "bot.out", tmp_path / "bot.err"
        with out.open("w") as stdout, err.open("w") as stderr:
            bot = subprocess.Popen(
                [sys.executable, str(script)], cwd=tmp_path, env=env, stdout=stdout, stderr=stderr
            )
            try:
                wait_until(lambda: tg.polls > 0 or bot.poll() is not None, 60)
                assert bot.poll() is None, f"the bot exited early:\n{err.read_text()}"
                hello = tg.send_text(user_id=7, text="hello")
                tg.redeliver(hello)  # Telegram delivers it again
                tg.send_text(user_id=7, text="bye")
                replies = tg.wait_for(lambda sent: quoting(sent, "bye"), timeout=30)
                time.sleep(0.5)  # a second answer to "hello" would have come by now
                # once: not in two replies, nor twice in one (a batch handler's reply)
                assert sum((c.text or "").count("hello") for c in quoting(tg.sent, "hello")) == 1
                assert tg.sent.index(quoting(tg.sent, "hello")[0]) <= tg.sent.index(replies[0])
                bot.send_signal(signal.SIGINT)
                code = bot.wait(timeout=30)
            finally:
                if bot.poll() is None:
                    bot.kill()
                    bot.wait()
        assert code == 0, f"exit {code}\n{out.read_text()}\n{err.read_text()}"


def quoting(sent: list[Any], word: str) -> list[Any]:
    """The bot's messages to user 7 that quote `word`."""
    return [c for c in sent if c.chat_id == 7 and word in (c.text or "")]


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def run_sql(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    dsn = request.getfixturevalue("postgres_dsn")
    run([str(BIN / "inturn"), "migrate", dsn], cwd=tmp_path, env=base_env({}))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(program(block).encode())  # no parameters: every statement runs


def run_shell(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    text = program(block)
    env = base_env(server_env(text, request))
    if block.lang == "console":
        commands = [line[2:] for line in text.splitlines() if line.startswith("$ ")]
        assert commands, f"{block.id}: a console block without a `$ ` command"
        text = "\n".join(commands) + "\n"
    run(["bash", "-e", "-o", "pipefail", "-c", text], cwd=tmp_path, env=env)


def ids(blocks: list[Block]) -> list[str]:
    return [f"{b.id}-{b.lang or 'plain'}" for b in blocks]


@pytest.mark.parametrize("block", BLOCKS, ids=ids(BLOCKS))
def test_a_code_block_runs(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A block runs as written, or says why not; none is skipped silently."""
    if block.not_run is not None:
        assert block.not_run, f"{block.id}: `not run` needs a reason: <!-- not run: why -->"
        pytest.skip(f"not run: {block.not_run}")
    if block.lang in NEVER_RUN:
        pytest.skip("text")
    assert block.lang in RUNNERS, (
        f"{block.id}: a ```{block.lang} block the test cannot run; "
        "make it ```text or mark it <!-- not run: reason -->"
    )
    if block.lang == "python":
        run_python(block, tmp_path, request)
    elif block.lang == "sql":
        run_sql(block, tmp_path, request)
    else:
        run_shell(block, tmp_path, request)


@pytest.mark.parametrize("path", pages(), ids=page_name)
def test_the_extractor_finds_every_block_of_a_page(path: Path) -> None:
    """Every fence line of a page belongs to an extracted block, and the counts are pinned."""
    blocks = extract(path)
    assert 2 * len(blocks) == fence_lines(path)
    if page_name(path) in EXPECTED:
        assert len(blocks) == EXPECTED[page_name(path)]


def test_every_pinned_page_exists() -> None:
    """The count table names only pages that exist (a renamed page cannot escape the count)."""
    assert {name for name in EXPECTED if not (ROOT / name).exists()} == set()


@pytest.mark.parametrize("block", BLOCKS, ids=ids(BLOCKS))
def test_a_marker_is_one_of_the_two(block: Block) -> None:
    """A typo in a marker (`<!-- not-run -->`) would otherwise go unnoticed."""
    assert block.marker is None or block.continues or block.not_run is not None, (
        f"{block.id}: unknown marker <!-- {block.marker} -->"
    )


def test_the_readmes_demo_sample_matches_the_demo(tmp_path: Path) -> None:
    """The README's ```text sample of `inturn demo` has the demo's lines (counts aside)."""
    (sample,) = [b for b in extract(ROOT / "README.md") if b.text.startswith("inturn demo:")]
    done = subprocess.run(
        [str(BIN / "inturn"), "demo", "--no-picture"],
        cwd=tmp_path,
        env=base_env({}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    real = done.stdout.splitlines()[:5]
    shown = sample.text.splitlines()
    assert shown[:2] == real[:2]  # the title and the column names
    assert shown[4] == real[4]  # the verdict
    assert shown[3] == real[3].rsplit(" ", 1)[0] + " " + shown[3].rsplit(" ", 1)[1]
    assert real[3].split()[3:7] == ["0", "0", "0", "0"]  # with inturn: no failure at all
