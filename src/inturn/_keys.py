"""User keys and request tokens: one normal form for every backend.

A key is a ``str`` or an ``int``; ``1`` and ``"1"`` name the same key. ``bool``
is refused (``True`` would silently become ``"True"``). There is no unicode
normalisation: two strings are the same key only if their code points are equal.
Backends encode the normal form injectively for their own storage.
"""

from __future__ import annotations

import itertools
import os
import secrets

from ._errors import InvalidKey

__all__ = ["MAX_KEY_BYTES", "new_token", "normalize_key"]

MAX_KEY_BYTES = 1024
"""The longest key, in bytes of UTF-8."""


def normalize_key(key: object) -> str:
    """Return the normal form of ``key`` or raise :class:`InvalidKey`."""
    if isinstance(key, bool) or not isinstance(key, str | int):
        raise InvalidKey(f"a key must be a str or an int, not {type(key).__name__}")
    if isinstance(key, int):
        # int(key): an IntEnum's str() is its name, not its number.
        try:
            text = str(int(key))
        except ValueError as exc:  # more digits than int -> str allows
            raise InvalidKey(f"a key must be at most {MAX_KEY_BYTES} bytes of UTF-8") from exc
    else:
        text = str.__str__(key)
    if not text:
        raise InvalidKey("a key must not be empty")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidKey("a key must be valid unicode (it has a lone surrogate)") from exc
    if size > MAX_KEY_BYTES:
        raise InvalidKey(
            f"a key must be at most {MAX_KEY_BYTES} bytes of UTF-8, this one is {size}"
        )
    return text


class _Tokens:
    """Unique request tokens: 128 random bits per process, then a counter.

    One ``os.urandom`` per process instead of one per request (a syscall costs
    more than the whole in-memory turn); re-seeded after ``fork``, so a forked
    child never repeats its parent's tokens.
    """

    def __init__(self) -> None:
        self._pid = -1
        self._prefix = ""
        self._counter = itertools.count()

    def __call__(self) -> str:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._prefix = secrets.token_hex(16)
            self._counter = itertools.count()
        return f"{self._prefix}{next(self._counter):x}"


new_token = _Tokens()
"""A new request token, unique across processes (``new_token()``)."""
