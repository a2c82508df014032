"""The KEYS and ARGV of each Redis script, built once for the async and the sync twin."""

from __future__ import annotations

import time
from typing import Any

from ._keys import KeySpace

SUPERSEDE_KEEP = 3600.0
"""Seconds a (user, function) generation counter and running-call record outlive their use."""


def ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _turn_args(turn: tuple[str, float] | None) -> list[Any]:
    """The ARGV a mailbox script takes, last, to grant the key's turn with a batch."""
    return [] if turn is None else [turn[0], ms(turn[1])]


TURN_KEYS_KEPT = 1024
"""How many keys' KEYS lists a loop remembers (then it starts over)."""

Call = tuple[str, list[str], list[Any]]
"""A script to run: its name, KEYS and ARGV."""


class Scripts:
    """The KEYS and ARGV of each mailbox and dedup script, built once for both twins.

    ``cluster``: the fence floor and the sweeper's hint set a script touches are
    those of the user's slot (see ``KeySpace.fence_floor``, ``KeySpace.hint_set``).
    """

    __slots__ = ("_turn_keys", "cluster", "keys")

    def __init__(self, keys: KeySpace, *, cluster: bool) -> None:
        self.keys = keys
        self.cluster = cluster
        self._turn_keys: dict[str, list[str]] = {}

    def turn_keys(self, key: str) -> list[str]:
        """The KEYS of the turn scripts for ``key`` (remembered for the busy keys: a turn
        asks twice; the caller must not change the list)."""
        found = self._turn_keys.get(key)
        if found is None:
            if len(self._turn_keys) >= TURN_KEYS_KEPT:
                self._turn_keys.clear()
            found = self._turn_keys[key] = self.keys.turn_keys(key, cluster=self.cluster)
        return found

    def hint_set(self, name: str, key: str) -> str:
        """The sweeper's hint set of mailbox ``name`` that holds ``key``."""
        return self.keys.hint_set(name, key, cluster=self.cluster)

    def hint_sets(self, name: str) -> list[str]:
        """Every hint set of mailbox ``name`` (see ``KeySpace.hint_sets``)."""
        return self.keys.hint_sets(name, cluster=self.cluster)

    def _hint(self, name: str, key: str) -> list[str]:
        return [self.hint_set(name, key)]

    def mb_submit(
        self,
        name: str,
        key: str,
        message: str,
        *,
        max_pending: int,
        drop_oldest: bool,
        token: str,
        lease: float,
        take: int,
        turn: tuple[str, float] | None = None,
    ) -> Call:
        keys = self.turn_keys(key) + self.keys.mailbox_keys(name, key) + self._hint(name, key)
        args = [message, max_pending, "1" if drop_oldest else "0", token, ms(lease), key, take]
        args += [repr(time.time()), *_turn_args(turn if take > 0 else None)]
        return "mb_submit", keys, args

    def _take(
        self, name: str, key: str, token: str, limit: int, lease: float, ack: bool
    ) -> tuple[list[str], list[Any]]:
        """The KEYS (after the turn's) and ARGV of a take, as MB_TAKE's ARGV[1..6]."""
        keys = self.keys.mailbox_keys(name, key) + self._hint(name, key)
        return keys, [token, limit, ms(lease), "1" if ack else "0", repr(time.time()), key]

    def mb_take(
        self,
        name: str,
        key: str,
        token: str,
        limit: int,
        lease: float,
        ack: bool,
        turn: tuple[str, float] | None = None,
    ) -> Call:
        take_keys, args = self._take(name, key, token, limit, lease, ack)
        args += _turn_args(turn)
        return "mb_take", self.turn_keys(key) + take_keys, args

    def mb_release_take(
        self,
        name: str,
        key: str,
        token: str,
        turn_token: str,
        limit: int,
        lease: float,
        ack: bool,
        turn: tuple[str, float] | None = None,
    ) -> Call:
        take_keys, take_args = self._take(name, key, token, limit, lease, ack)
        args = [turn_token, *take_args, *_turn_args(turn)]
        return "mb_release_take", self.turn_keys(key) + take_keys, args

    def mb_retry(
        self, name: str, key: str, token: str, messages: list[str], not_before: float
    ) -> Call:
        keys = self.keys.mailbox_keys(name, key)
        return "mb_retry", keys, [token, repr(not_before) if messages else "0", *messages]

    def mb_resume(self, name: str, key: str, token: str, lease: float) -> Call:
        return "mb_resume", self.keys.mailbox_keys(name, key), [token, ms(lease)]

    def mb_dead(self, name: str, entries: list[str]) -> Call:
        return "mb_dead", [self.keys.mailbox_index(name)[1]], list(entries)

    def mb_renew(self, name: str, key: str, token: str, lease: float) -> Call:
        return "mb_renew", self.keys.mailbox_keys(name, key)[2:3], [token, ms(lease)]

    def claim(
        self,
        key: str,
        scope: str,
        id: str,
        token: str,
        fence: int | None,
        lease: float,
        window: float,
    ) -> Call:
        args = [token, "" if fence is None else fence, ms(lease), ms(window)]
        return "claim", [self.keys.mark_key(key, scope, id)], args

    def finish(
        self, key: str, scope: str, id: str, token: str, result: str | None, window: float
    ) -> Call:
        args = [token, ms(window)] + ([] if result is None else [result])
        return "finish", [self.keys.mark_key(key, scope, id)], args

    def abandon(self, key: str, scope: str, id: str, token: str) -> Call:
        return "abandon", [self.keys.mark_key(key, scope, id)], [token]

    def supersede(self, key: str, scope: str, cancel_running: bool) -> Call:
        args = ["1" if cancel_running else "0", ms(SUPERSEDE_KEEP)]
        return "supersede", self.keys.supersede_keys(key, scope), args
