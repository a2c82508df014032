"""The Redis backend's Lua scripts: one atomic round trip per operation.

Every turn script touches the three keys of one user, which share a hash tag
(one Cluster slot), and the fence floor:

    KEYS[1]  owner    string "<token>|<fence>", PX = the holder's lease
    KEYS[2]  line     list of waiting tokens, oldest first
    KEYS[3]  waiters  hash token -> "<alive_until_ms>|<lease_ms>|<wake channel>",
                      and "#" -> the last join sequence number
    KEYS[4]  floor    string, the greatest fence granted in the namespace (on a
                      Cluster: in the user's slot), EX FENCE_TTL

A waiter refreshes ``alive_until`` while it waits; a waiter whose mark has
lapsed is dead and skipped by the hand-off. The hand-off grants the turn to
the first live waiter inside the script that released (or found the holder's
lease lapsed) and PUBLISHes "<token>|<fence>" on that waiter's process channel:
one push, to exactly that waiter. PUBLISH takes no key, so it is allowed in a
Cluster script and reaches a subscriber on any node.

Fences: ``max(floor + 1, server TIME in microseconds)``, and the floor moves up
to the new fence. The owner key goes when the turn ends and the line's keys
when it empties, so an idle user leaves no key at all; the floor is shared by
every user of the namespace (one key; on a Cluster, where a script touches one
slot only, one key per slot, at most 16384: see ``_keys.slot_tag``).

Why a key's fences grow strictly, across idle periods, hand-offs and restarts:

- every grant of a key reads and raises the same floor, so it exceeds every
  earlier grant that raised it: the key's own grants among them. The floor is
  persisted and replicated like any key (RDB/AOF, replicas), so this holds
  across restarts with persistence and fail-overs to a replica that has it;
- the hand-over to a waiter of the releasing process grants the holder's
  fence + 1 (no clock read): the holder's fence is the key's newest, since a
  grant always replaces the owner key; the floor is raised to it too;
- should the floor be gone (a restart without persistence, a namespace idle
  for FENCE_TTL), the clock part still exceeds every earlier fence: fences
  track the clock (they could only run ahead of it at more than a million
  grants a second in one namespace or slot, beyond one Redis core's pace).

A server clock that steps back (an NTP correction, a fail-over to a node whose
clock is behind) is absorbed by the floor: fences go on at floor + 1 each
until the clock catches up. Only a step back together with the loss of the
floor can repeat fences. The cost: one ``SET ... GET`` of the floor per
grant (the same as a floor per user, which left one key behind per user ever
seen), and a single key every grant of a namespace writes (Redis runs scripts
one at a time: no contention, only the write itself).

~1.8e15 today: exact in Lua's doubles (below 2^53) until the year 2255.

Scripts that release, renew, leave or re-check carry ``flags=allow-oom``: a
server at ``maxmemory`` with ``noeviction`` refuses new work (JOIN) but never
strands a held turn.
"""

from __future__ import annotations

__all__ = [
    "ABANDON",
    "CLAIM",
    "FENCE_TTL",
    "FINISH",
    "JOIN",
    "LEAVE",
    "REFRESH",
    "RELEASE",
    "RENEW",
    "STOP_RUNNING",
    "SUPERSEDE",
]

FENCE_TTL = 30 * 24 * 3600
"""Seconds the fence floor of a namespace (or Cluster slot) outlives its last grant
(fences stay increasing after it expires: they follow the clock)."""

SOLO_MAX = 64
"""Longest line JOIN scans to tell a waiter that everyone ahead is in its own event loop."""

_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function int(x)
  return string.format('%.0f', x)
end

local function next_fence()
  local t = redis.call('TIME')
  local clock = tonumber(t[1]) * 1000000 + tonumber(t[2])
  -- The clock is ahead of the floor but for a step back or a grant in the same microsecond:
  -- write it and read the old floor in one command, and correct the rare case after.
  -- Returns the fence, and as text.
  local text = int(clock)
  local floor = tonumber(redis.call('SET', KEYS[4], text, 'EX', FENCE_TTL, 'GET') or '0')
  if floor < clock then return clock, text end
  text = int(floor + 1)
  redis.call('SET', KEYS[4], text, 'EX', FENCE_TTL)
  return floor + 1, text
