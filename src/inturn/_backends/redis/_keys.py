"""Redis key names, built in one place.

    inturn:<namespace>:{<user key>}:o   owner      (see _lua for each key's shape)
    inturn:<namespace>:{<user key>}:q   line
    inturn:<namespace>:{<user key>}:w   waiters
    inturn:<namespace>:{<user key>}:m:<mailbox>:q|f|d|n   a mailbox's queue, in flight,
                                        drainer role, retry not-before time
    inturn:<namespace>:mb:<mailbox>:hint|dead   the sweeper's index, the dead letters
    inturn:<namespace>:fence            the namespace's fence floor (see _lua)
    inturn:<namespace>:fence:{<tag>}    on a Cluster: the floor of one slot
    inturn:<namespace>:mb:<mailbox>:hint:{<tag>}   on a Cluster: the index of one slot
    inturn:<namespace>:wake:<process>   a process's wake-up channel (Pub/Sub, not a key)

The user key and the namespace are percent-encoded: ``%``, ``{``, ``}``, ``:``,
spaces, control characters and DEL become ``%XX`` of their UTF-8 bytes, every
other character stays as it is. That is injective (``%`` itself is escaped),
and no user key can close the hash tag early or open another, so all four keys
of one user hash to one Cluster slot.

Nothing is kept per user once the user is idle: the keys above that name a
user go when its turn, line and queues do (dedup marks and supersede records
when their window ends). What a script also needs beside the user's keys (the
fence floor, the sweeper's hint set) is shared: one key per namespace, or on a
Cluster, where a script may only touch one slot, one key per slot, named with
a *slot tag*: the shortest ASCII letters-and-digits text that hashes to that
slot (:func:`slot_tag`), so at most 16384 such keys per namespace.
"""

from __future__ import annotations

import binascii
import functools
import itertools
import string
import urllib.parse
from typing import NamedTuple

__all__ = ["SLOTS", "KeySpace", "Name", "decode", "encode", "slot_of", "slot_tag"]

SLOTS = 16384
"""Redis Cluster's hash slots."""

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


def slot_of(key: str) -> int:
    """The Cluster slot of every key name of user ``key`` (the CRC16 of its hash tag)."""
    return binascii.crc_hqx(encode(key).encode("utf-8"), 0) % SLOTS


@functools.cache
def _tags() -> tuple[str, ...]:
    """For each slot, the shortest text of ASCII letters and digits that hashes to it
    (the first in alphabetical order). Made once per process, on a Cluster only."""
    tags: list[str | None] = [None] * SLOTS
    alphabet = string.digits + string.ascii_uppercase + string.ascii_lowercase
    missing = SLOTS
    for length in itertools.count(1):
        for chars in itertools.product(alphabet, repeat=length):
            tag = "".join(chars)
            slot = binascii.crc_hqx(tag.encode("ascii"), 0) % SLOTS
            if tags[slot] is None:
                tags[slot] = tag
                missing -= 1
                if missing == 0:
                    return tuple(t for t in tags if t is not None)
    raise AssertionError("unreachable")  # pragma: no cover


def slot_tag(slot: int) -> str:
    """A hash tag of ``slot``: a name with ``{<tag>}`` in it lies in that slot."""
    return _tags()[slot]


class Name(NamedTuple):
    """What a key name of the namespace stands for (see :meth:`KeySpace.parse`).

    ``kind`` is the last part of the name (``"o"``, ``"q"``, ``"w"``, ``"f"`` for a
    turn; ``"q"``, ``"f"``, ``"d"``, ``"n"`` with ``mailbox`` set for a mailbox box;
    ``"hint"``, ``"dead"`` with ``key`` None for a mailbox's index; ``"d"``, ``"g"``,
    ``"r"`` for dedup marks and supersede records; ``"fence"`` with ``key`` and
    ``mailbox`` None for a fence floor).
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

    def turn_keys(self, key: str, *, cluster: bool = False) -> list[str]:
        """owner, line, waiters, fence floor: the KEYS of every turn script."""
        base = f"{self.prefix}{{{encode(key)}}}:"
        return [base + "o", base + "q", base + "w", self.fence_floor(key, cluster=cluster)]

    def fence_floor(self, key: str, *, cluster: bool = False) -> str:
        """The fence floor ``key``'s grants use: the namespace's, or on a Cluster its slot's."""
        if cluster:
            return f"{self.prefix}fence:{{{slot_tag(slot_of(key))}}}"
        return f"{self.prefix}fence"

    def hint_set(self, name: str, key: str, *, cluster: bool = False) -> str:
        """The sweeper's hint set that holds ``key`` of mailbox ``name``: the mailbox's, or
        on a Cluster its set in the key's slot (so the scripts keep it, atomically)."""
        if cluster:
            return f"{self.prefix}mb:{encode(name)}:hint:{{{slot_tag(slot_of(key))}}}"
        return self.mailbox_index(name)[0]

    def hint_sets(self, name: str, *, cluster: bool = False) -> list[str]:
        """Every hint set of mailbox ``name`` (on a Cluster one per slot, and the set of
        one name that an older version kept)."""
        legacy = self.mailbox_index(name)[0]
        if not cluster:
            return [legacy]
        return [f"{legacy}:{{{slot_tag(slot)}}}" for slot in range(SLOTS)] + [legacy]

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
        if rest == "fence" or rest.startswith("fence:{"):
            return Name(None, None, "fence")
        if rest.startswith("mb:"):
            body = rest[3:]
            if body.endswith("}") and ":{" in body:  # a slot's hint set on a Cluster
                body = body[: body.rindex(":{")]
            mailbox, _, kind = body.rpartition(":")
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
