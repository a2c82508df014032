"""User keys and request tokens: one normal form for every backend.

A key is a ``str`` or an ``int``; ``1`` and ``"1"`` name the same key. ``bool``
is refused (``True`` would silently become ``"True"``). There is no unicode
normalisation: two strings are the same key only if their code points are equal.
Backends encode the normal form injectively for their own storage.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
from typing import Literal

from ._errors import ConfigurationError, InvalidKey

__all__ = ["MAX_KEY_BYTES", "log_keys", "new_token", "normalize_key", "shown"]

LogKeys = Literal["full", "hash", "truncate"]
_log_keys: list[LogKeys] = ["full"]


def log_keys(mode: LogKeys) -> None:
    """How log records show user keys: ``"full"`` (default), ``"hash"`` (a short, stable
    hash: records of one user still group together) or ``"truncate"`` (the first 4
    characters). User ids can be personal data. The environment variable
    ``INTURN_LOG_KEYS`` sets it at import."""
    if mode not in ("full", "hash", "truncate"):
        raise ConfigurationError(f"log_keys must be 'full', 'hash' or 'truncate', not {mode!r}")
    _log_keys[0] = mode


def shown(key: str) -> str:
    """``key`` as log records show it (see :func:`log_keys`)."""
    mode = _log_keys[0]
    if mode == "full":
        return key
    if mode == "hash":
        return (
            "#" + hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()
        )
    return key if len(key) <= 4 else key[:4] + "..."


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


_from_env = os.environ.get("INTURN_LOG_KEYS", "full")
if _from_env == "hash":
    _log_keys[0] = "hash"
elif _from_env == "truncate":
    _log_keys[0] = "truncate"