end

local function holder(value)
  local bar = string.find(value, '|', 1, true)
  return string.sub(value, 1, bar - 1), tonumber(string.sub(value, bar + 1))
end

local function grant(token, lease_ms)
  local fence, text = next_fence()
  redis.call('SET', KEYS[1], token .. '|' .. text, 'PX', lease_ms)
  return fence
end

-- Grant the turn to the first live waiter and push it the news: its token and fence,
-- or false if no waiter is alive. ``now`` (server ms) is read when first needed if not given.
local function hand_off(now)
  while true do
    local token = redis.call('LPOP', KEYS[2])
    if not token then
      redis.call('DEL', KEYS[3])
      return false
    end
    local info = redis.call('HGET', KEYS[3], token)
    if info then
      redis.call('HDEL', KEYS[3], token)
      local alive, lease, channel = string.match(info, '^(%d+)|(%d+)|(.*)$')
      now = now or now_ms()
      if tonumber(alive) > now then
        local fence = grant(token, lease)
        redis.call('PUBLISH', channel, token .. '|' .. int(fence))
        return token, fence
      end
    end
  end
end

-- Take a token out of the line (and its mark); the line's hash goes with its last waiter.
-- Returns whether the token was in the line, and whether the line is now empty.
local function unqueue(token)
  local removed = redis.call('LREM', KEYS[2], 1, token) > 0
  redis.call('HDEL', KEYS[3], token)
  local empty = redis.call('LLEN', KEYS[2]) == 0
  if empty then redis.call('DEL', KEYS[3]) end
  return removed, empty
end

local function mine(token)
  local value = redis.call('GET', KEYS[1])
  if value then
    local who, fence = holder(value)
    if who == token then
      return {1, fence, redis.call('PTTL', KEYS[1])}
    end
  end
  return nil
end

local function mark_alive(token, alive_ms, lease_ms, channel, now)
  redis.call('HSET', KEYS[3], token, int(now + alive_ms) .. '|' .. lease_ms .. '|' .. channel)
  redis.call('PEXPIRE', KEYS[2], alive_ms * 2)
  redis.call('PEXPIRE', KEYS[3], alive_ms * 2)
end
""".replace("FENCE_TTL", str(FENCE_TTL))

JOIN = (
    "#!lua\n"
    + _PRELUDE
    + """
-- JOIN: take the turn if free, else join the line's end (mode "join") or not (mode "try").
-- ARGV[1]: token  ARGV[2]: lease_ms  ARGV[3]: alive_ms  ARGV[4]: wake channel  ARGV[5]: mode
-- returns: {1, fence, pttl_ms} granted | {0, owner_pttl_ms, solo, seq} queued
--          | {0, owner_pttl_ms} busy (mode "try")
--   seq: the token's place in the order of joining (increasing while the line lasts; 0 for
--   a retried JOIN that found the token in the line already).
--   solo = 1: every waiter ahead (at most SOLO_MAX) waits on the same channel, i.e. in the
--   same event loop; that loop may then hand the turn over to it without waiting (RELEASE).
-- Idempotent: a retried JOIN of the same token neither queues it twice nor grants twice.
local token, lease, alive = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1], KEYS[2]) == 0 then  -- no holder, no line: the usual case
  return {1, grant(token, lease), tonumber(lease)}
