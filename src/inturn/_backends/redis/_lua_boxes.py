"""The mailbox's Lua scripts (see :mod:`._lua` for the turn's, whose prelude they share)."""

from __future__ import annotations

from ._lua import _PRELUDE

__all__ = [
    "DEAD_SCAN",
    "MB_DEAD",
    "MB_RELEASE_TAKE",
    "MB_RENEW",
    "MB_RESUME",
    "MB_RETRY",
    "MB_SUBMIT",
    "MB_TAKE",
    "SUBMIT_SCAN",
]

SUBMIT_SCAN = 64
"""How far from the queue's tail MB_SUBMIT looks for its own message (a retried submit)."""

DEAD_SCAN = 1000
"""How far from a dead-letter list's tail MB_DEAD looks for a letter it was sent again."""

# -- mailboxes: KEYS[1] queue (list), KEYS[2] in flight (list), KEYS[3] drainer role (string),
# KEYS[4] not-before (string: the caller's epoch seconds before which the head waits; set by a
# retry, deleted when the retried head is taken or the box empties). All four share the user's
# hash tag; queue and in-flight lists have no TTL (durable). Messages are opaque: no script
# parses them.

_TAKE = """
-- take(q, f, d, n, token, limit, lease_ms, ack, now, hint, user): renew the drainer role,
-- acknowledge the last batch if ack, take the next one, or give the role up when the queue
-- is empty (and drop the user from the sweeper's hint set, when given).
-- now: the caller's clock (seconds), compared with the not-before time the caller stored.
-- returns: {1, message...} taken (in-flight ones first) | {0} empty, role given up
--          | {2, seconds} the head waits for its retry | {-1} not the drainer
local function take(q, f, d, n, token, limit, lease_ms, ack, now, hint, user)
  if redis.call('GET', d) ~= token then return {-1} end
  redis.call('PEXPIRE', d, lease_ms)
  if ack == '1' then redis.call('DEL', f) end
  local inflight = redis.call('LRANGE', f, 0, -1)
  if #inflight > 0 then return {1, unpack(inflight)} end
  if redis.call('LLEN', q) == 0 then
    redis.call('DEL', d, n)
    if hint then redis.call('SREM', hint, user) end
    return {0}
  end
  local not_before = tonumber(redis.call('GET', n) or '0')
  if not_before > tonumber(now) then return {2, tostring(not_before - tonumber(now))} end
  redis.call('DEL', n)
  local taken = redis.call('LRANGE', q, 0, tonumber(limit) - 1)
  redis.call('LTRIM', q, #taken, -1)
  redis.call('RPUSH', f, unpack(taken))
  return {1, unpack(taken)}
end
"""

_TURN_FOR = """
-- turn_for(taken, token, lease_ms): the key's turn (KEYS[1..4]) for a batch just taken:
-- granted to token if nobody holds it or waits in its line, or found granted to it
-- already (a resend after a lost reply). Returns the fence, or false (also when no token
-- asked, or nothing was taken).
local function turn_for(taken, token, lease_ms)
  if not token or taken[1] ~= 1 then return false end
  local granted = mine(token)
  if granted then return granted[2] end
  if redis.call('EXISTS', KEYS[1], KEYS[2]) ~= 0 then return false end
  return grant(token, lease_ms)
end
"""

