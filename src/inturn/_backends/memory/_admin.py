"""The in-memory engine's operators' calls (``AdminBackend``): one process, one lock.

They work on the state of :class:`._core.MemoryCore` under its lock, as its own
operations do, so each is atomic: a forced release hands the turn on exactly as
a release would, and ``forget`` sees no half-made state. A memory gate's state
lives in its own process only: these calls are for that process (tests, a demo,
an admin endpoint of the service itself); the ``inturn`` command cannot reach it.
"""

from __future__ import annotations

from inturn._backends.admin import Forgotten, Released, SweepReport, refuse_busy
from inturn._backends.base import BoxState

from ._core import MemoryCore

__all__ = ["MemoryAdmin"]


class MemoryAdmin:
    """The ``AdminBackend`` face of :class:`~inturn._backends.memory.MemoryBackend`."""

    _core: MemoryCore
    namespace: str

    async def force_release(self, key: str) -> Released:
        """See :meth:`AdminBackend.force_release`: the head of the line gets the turn with
        the next fence; the old holder's next renewal or check finds it lost."""
        core = self._core
        with core._lock:
            now = core._clock()
            entry = core._live(key, now)  # a lapsed holder is replaced first: not "released"
            if entry is None or entry.holder is None:
                return Released(key, released=False)
            holder, fence = entry.holder, entry.fence
            core._hand_off(key, entry, now)
            after = core._keys.get(key)
            if after is None:
                return Released(key, True, holder, fence)
            return Released(key, True, holder, fence, after.holder, after.fence)

    async def dead_mailboxes(self) -> dict[str, int]:
        """See :meth:`AdminBackend.dead_mailboxes`."""
        core = self._core
        with core._lock:
            return {name: len(entries) for name, entries in core._dead.items() if entries}

    async def mb_dead_remove(self, name: str, entries: list[str]) -> int:
        """See :meth:`AdminBackend.mb_dead_remove`."""
        core = self._core
        with core._lock:
            dead = core._dead.get(name, [])
            removed = 0
            for entry in entries:
                if entry in dead:
                    dead.remove(entry)
                    removed += 1
            if not dead:
                core._dead.pop(name, None)
            return removed

    async def forget(self, key: str, *, force: bool = False) -> Forgotten:
        """See :meth:`AdminBackend.forget`. The turn itself (holder, line) is no stored
        state here: it is left to end, and leaves nothing behind when it does."""
        core = self._core
        with core._lock:
            now = core._clock()
            busy = core._live(key, now) is not None
            boxes = [(name, box) for name, box in core._boxes.items() if name[1] == key]
            draining = [name[0] for name, box in boxes if core._box_drainer(box, now)]
            if not force and (busy or draining):
                raise refuse_busy(key, turn=busy, draining=draining)
            messages = sum(len(box.queue) + len(box.inflight) for _, box in boxes)
            records = sum(box.drainer is not None for _, box in boxes)
            for box_name, _ in boxes:
                del core._boxes[box_name]
            marks = [mark for mark in core._marks if mark[0] == key]
            for mark in marks:
                del core._marks[mark]
        return Forgotten(key, messages=messages, marks=len(marks), records=records)

    async def sweep(self) -> SweepReport:
        """See :meth:`AdminBackend.sweep`: lapsed holders replaced, expired dedup marks and
        idle queues dropped, queues with messages and no live drainer counted."""
        core = self._core
        with core._lock:
            now = core._clock()
            expired = 0
            for key, entry in list(core._keys.items()):
                if entry.holder is not None and now >= entry.expires_at:
                    core._hand_off(key, entry, now)
                    expired += 1
            stale = [mark for mark, kept in core._marks.items() if now >= kept.expires_at]
            for mark in stale:
                del core._marks[mark]
            idle = 0
            undrained: list[BoxState] = []
            for name, box in sorted(core._boxes.items()):
                if core._box_drainer(box, now) is not None:
                    continue
                if not box.queue and not box.inflight:
                    del core._boxes[name]
                    idle += 1
                else:
                    undrained.append(BoxState(name[0], name[1], len(box.queue), len(box.inflight)))
        return SweepReport(
            self.namespace,
            expired_leases=expired,
            expired_marks=len(stale),
            idle_rows=idle,
            undrained=tuple(undrained),
        )
