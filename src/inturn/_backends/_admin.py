"""What the engines' operators' calls share (see ``AdminBackend`` in :mod:`.base`)."""

from __future__ import annotations

from collections.abc import Iterable

from inturn._errors import Busy
from inturn._keys import shown

__all__ = ["refuse_busy"]


def refuse_busy(key: str, *, turn: bool, draining: Iterable[str] = ()) -> Busy:
    """The error ``forget`` raises for a key that is at work (``turn``: held or a line;
    ``draining``: mailboxes whose drainer works on the key's queue)."""
    why = []
    if turn:
        why.append("its turn is held or has a line")
    boxes = sorted(set(draining))
    if boxes:
        names = ", ".join(repr(b) for b in boxes)
        why.append(f"a drainer works on its queue in mailbox {names}")
    return Busy(
        f"key {shown(key)!r} is busy ({'; '.join(why)}): that work would store new state "
        "right after; wait until it is idle, or force it",
        key=key,
    )