MB_SUBMIT = (
    "#!lua\n"
    + _PRELUDE
    + _TAKE
    + _TURN_FOR
    + """
-- MB_SUBMIT: store a message; become the drainer if there is none, and then (when ARGV[7]
-- is above 0) take the first batch at once: the new drainer saves a round trip. With
-- ARGV[9], a batch taken while the key's turn is free (no holder, nobody in line) comes
-- with the turn, granted to ARGV[9]: the drainer saves another.
-- KEYS[1..4]: the turn's keys (owner, line, waiters, fence floor)
-- KEYS[5..8]: queue, in flight, role, not-before  KEYS[9]: the mailbox's sweeper hint set
-- (on a Cluster, its set for the key's slot)
-- ARGV[1]: message  ARGV[2]: max_pending  ARGV[3]: "1" drop oldest when full
-- ARGV[4]: token  ARGV[5]: role lease_ms  ARGV[6]: the user key (for the hint)
-- ARGV[7]: how many to take if the caller becomes the drainer  ARGV[8]: the caller's clock
-- [ARGV[9]: the token to grant the turn to  ARGV[10]: its lease_ms]
-- returns: {1, dropped[, taken, fence]} stored, caller drains (taken: as MB_TAKE's reply;
--          fence: the turn's, or false when not granted) | {0, dropped} stored | {-1, 0} full
-- Safe to run twice (a retry after a lost reply): a message text is unique (it carries a
-- unique tag), so a submit that finds its own text near the queue's tail or in flight was
-- stored already; it stores nothing more and answers as the first run did (DRAINER if the
-- role is its token, with the batch in flight again, and the turn if ARGV[9] holds it).
local function first_take(dropped)
  local taken = take(KEYS[5], KEYS[6], KEYS[7], KEYS[8], ARGV[4], ARGV[7], ARGV[5], '0',
    ARGV[8], KEYS[9], ARGV[6])
  return {1, dropped, taken, turn_for(taken, ARGV[9], ARGV[10])}
end
if redis.call('LPOS', KEYS[5], ARGV[1], 'RANK', -1, 'MAXLEN', SUBMIT_SCAN)
    or redis.call('LPOS', KEYS[6], ARGV[1]) then
  if redis.call('GET', KEYS[7]) ~= ARGV[4] then return {0, 0} end
  if tonumber(ARGV[7]) > 0 then return first_take(0) end
  return {1, 0}
end
local dropped = 0
if redis.call('LLEN', KEYS[5]) >= tonumber(ARGV[2]) then
  if ARGV[3] ~= '1' then return {-1, 0} end
  redis.call('LPOP', KEYS[5])
  dropped = 1
end
redis.call('RPUSH', KEYS[5], ARGV[1])
if redis.call('EXISTS', KEYS[7]) == 0 then
  redis.call('SET', KEYS[7], ARGV[4], 'PX', ARGV[5])
  if KEYS[9] then redis.call('SADD', KEYS[9], ARGV[6]) end
  if tonumber(ARGV[7]) > 0 then return first_take(dropped) end
  return {1, dropped}
end
return {0, dropped}
"""
)

MB_TAKE = (
    "#!lua flags=allow-oom\n"
    + _PRELUDE
    + _TAKE
    + _TURN_FOR
    + """
-- MB_TAKE: KEYS[1..4] the turn's keys; KEYS[5..8] queue, in flight, role, not-before;
-- KEYS[9] the hint set
-- ARGV[1]: token  ARGV[2]: limit  ARGV[3]: role lease_ms  ARGV[4]: "1" acknowledge in-flight
-- ARGV[5]: the caller's clock (seconds), for the not-before time  ARGV[6]: the user key
-- [ARGV[7]: the token to grant the key's turn to, with a batch, if it is free
--  ARGV[8]: its lease_ms]
-- returns: as take() above; with ARGV[7], {that, fence or false}
local taken = take(KEYS[5], KEYS[6], KEYS[7], KEYS[8], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
  ARGV[5], KEYS[9], ARGV[6])
if not ARGV[7] then return taken end
return {taken, turn_for(taken, ARGV[7], ARGV[8])}
"""
)

MB_RETRY = """#!lua flags=allow-oom
-- MB_RETRY: put the in-flight messages back at the queue's head (the caller's new texts),
-- to be taken again from ARGV[2] on; with no messages, just acknowledge (mb_done).
-- KEYS[1..4]: queue, in flight, role, not-before
-- ARGV[1]: token  ARGV[2]: not-before (the caller's epoch seconds; 0: none)
-- ARGV[3..]: the messages, oldest first
-- returns: 1 | 0 not the drainer (the sweeper will redeliver them)
local role = redis.call('GET', KEYS[3])
if role and role ~= ARGV[1] then return 0 end
-- Run twice (a retry after a lost reply), the batch must not go back twice: nothing in
-- flight means the first run put it back already.
if #ARGV >= 3 and redis.call('EXISTS', KEYS[2]) == 0 then return 1 end
redis.call('DEL', KEYS[2])
if #ARGV < 3 then return 1 end
for i = #ARGV, 3, -1 do redis.call('LPUSH', KEYS[1], ARGV[i]) end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[4], ARGV[2])
else
  redis.call('DEL', KEYS[4])
end
return 1
"""