end
local granted = mine(token)
if granted then return granted end
if redis.call('EXISTS', KEYS[1]) == 0 then
  -- Free, but a line is left (its holder's lease lapsed): its head goes first, no barging.
  if not hand_off() then
    return {1, grant(token, lease), tonumber(lease)}
  end
end
if ARGV[5] == 'try' then return {0, redis.call('PTTL', KEYS[1])} end
local solo = 0
if redis.call('LLEN', KEYS[2]) <= SOLO_MAX then
  solo = 1
  for _, ahead in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    if ahead == token then break end
    local info = redis.call('HGET', KEYS[3], ahead)
    if info and string.match(info, '^%d+|%d+|(.*)$') ~= ARGV[4] then
      solo = 0
      break
    end
  end
end
local seq = 0
if redis.call('HEXISTS', KEYS[3], token) == 0 then
  redis.call('RPUSH', KEYS[2], token)
  seq = redis.call('HINCRBY', KEYS[3], '#', 1)
end
mark_alive(token, alive, lease, ARGV[4], now_ms())
return {0, redis.call('PTTL', KEYS[1]), solo, seq}
"""
)

RELEASE = (
    "#!lua flags=allow-oom\n"
    + _PRELUDE
    + """
-- RELEASE: if ARGV[1] holds the turn, hand it to the next live waiter (or free the key).
-- ARGV[1]: token  [ARGV[2]: next token  ARGV[3]: its lease_ms]
-- returns: {1, next_token, next_fence} handed off | {1} freed | {0} not the holder (no-op;
--          but {1, ARGV[2], its fence} if ARGV[2] holds the turn)
--          (3 instead of 1: ARGV[2] was refused)
-- (The releasing process wakes next_token at once if it is one of its own waiters.)
-- With ARGV[2], the releasing event loop (or thread) has already started that waiter of its
-- own, which JOINed as "solo" and is the first of its line there, with fence = the holder's
-- + 1: the script confirms exactly that grant while that waiter is in the line (no push:
-- the waiter is awake). It heads the line unless its JOIN went out of order (a retry after
-- a dropped connection): then FIFO bends, but the waiter is already running, and refusing
-- it would break exclusion.
local value = redis.call('GET', KEYS[1])
local who, fence = nil, 0
if value then who, fence = holder(value) end
if who ~= ARGV[1] then
  -- Not the holder: a token that releases wants no turn any more. Out of the line with it,
  -- so that no later hand-off (a retried or reordered RELEASE) can grant it.
  unqueue(ARGV[1])
  -- A retried RELEASE (its first reply was lost) confirms again the grant it made.
  if ARGV[2] and who == ARGV[2] then return {1, who, fence} end
  return {0}
end
if not ARGV[2] and redis.call('EXISTS', KEYS[2]) == 0 then  -- nobody waits: the usual case
  redis.call('DEL', KEYS[1], KEYS[3])
  return {1}
end
redis.call('DEL', KEYS[1])
local refused = 0
if ARGV[2] then
  -- holder + 1 exceeds the key's every fence: the owner key holds its newest. The floor
  -- (shared with other keys, so maybe past it already) is raised to it at least.
  local next_fence = fence + 1
  if unqueue(ARGV[2]) then
    local floor = tonumber(redis.call('GET', KEYS[4]) or '0')
    redis.call('SET', KEYS[4], int(math.max(floor, next_fence)), 'EX', FENCE_TTL)
    redis.call('SET', KEYS[1], ARGV[2] .. '|' .. int(next_fence), 'PX', ARGV[3])
    return {1, ARGV[2], next_fence}
  end
  -- Refused: the waiter left the line (it released after a refused grant of its own).
  -- The usual hand-off instead.
  refused = 2
end
local next_token, next_fence = hand_off()
if next_token then return {1 + refused, next_token, next_fence} end
return {1 + refused}
"""
)

RENEW = (
    "#!lua flags=allow-oom\n"
    + _PRELUDE
    + """
-- RENEW: extend the holder's lease.
-- ARGV[1]: token  ARGV[2]: lease_ms
-- returns: 1 renewed | 0 not the holder
if mine(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
)

LEAVE = (
    "#!lua flags=allow-oom\n"
    + _PRELUDE
    + """
-- LEAVE: take a token out of the line; if it was granted meanwhile, say so (still held).
-- ARGV[1]: token
-- returns: {1, fence, pttl_ms} the token holds the turn | {0} it left the line
local granted = mine(ARGV[1])
if granted then return granted end
local _, empty = unqueue(ARGV[1])
if not empty and redis.call('EXISTS', KEYS[1]) == 0 then
  hand_off()  -- the holder lapsed while we waited: move the line on
end
return {0}
"""
)

REFRESH = (
    "#!lua flags=allow-oom\n"
    + _PRELUDE
    + """
-- REFRESH: a waiter's bounded re-check (the safety net behind the push) and liveness mark.
-- Hands a lapsed holder's turn to the head of the line.
-- ARGV[1]: token  ARGV[2]: alive_ms
-- returns: {1, fence, pttl_ms} granted | {0, owner_pttl_ms} still waiting
--          | {-1} not in the line any more (declared dead): join again
local token, alive = ARGV[1], tonumber(ARGV[2])
local granted = mine(token)
if granted then return granted end
local info = redis.call('HGET', KEYS[3], token)
if not info then return {-1} end
local _, lease, channel = string.match(info, '^(%d+)|(%d+)|(.*)$')
local now = now_ms()
mark_alive(token, alive, lease, channel, now)
if redis.call('EXISTS', KEYS[1]) == 0 then
  hand_off(now)
  granted = mine(token)
  if granted then return granted end
end
return {0, redis.call('PTTL', KEYS[1])}
"""
)

# -- dedup marks: KEYS[1] is one hash per (user, scope, id), in the user's hash tag ------
# fields: s = "p" (in progress) | "d" (done); t = claimant token; f = its fence ("" if none);
#         x = lease end (server ms, while in progress); r = the result's JSON text (optional)

_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

CLAIM = (
    "#!lua\n"
    + _NOW
    + """
-- CLAIM: start processing a message id unless it is done or in progress elsewhere.
-- ARGV[1]: token  ARGV[2]: fence or ""  ARGV[3]: lease_ms  ARGV[4]: window_ms
-- returns: {"new"} | {"done", result or false} | {"in_progress"}
local now = now_ms()
local mark = redis.call('HMGET', KEYS[1], 's', 't', 'f', 'x', 'r')
if mark[1] == 'd' then return {'done', mark[5] or false} end
if mark[1] == 'p' then
  local newer = ARGV[2] ~= '' and mark[3] ~= '' and tonumber(ARGV[2]) > tonumber(mark[3])
  if not (newer or mark[2] == ARGV[1] or now >= tonumber(mark[4])) then
    return {'in_progress'}
  end
end
redis.call('DEL', KEYS[1])
local lease_end = string.format('%.0f', now + tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 's', 'p', 't', ARGV[1], 'f', ARGV[2], 'x', lease_end)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {'new'}
"""
)

FINISH = """#!lua flags=allow-oom
-- FINISH: mark a claimed id done for the window, with the result's JSON text if any.
-- ARGV[1]: token  ARGV[2]: window_ms  ARGV[3]: result JSON text (absent: no result)
-- returns: 1 done | 0 the claim was not ours any more
if redis.call('HGET', KEYS[1], 't') ~= ARGV[1] or redis.call('HGET', KEYS[1], 's') ~= 'p' then
  return 0
end
redis.call('HSET', KEYS[1], 's', 'd')
redis.call('HDEL', KEYS[1], 'x')
if ARGV[3] then redis.call('HSET', KEYS[1], 'r', ARGV[3]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

ABANDON = """#!lua flags=allow-oom
-- ABANDON: the run failed; forget our in-progress claim so a retry can run.
-- ARGV[1]: token
-- returns: 1 forgotten | 0 not ours (or already done)
if redis.call('HGET', KEYS[1], 't') == ARGV[1] and redis.call('HGET', KEYS[1], 's') == 'p' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# -- newest call wins: KEYS[1] generation counter, KEYS[2] running call "<token>|<channel>" ----

SUPERSEDE = """#!lua
-- SUPERSEDE: become the newest call of (user, scope); optionally cancel the running one.
-- ARGV[1]: "1" to push a cancel to the running call  ARGV[2]: keep_ms for both keys
-- returns: the new generation
local generation = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ARGV[1] == '1' then
  local running = redis.call('GET', KEYS[2])
  if running then
    local bar = string.find(running, '|', 1, true)
    local token, channel = string.sub(running, 1, bar - 1), string.sub(running, bar + 1)
    redis.call('PUBLISH', channel, 'cancel|' .. token)
  end
end
return generation
"""

STOP_RUNNING = """#!lua flags=allow-oom
-- STOP_RUNNING: forget the running-call record if it is still ours.
-- ARGV[1]: token
-- returns: 1 forgotten | 0 not ours
local running = redis.call('GET', KEYS[1])
if running and string.sub(running, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

JOIN = JOIN.replace("SOLO_MAX", str(SOLO_MAX))
RELEASE = RELEASE.replace("FENCE_TTL", str(FENCE_TTL))
