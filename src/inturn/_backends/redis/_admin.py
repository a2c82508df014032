"""The Redis engine's operators' calls (``AdminBackend``): scripts and scans, off the hot paths.

Each script here works on the keys of one user, which share a hash tag (one
Cluster slot), like every script of :mod:`._lua`; the turn scripts reuse its
prelude, so a forced release hands the turn on exactly as a release does. The
mailbox indexes (hint sets, dead-letter lists) live in slots of their own and
are changed by plain commands, in an order that never loses a hint a live
queue needs. Scans cover every Cluster master (redis-py's ``scan_iter``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from inturn._backends.admin import Forgotten, Released, SweepReport, refuse_busy
from inturn._backends.base import BoxState

from ._doctor import _glob
from ._keys import KeySpace, encode
from ._lua import _PRELUDE
from ._shared import LoopState, ProcessChannel, map_errors, text

__all__ = ["FORCE_RELEASE", "FORGET", "SWEEP_BOX", "SWEEP_TURN", "RedisAdmin"]

FORCE_RELEASE = (
    "#!lua flags=allow-oom\n"
    + _PRELUDE
    + """
-- FORCE_RELEASE: end the key's turn whoever holds it; hand it to the next live waiter.
-- KEYS[1..4]: owner, line, waiters, fence (the turn's keys)
-- returns: {1, holder, fence, next_token or false, next_fence or false} ended
--          | {0} nobody held it (a line left by a lapsed holder is moved on)
local value = redis.call('GET', KEYS[1])
if not value then
  if redis.call('LLEN', KEYS[2]) > 0 then hand_off(now_ms()) end
  return {0}
end
local who, fence = holder(value)
redis.call('DEL', KEYS[1])
local next_token, next_fence = hand_off(now_ms())
return {1, who, fence, next_token or false, next_fence or false}
"""
)

SWEEP_TURN = (
    "#!lua flags=allow-oom\n"
    + _PRELUDE
    + """
-- SWEEP_TURN: drop the line's dead waiters; a line whose holder's lease lapsed goes on.
-- KEYS[1..4]: owner, line, waiters, fence
-- returns: {lapsed 1 | 0, dead waiters dropped}
local now = now_ms()
local before = redis.call('LLEN', KEYS[2])
if before == 0 then
  redis.call('DEL', KEYS[3])
  return {0, 0}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  local granted = hand_off(now)
  local dropped = before - redis.call('LLEN', KEYS[2])
  if granted then dropped = dropped - 1 end
  return {1, dropped}
end
local dropped = 0
for _, token in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local info = redis.call('HGET', KEYS[3], token)
  local alive = info and tonumber(string.match(info, '^(%d+)|'))
  if not alive or alive <= now then
    unqueue(token)
    dropped = dropped + 1
  end
end
return {0, dropped}
"""
)

SWEEP_BOX = """#!lua flags=allow-oom
-- SWEEP_BOX: what one (mailbox, user) queue needs; an empty one loses its retry time.
-- KEYS[1..4]: queue, in flight, drainer role, not-before
-- returns: {0, keys dropped} idle | {1} a live drainer owns it | {2, queued, in flight}
--          messages that nobody drains
local queued, inflight = redis.call('LLEN', KEYS[1]), redis.call('LLEN', KEYS[2])
local role = redis.call('EXISTS', KEYS[3])
if role == 1 then return {1} end
if queued + inflight == 0 then return {0, redis.call('DEL', KEYS[4])} end
return {2, queued, inflight}
"""

FORGET = """#!lua flags=allow-oom
-- FORGET: delete what is stored for one user (every key of its hash tag found by a scan).
-- KEYS[1]: owner  KEYS[2]: line  KEYS[3]: waiters  KEYS[4..]: the user's other keys
-- ARGV[1]: "1" force  ARGV[2..]: the kind of each of KEYS[4..]: "msg" a queue or in-flight
--          list, "role" a drainer role, "mark" a dedup mark, "rec" any other record;
--          ARGV[#KEYS - 1 ..]: the mailbox of each "role" key, in order
-- returns: {-1, turn busy 1 | 0, mailbox...} busy | {messages, marks, records}
local busy = redis.call('EXISTS', KEYS[1]) == 1 or redis.call('LLEN', KEYS[2]) > 0
local draining, r = {}, #KEYS - 1
for i = 4, #KEYS do
  if ARGV[i - 2] == 'role' then
    if redis.call('EXISTS', KEYS[i]) == 1 then table.insert(draining, ARGV[r]) end
    r = r + 1
  end
end
if ARGV[1] ~= '1' and (busy or #draining > 0) then
  return {-1, busy and 1 or 0, unpack(draining)}
end
local messages, marks, records = 0, 0, 0
if not busy then records = records + redis.call('DEL', KEYS[3]) end
for i = 4, #KEYS do
  local kind = ARGV[i - 2]
  if kind == 'msg' then
    messages = messages + redis.call('LLEN', KEYS[i])
    redis.call('DEL', KEYS[i])
  elseif kind == 'mark' then
    marks = marks + redis.call('DEL', KEYS[i])
  else
    records = records + redis.call('DEL', KEYS[i])
  end
end
return {messages, marks, records}
"""


def _kind(name: Any) -> str:
    """How FORGET counts a key of the user (see its header)."""
    if name.mailbox is not None:
        return {"q": "msg", "f": "msg", "d": "role"}.get(name.kind, "rec")
    return "mark" if name.kind == "d" else "rec"


class RedisAdmin:
    """The ``AdminBackend`` face of :class:`~inturn._backends.redis.RedisBackend`."""

    _process: ProcessChannel

    def _state(self) -> LoopState:
        raise NotImplementedError

    @property
    def _keys(self) -> KeySpace:
        return self._process.keys

    async def _eval(self, what: str, lua: str, keys: list[str], args: list[Any]) -> Any:
        with map_errors(what):
            return await self._state().client.eval(lua, len(keys), *keys, *args)

    async def _scan(self, pattern: str) -> AsyncIterator[str]:
        client = self._state().client
        with map_errors("scan"):
            async for raw in client.scan_iter(match=pattern, count=1000):
                yield text(raw)

    async def force_release(self, key: str) -> Released:
        """See :meth:`AdminBackend.force_release`: one script; the next live waiter is
        granted (and pushed) as a release would grant it, with a greater fence."""
        reply = await self._eval("force_release", FORCE_RELEASE, self._turn_keys(key), [])
        if int(reply[0]) != 1:
            return Released(key, released=False)
        following = None if reply[3] is None else text(reply[3])
        next_fence = None if reply[4] is None else int(reply[4])
        return Released(key, True, text(reply[1]), int(reply[2]), following, next_fence)

    def _turn_keys(self, key: str) -> list[str]:
        """The KEYS of a turn script for ``key``, as this backend's own scripts get them
        (where the layout makes them depend on the topology, its script builder knows)."""
        calls: Any = self._state().calls
        if hasattr(calls, "turn_keys"):
            return list(calls.turn_keys(key))
        return self._keys.turn_keys(key)

    async def _indexes(self) -> dict[str, dict[str, list[str]]]:
        """Per kind ("hint", "dead"), mailbox name -> its index keys (a scan finds them
        all, however many a layout keeps per mailbox)."""
        found: dict[str, dict[str, list[str]]] = {"hint": {}, "dead": {}}
        async for full in self._scan(_glob(self._keys.prefix + "mb:") + "*"):
            name = self._keys.parse(full)
            if name is not None and name.mailbox is not None and name.kind in found:
                found[name.kind].setdefault(name.mailbox, []).append(full)
        return found

    async def dead_mailboxes(self) -> dict[str, int]:
        """See :meth:`AdminBackend.dead_mailboxes`."""
        client = self._state().client
        counts = {}
        for mailbox, lists in sorted((await self._indexes())["dead"].items()):
            with map_errors("dead_mailboxes"):
                count = sum([int(await client.llen(dead)) for dead in lists])
            if count:
                counts[mailbox] = count
        return counts

    async def mb_dead_remove(self, name: str, entries: list[str]) -> int:
        """See :meth:`AdminBackend.mb_dead_remove`."""
        dead = self._keys.mailbox_index(name)[1]
        client = self._state().client
        removed = 0
        with map_errors("mb_dead_remove"):
            for entry in entries:
                removed += int(await client.lrem(dead, 1, entry))
        return removed

    async def forget(self, key: str, *, force: bool = False) -> Forgotten:
        """See :meth:`AdminBackend.forget`: the user's keys are found by a scan of its
        hash tag and deleted by one script (the check for work in progress too); then the
        key leaves the mailboxes' sweeper indexes. The turn's own keys (holder, line) are
        left to a turn in progress: they expire or go when it ends."""
        keys = self._keys
        owner, line, waiters, _ = self._turn_keys(key)
        others: list[str] = []
        kinds: list[str] = []
        mailboxes: list[str] = []
        pattern = _glob(f"{keys.prefix}{{{encode(key)}}}:") + "*"
        async for full in self._scan(pattern):
            name = keys.parse(full)
            if name is None or full in (owner, line, waiters):
                continue
            others.append(full)
            kinds.append(_kind(name))
            if kinds[-1] == "role":
                mailboxes.append(name.mailbox or "")
        args = ["1" if force else "0", *kinds, *mailboxes]
        reply = await self._eval("forget", FORGET, [owner, line, waiters, *others], args)
        if int(reply[0]) == -1:
            raise refuse_busy(key, turn=bool(int(reply[1])), draining=map(text, reply[2:]))
        messages, marks, records = (int(n) for n in reply)
        client = self._state().client
        for hints in (await self._indexes())["hint"].values():
            for hint in hints:
                with map_errors("forget"):
                    records += int(await client.srem(hint, key))
        return Forgotten(key, messages=messages, marks=marks, records=records)

    async def sweep(self) -> SweepReport:
        """See :meth:`AdminBackend.sweep`. Redis drops expired leases, marks and records by
        itself (their TTL); what is left is moving a line whose holder lapsed, dropping dead
        waiters, idle queues' retry times and stale hints, and counting undrained queues."""
        keys = self._keys
        turns: set[str] = set()
        boxes: set[tuple[str, str]] = set()
        async for full in self._scan(_glob(keys.prefix) + "*"):
            name = keys.parse(full)
            if name is None or name.key is None:
                continue
            if name.mailbox is not None and name.kind in ("q", "f", "d", "n"):
                boxes.add((name.mailbox, name.key))
            elif name.mailbox is None and name.kind in ("q", "w"):
                turns.add(name.key)
        expired = dead_waiters = idle = 0
        for key in sorted(turns):
            lapsed, dropped = await self._eval("sweep", SWEEP_TURN, self._turn_keys(key), [])
            expired += int(lapsed)
            dead_waiters += int(dropped)
        undrained: list[BoxState] = []
        for mailbox, key in sorted(boxes):
            reply = await self._eval("sweep", SWEEP_BOX, keys.mailbox_keys(mailbox, key), [])
            if int(reply[0]) == 0:
                idle += int(reply[1])
            elif int(reply[0]) == 2:
                undrained.append(BoxState(mailbox, key, int(reply[1]), int(reply[2])))
        stale = await self._drop_stale_hints()
        return SweepReport(
            keys.namespace,
            expired_leases=expired,
            dead_waiters=dead_waiters,
            stale_hints=stale,
            idle_rows=idle,
            undrained=tuple(undrained),
        )

    async def _drop_stale_hints(self) -> int:
        """Remove the sweeper hints of idle queues. Removed first, checked after, put back
        if the queue came alive meanwhile: a submit that makes a new drainer adds its hint
        after storing, so no live queue is left without one (the hint set is in another
        slot: no script can see both)."""
        client = self._state().client
        stale = 0
        sets = [(m, hint) for m, hints in (await self._indexes())["hint"].items() for hint in hints]
        for mailbox, hint in sets:
            with map_errors("sweep"):
                members = [text(m) for m in await client.smembers(hint)]
            for key in members:
                queue, inflight, role, _ = self._keys.mailbox_keys(mailbox, key)
                with map_errors("sweep"):
                    if await client.exists(queue, inflight, role):
                        continue
                    await client.srem(hint, key)
                    if await client.exists(queue, inflight, role):
                        await client.sadd(hint, key)
                    else:
                        stale += 1
        return stale