MB_RESUME = """#!lua
-- MB_RESUME: the sweeper takes a queue whose drainer died; in-flight messages go first.
-- KEYS[1..4]: queue, in flight, role, not-before  ARGV[1]: token  ARGV[2]: role lease_ms
-- returns: 1 resumed | 0 a live drainer exists | -1 nothing to drain (nothing left behind)
local role = redis.call('GET', KEYS[3])
if role == ARGV[1] then return 1 end  -- run twice (a lost reply): resumed already
if role then return 0 end
if redis.call('LLEN', KEYS[1]) == 0 and redis.call('LLEN', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[4])
  return -1
end
local inflight = redis.call('LRANGE', KEYS[2], 0, -1)
for i = #inflight, 1, -1 do redis.call('LPUSH', KEYS[1], inflight[i]) end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
return 1
"""

MB_RENEW = """#!lua flags=allow-oom
-- MB_RENEW: extend the drainer role if it is still ours.
-- KEYS[1]: the drainer role  ARGV[1]: token  ARGV[2]: lease_ms
-- returns: 1 renewed | 0 not ours
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

MB_RELEASE_TAKE = (
    "#!lua flags=allow-oom\n"
    + _PRELUDE
    + _TAKE
    + """
-- MB_RELEASE_TAKE: the drainer releases the key's turn (handing it to the next live waiter)
-- and takes its next batch, in one round trip. With ARGV[8], a batch taken while nobody
-- waits in the key's line keeps the turn, granted anew to ARGV[8] (a new fence): as if the
-- release were followed at once by ARGV[8]'s JOIN.
-- KEYS[1..4]: the turn's keys  KEYS[5..8]: the mailbox's queue, in flight, role, not-before
-- KEYS[9]: the hint set   ARGV[1]: turn token  ARGV[2..7]: as MB_TAKE's ARGV[1..6]
-- [ARGV[8]: the drainer's next turn token  ARGV[9]: its lease_ms]
-- returns: {taken, next_token, next_fence[, fence]}: taken as MB_TAKE's reply; the turn's
--          next holder (false if none) so the caller can wake it at once if it is local;
--          fence: the turn kept for ARGV[8]
local taken = take(KEYS[5], KEYS[6], KEYS[7], KEYS[8], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
  ARGV[6], KEYS[9], ARGV[7])
local value = redis.call('GET', KEYS[1])
if value then
  local who, fence = holder(value)
  if who == ARGV[1] then
    if ARGV[8] and taken[1] == 1 and redis.call('EXISTS', KEYS[2]) == 0 then
      return {taken, false, false, grant(ARGV[8], ARGV[9])}
    end
    redis.call('DEL', KEYS[1])
    local next_token, next_fence = hand_off(now_ms())
    if next_token then return {taken, next_token, next_fence} end
  elseif ARGV[8] and who == ARGV[8] then  -- run twice (a lost reply): kept already
    return {taken, false, false, fence}
  end
end
return {taken, false, false}
"""
)

MB_DEAD = """#!lua flags=allow-oom
-- MB_DEAD: add dead letters to the list KEYS[1], each at most once.
-- ARGV: the letters, JSON {"m": the failed message, "e": error, "at": time, "n": attempts}
-- returns: how many were added
-- A letter is left out when one of the list's last DEAD_SCAN entries carries the same
-- message (its unique tag "g" and attempt count "a"), or, for a text that is not such a
-- letter, the same text: a call resent after a lost reply, or a message redelivered after a
-- lost acknowledgement that failed again, adds no second letter.
local function same(text)
  local ok, letter = pcall(cjson.decode, text)
  if ok and type(letter) == 'table' and type(letter.m) == 'table' and letter.m.g then
    return 'g' .. tostring(letter.m.g) .. '|' .. tostring(letter.m.a)
  end
  return 't' .. text
end
local seen = {}
for _, text in ipairs(redis.call('LRANGE', KEYS[1], -DEAD_SCAN, -1)) do
  seen[same(text)] = true
end
local added = 0
for _, text in ipairs(ARGV) do
  local id = same(text)
  if not seen[id] then
    redis.call('RPUSH', KEYS[1], text)
    seen[id] = true
    added = added + 1
  end
end
return added
"""

MB_DEAD = MB_DEAD.replace("DEAD_SCAN", str(DEAD_SCAN))
MB_SUBMIT = MB_SUBMIT.replace("SUBMIT_SCAN", str(SUBMIT_SCAN))
