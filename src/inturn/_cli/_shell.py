"""What every ``inturn`` command shares: masking credentials, one-line errors, formats."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["mask", "positive", "run", "seconds", "since"]


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


_CREDENTIALS = re.compile(r"(://[^:/@\s]*):[^@/\s]*@")


def mask(text: str) -> str:
    """``text`` with the password of any URL in it replaced by ``***``."""
    return _CREDENTIALS.sub(r"\1:***@", text)


def run(call: Callable[[], Coroutine[Any, Any, int]], verbose: bool, command: str) -> int:
    """Run an async command; an error is one line with its cause (a traceback with
    ``--verbose``), never a wall of text."""
    from inturn._errors import InturnError

    try:
        return asyncio.run(call())
    except KeyboardInterrupt:
        return 130
    except (InturnError, OSError, ValueError) as exc:
        if verbose:
            raise
        print(f"inturn {command}: {mask(str(exc))}", file=sys.stderr)
        return 1
    except Exception as exc:  # a server's refusal the library does not name (a privilege)
        if verbose:
            raise
        what = " ".join(str(exc).split())
        print(
            f"inturn {command}: {type(exc).__name__}: {mask(what)} (--verbose shows where)",
            file=sys.stderr,
        )
        return 1


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def since(epoch: float | None) -> str:
    return "-" if epoch is None else time.strftime("%H:%M:%S", time.localtime(epoch))
