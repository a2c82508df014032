"""Scripts on a Redis Cluster: one pipelined connection per master, chosen by slot.

redis-py's cluster client finds a command's node, takes a connection from that
node's pool and runs its retry and redirection logic for every command: for two
tiny scripts per turn, that costs a client about 2.5 times the CPU of the same
turn on one server. :class:`NodeMuxes` (asyncio) and :class:`SyncNodeMuxes`
(threads) send each script to the master of its keys' slot on a :class:`Mux`
(or :class:`SyncMux`) of that master's own, read from redis-py's slot map.

redis-py stays in charge of the topology. A call the node refuses without
running it (``MOVED``, ``ASK``, ``TRYAGAIN``, ``CLUSTERDOWN``, ``READONLY``, a
slot that no master covers) raises :class:`NotHere`, and a connection that fails
for good (the node is gone) raises :class:`NotHere` too when the script is safe
to send twice; the caller then runs the call through redis-py's cluster client,
which follows the redirection, refreshes its slot map, and so routes the next
calls to the right master. A script that is not safe to resend is not sent
again after a connection failure: its error goes up.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import redis
import redis.asyncio
import redis.exceptions

from inturn._backends.redis._errors import ClientClosed
from inturn._backends.redis._mux import Mux, sha1
from inturn._backends.redis._mux_sync import SyncMux

__all__ = ["NodeMuxes", "NotHere", "SyncNodeMuxes"]

SETS_HERE = """#!lua flags=no-writes,allow-cross-slot-keys
-- The members of the sets named in ARGV, on the one node that runs it (a sweep's read of
-- the hint sets of the slots this node serves: one call instead of one per slot). A name
-- in a slot the node does not serve (moved since the client read its slot map) is skipped;
-- the next sweep, with a fresh map, reads it.
local out = {}
for _, name in ipairs(ARGV) do
  local members = redis.pcall('SMEMBERS', name)
  if type(members) == 'table' and not members.err then
    for _, m in ipairs(members) do out[#out + 1] = m end
  end
end
return out
"""
_SETS_HERE_SHA = sha1(SETS_HERE)

_REFUSED = (
    redis.exceptions.AskError,  # MovedError too: a subclass
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.SlotNotCoveredError,
)
"""Replies that say the script did not run on that node."""

_BROKEN = (redis.exceptions.ConnectionError, OSError)


class NotHere(Exception):
    """The script did not run on the node the slot map named (or may be resent): run it
    through redis-py's cluster client, which finds the right node."""


def _slots_by_master(client: Any) -> list[tuple[Any, list[int]]]:
    """Every master of redis-py's slot map, with the slots it serves."""
    masters: dict[str, tuple[Any, list[int]]] = {}
    for slot, nodes in client.nodes_manager.slots_cache.items():
        masters.setdefault(nodes[0].name, (nodes[0], []))[1].append(slot)
    return list(masters.values())


def _master_of(client: Any, keys: Sequence[str]) -> Any:
    """The master that serves ``keys`` (one slot) by redis-py's map; NotHere if unknown."""
    try:
        return client.nodes_manager.slots_cache[client.keyslot(keys[0])][0]
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise NotHere("the slot map does not know this slot yet") from exc


class _Routing:
    """What both twins share: the client, and how a failed call is handed to redis-py."""

    def __init__(self, client: Any, preload: Sequence[str]) -> None:
        self._client = client
        self._preload = tuple(preload)
        self._lock = threading.Lock()
        self.redirected = 0
        """Calls handed to redis-py's cluster client (a redirection, a node gone)."""
        self._closed = False

    @contextlib.contextmanager
    def _or_not_here(self, idempotent: bool) -> Iterator[None]:
        """Turn a refusal (and a lost connection, if the call is safe to resend) into
        :class:`NotHere`."""
        try:
            yield
        except ClientClosed:  # closed with the backend: not for redis-py to connect anew
            raise
        except _REFUSED as exc:
            raise self._not_here(exc) from exc
        except _BROKEN as exc:
            if not idempotent:
                raise
            raise self._not_here(exc) from exc

    def _not_here(self, exc: BaseException) -> NotHere:
        with self._lock:
            self.redirected += 1
        return NotHere(str(exc))


class NodeMuxes(_Routing):
    """A :class:`Mux` per Cluster master, for one event loop's scripts."""

    def __init__(self, client: Any, *, timeout: float, preload: Sequence[str]) -> None:
        super().__init__(client, preload)
        self._timeout = timeout
        self._muxes: dict[str, Mux] = {}

    def _mux(self, keys: Sequence[str]) -> Mux:
        return self._mux_of(_master_of(self._client, keys))

    def _mux_of(self, node: Any) -> Mux:
        mux = self._muxes.get(node.name)
        if mux is None:
            if self._closed:  # a call that began before aclose(): no new connection
                raise ClientClosed()
            pool = redis.asyncio.ConnectionPool(
                connection_class=node.connection_class, max_connections=4, **node.connection_kwargs
            )
            mux = self._muxes[node.name] = Mux(pool, timeout=self._timeout, preload=self._preload)
        return mux

    def connected(self, keys: Sequence[str]) -> Mux | None:
        """The connection to the master of ``keys`` if one is open (for a call sent without
        waiting: see Mux.submit); None if not, or if the slot map does not know the slot."""
        try:
            return self._muxes.get(_master_of(self._client, keys).name)
        except NotHere:
            return None

    async def evalsha(
        self,
        sha: str,
        lua: str,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        idempotent: bool,
        then: tuple[Any, ...] | None = None,
        hold: bool = False,
        lazy: bool = False,
    ) -> Any:
        """Run a script on its slot's master (``then``, ``hold``, ``lazy``: see
        Mux.evalsha); :class:`NotHere` when redis-py should."""
        if not self._client.nodes_manager.slots_cache:
            await self._client.initialize()
        with self._or_not_here(idempotent):
            mux = self._mux(keys)
            return await mux.evalsha(
                sha, lua, keys, args, idempotent=idempotent, then=then, hold=hold, lazy=lazy
            )

    async def members(self, set_of_slot: Sequence[str]) -> list[bytes]:
        """The members of the sets ``set_of_slot[slot]`` of every slot: one call per master."""
        if not self._client.nodes_manager.slots_cache:
            await self._client.initialize()
        calls = [
            self._mux_of(node).evalsha(
                _SETS_HERE_SHA, SETS_HERE, (), [set_of_slot[slot] for slot in slots]
            )
            for node, slots in _slots_by_master(self._client)
        ]
        return [m for reply in await asyncio.gather(*calls) for m in reply]

    async def aclose(self) -> None:
        """Close every master's connection (after the replies in flight, see Mux.aclose)."""
        self._closed = True
        muxes, self._muxes = list(self._muxes.values()), {}
        for mux in muxes:
            with contextlib.suppress(Exception):
                await mux.aclose()


class SyncNodeMuxes(_Routing):
    """A :class:`SyncMux` per Cluster master, for threads."""

    def __init__(self, client: Any, *, size: int, wait: float, preload: Sequence[str]) -> None:
        super().__init__(client, preload)
        self._size = size
        self._wait = wait
        self._muxes: dict[str, SyncMux] = {}

    def _mux(self, keys: Sequence[str]) -> SyncMux:
        return self._mux_of(_master_of(self._client, keys))

    def _mux_of(self, node: Any) -> SyncMux:
        mux = self._muxes.get(node.name)
        if mux is None:
            with self._lock:
                mux = self._muxes.get(node.name)
                if mux is None and self._closed:  # a call that raced close(): no new one
                    raise ClientClosed()
                if mux is None:
                    pool = node.redis_connection.connection_pool
                    mux = SyncMux(pool, size=self._size, wait=self._wait, preload=self._preload)
                    self._muxes[node.name] = mux
        return mux

    def evalsha(
        self,
        sha: str,
        lua: str,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        timeout: float | None,
        idempotent: bool,
        then: tuple[Any, ...] | None = None,
    ) -> Any:
        """Run a script on its slot's master (and ``then``, see SyncMux.evalsha);
        :class:`NotHere` when redis-py should."""
        with self._or_not_here(idempotent):
            mux = self._mux(keys)
            return mux.evalsha(
                sha, lua, keys, args, timeout=timeout, idempotent=idempotent, then=then
            )

    def members(self, set_of_slot: Sequence[str]) -> list[bytes]:
        """The members of the sets ``set_of_slot[slot]`` of every slot: one call per master."""
        found: list[bytes] = []
        for node, slots in _slots_by_master(self._client):
            args = [set_of_slot[slot] for slot in slots]
            found += self._mux_of(node).evalsha(_SETS_HERE_SHA, SETS_HERE, (), args)
        return found

    def close(self) -> None:
        """Close every master's idle connections (see SyncMux.close)."""
        with self._lock:
            self._closed = True
            muxes, self._muxes = list(self._muxes.values()), {}
        for mux in muxes:
            with contextlib.suppress(Exception):
                mux.close()
