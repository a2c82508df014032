"""Redis key names, built in one place.

    inturn:<namespace>:{<user key>}:o   owner      (see _lua for each key's shape)
    inturn:<namespace>:{<user key>}:q   line
    inturn:<namespace>:{<user key>}:w   waiters
    inturn:<namespace>:{<user key>}:f   fence floor
    inturn:<namespace>:{<user key>}:m:<mailbox>:q|f|d|n   a mailbox's queue, in flight,
                                        drainer role, retry not-before time
    inturn:<namespace>:mb:<mailbox>:hint|dead   the sweeper's index, the dead letters
    inturn:<namespace>:wake:<process>   a process's wake-up channel (Pub/Sub, not a key)

The user key and the namespace are percent-encoded: ``%``, ``{``, ``}``, ``:``,
spaces, control characters and DEL become ``%XX`` of their UTF-8 bytes, every
other character stays as it is. That is injective (``%`` itself is escaped),
and no user key can close the hash tag early or open another, so all four keys
of one user hash to one Cluster slot.
"""

from __future__ import annotations

import urllib.parse
from typing import NamedTuple

__all__ = ["KeySpace", "Name", "decode", "encode"]

_ESCAPE = {"%", "{", "}", ":"}


def _escape_char(char: str) -> str:
    if char in _ESCAPE or char <= " " or char == "\x7f":
        return "".join(f"%{b:02X}" for b in char.encode("utf-8"))
    return char


def encode(text: str) -> str:
    """Encode a key or namespace injectively, with no ``{``, ``}`` or ``:`` left in it."""
    if text.isalnum() and text.isascii():  # the common case: user ids
        return text
    return "".join(_escape_char(char) for char in text)


def decode(text: str) -> str:
    """The text :func:`encode` was given (every ``%XX`` is an escaped UTF-8 byte)."""
    return urllib.parse.unquote(text) if "%" in text else text


class Name(NamedTuple):
    """What a key name of the namespace stands for (see :meth:`KeySpace.parse`).

    ``kind`` is the last part of the name (``"o"``, ``"q"``, ``"w"``, ``"f"`` for a
    turn; ``"q"``, ``"f"``, ``"d"``, ``"n"`` with ``mailbox`` set for a mailbox box;
    ``"hint"``, ``"dead"`` with ``key`` None for a mailbox's index; ``"d"``, ``"g"``,
    ``"r"`` for dedup marks and supersede records).
    """

    key: str | None
    mailbox: str | None
    kind: str


class KeySpace:
    """The key names of one namespace."""

    __slots__ = ("namespace", "prefix")

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.prefix = f"inturn:{encode(namespace)}:"

    def turn_keys(self, key: str) -> list[str]:
        """owner, line, waiters, fence: the KEYS of every turn script."""
        base = f"{self.prefix}{{{encode(key)}}}:"
        return [base + "o", base + "q", base + "w", base + "f"]

    def mark_key(self, key: str, scope: str, id: str) -> str:
        """The dedup mark of message ``id`` of ``scope`` (a function or mailbox) for ``key``."""
        return f"{self.prefix}{{{encode(key)}}}:d:{encode(scope)}:{encode(id)}"

    def supersede_keys(self, key: str, scope: str) -> list[str]:
        """The generation counter and the running-call record of (key, scope)."""
        base = f"{self.prefix}{{{encode(key)}}}:"
        return [f"{base}g:{encode(scope)}", f"{base}r:{encode(scope)}"]

    def mailbox_keys(self, name: str, key: str) -> list[str]:
        """queue, in flight, drainer role, not-before: the KEYS of the mailbox scripts."""
        base = f"{self.prefix}{{{encode(key)}}}:m:{encode(name)}:"
        return [base + "q", base + "f", base + "d", base + "n"]

    def mailbox_index(self, name: str) -> tuple[str, str]:
        """The sweeper's hint set and the dead-letter list of a mailbox (their own slots)."""
        return f"{self.prefix}mb:{encode(name)}:hint", f"{self.prefix}mb:{encode(name)}:dead"

    def channel(self, process: str) -> str:
        """The Pub/Sub channel on which a process is woken."""
        return f"{self.prefix}wake:{process}"

    def parse(self, name: str) -> Name | None:
        """What a key name of this namespace stands for; None for a name it did not build."""
        if not name.startswith(self.prefix):
            return None
        rest = name[len(self.prefix) :]
        if rest.startswith("mb:"):
            mailbox, _, kind = rest[3:].rpartition(":")
            return Name(None, decode(mailbox), kind) if mailbox else None
        if not rest.startswith("{"):
            return None
        key, _, tail = rest[1:].partition("}:")
        parts = tail.split(":")
        if len(parts) == 3 and parts[0] == "m":
            return Name(decode(key), decode(parts[1]), parts[2])
        return Name(decode(key), None, parts[0]) if parts[0] else None

    def is_turn_state(self, name: str) -> bool:
        """True for the keys a busy key keeps: a turn held or queued, or a mailbox queue
        with messages or a drainer (not fences, not dedup marks)."""
        return name.endswith(("}:o", "}:q", "}:w")) or "}:m:" in name
