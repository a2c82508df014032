"""User keys: one normal form for every backend.

A key is a ``str`` or an ``int``; ``1`` and ``"1"`` name the same key. ``bool``
is refused (``True`` would silently become ``"True"``). There is no unicode
normalisation: two strings are the same key only if their code points are equal.
Backends encode the normal form injectively for their own storage.
"""

from __future__ import annotations

from ._errors import InvalidKey

__all__ = ["MAX_KEY_BYTES", "normalize_key"]

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
