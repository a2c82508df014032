"""The public surface: exports, errors, keys, configuration, import weight, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import inturn
from inturn._cli import main as cli_main
from inturn._keys import normalize_key


def test_all_is_sorted_and_complete() -> None:
    """__all__ is one curated list, sorted as ruff's RUF022 does, and every name exists."""

    def isort_style(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert list(inturn.__all__) == sorted(inturn.__all__, key=isort_style)
    assert len(set(inturn.__all__)) == len(inturn.__all__)
    for name in inturn.__all__:
        assert hasattr(inturn, name), name


def test_exception_hierarchy() -> None:
    """One root; stdlib types mixed in where callers expect them."""
    for exc in (
        inturn.Busy,
        inturn.TurnTimeout,
        inturn.LeaseLost,
        inturn.BackendUnavailable,
        inturn.ConfigurationError,
        inturn.InvalidKey,
    ):
        assert issubclass(exc, inturn.InturnError)
    assert issubclass(inturn.TurnTimeout, inturn.Busy)
    assert issubclass(inturn.TurnTimeout, TimeoutError)
    assert issubclass(inturn.BackendUnavailable, ConnectionError)
    assert issubclass(inturn.ConfigurationError, ValueError)
    assert issubclass(inturn.InvalidKey, ValueError)


@pytest.mark.parametrize(
    ("key", "normal"),
    [
        (1, "1"),
        ("1", "1"),
        (-5, "-5"),
        ("a:b{c}\n", "a:b{c}\n"),
        ("é", "é"),
        ("x" * 1024, "x" * 1024),
    ],
)
def test_keys_normalise(key: object, normal: str) -> None:
    """str and int keys; 1 and "1" are the same key; no other rewriting."""
    assert normalize_key(key) == normal


def test_unicode_is_not_normalised() -> None:
    """Composed and decomposed forms are different keys."""
    assert normalize_key("\u00e9") != normalize_key("e\u0301")


def test_int_enum_key_uses_its_number() -> None:
    import enum

    class Color(enum.IntEnum):
        RED = 7

    assert normalize_key(Color.RED) == "7"


@pytest.mark.parametrize(
    "key", [True, False, None, 1.5, b"bytes", "", "x" * 1025, "é" * 513, "\ud800", 10**2000]
)
def test_bad_keys_are_refused(key: object) -> None:
    """Empty, non-str/int, bool, lone surrogates and over 1 KiB of UTF-8 raise InvalidKey."""
    with pytest.raises(inturn.InvalidKey):
        normalize_key(key)


def test_invalid_key_message_names_the_limit() -> None:
    with pytest.raises(inturn.InvalidKey, match="1024 bytes"):
        inturn.Gate().turn("x" * 2000)


def test_bad_key_fails_before_entering() -> None:
    """The error comes from gate.turn() itself, before any waiting."""
    gate = inturn.Gate()
    with pytest.raises(inturn.InvalidKey):
        gate.turn(True)
    with pytest.raises(inturn.InvalidKey):
        gate.turn_sync(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["mysql://x", "nope", "", "memory:/", "redis-ish://h"])
def test_unknown_url_names_the_accepted_schemes(url: str) -> None:
    with pytest.raises(inturn.ConfigurationError, match=r"accepted schemes are .*memory://"):
        inturn.Gate.from_url(url)


@pytest.mark.parametrize(
    "options",
    [
        {"lease": 0},
        {"lease": -1},
        {"lease": float("inf")},
        {"lease": "30"},
        {"max_hold": 0},
        {"on_lost": "explode"},
    ],
)
def test_bad_options_raise_configuration_error(options: dict[str, object]) -> None:
    with pytest.raises(inturn.ConfigurationError):
        inturn.Gate(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [-1, float("nan"), "5"])
def test_bad_timeout(timeout: object) -> None:
    with pytest.raises(inturn.ConfigurationError):
        inturn.Gate().turn("k", timeout=timeout)  # type: ignore[arg-type]


def test_gate_refuses_a_non_backend() -> None:
    with pytest.raises(inturn.ConfigurationError, match="Backend protocol"):
        inturn.Gate(object())  # type: ignore[arg-type]


def test_import_loads_only_the_standard_library() -> None:
    """`import inturn` pulls in no third-party module."""
    code = (
        "import sys, inturn, inturn.testing;"
        "heavy = {'redis', 'psycopg', 'celery', 'aiogram', 'telegram', 'prometheus_client'};"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_demo_shows_the_bug_and_the_fix(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`inturn demo`: overlaps, disorder and double answers without inturn, none with it;
    nothing lost either way; the code and a timeline picture are shown; exit status 0."""
    assert cli_main(["demo", "--users", "10", "--messages", "4", "--picture", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split()[0] + line.split()[1]: line.split()
        for line in out.splitlines()
        if "inturn " in line[:20]
    }
    without, with_ = rows["withoutinturn"], rows["withinturn"]
    # calls, overlaps, out of order, answered twice, lost
    assert int(without[3]) > 0  # two replies to one user at once: the bug is real
    assert int(without[5]) == 10  # every redelivered update answered again
    assert with_[3:7] == ["0", "0", "0", "0"]
    assert without[6] == "0"
    assert '@gate.serialize(key="user_id", dedup="update_id")' in out
    svg = tmp_path / "inturn-demo-timeline.svg"
    assert str(svg) in out
    assert "#d62728" in svg.read_text()  # the collisions are drawn in red


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "inturn", "demo", "--users", "2", "--messages", "2", "--no-picture"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "with inturn" in out.stdout


async def test_the_wrong_form_of_a_turn_says_which_to_use() -> None:
    """`with gate.turn`, `await gate.turn` and `async with gate.turn_sync` name the right form."""
    gate = inturn.Gate.from_url("memory://", namespace="misuse")
    try:
        with pytest.raises(TypeError, match=r"async with gate\.turn"), gate.turn("k"):
            pass
        with pytest.raises(TypeError, match="not awaited"):
            await gate.turn("k")  # type: ignore[misc]
        with pytest.raises(TypeError, match=r"with gate\.turn_sync"):
            async with gate.turn_sync("k"):  # type: ignore[attr-defined]
                pass
        assert not await gate.is_busy("k")
    finally:
        await gate.aclose()
