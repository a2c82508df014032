"""Keyed routing for Celery: a key's tasks go to one of N shard queues (a stable hash).

Also importable from :mod:`inturn.contrib.celery`. Needs no Celery import of its own: a
router is a plain callable in ``app.conf.task_routes``.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import inturn
from inturn import ConfigurationError

__all__ = ["KeyedRouter", "shard_of"]


def shard_of(key: str | int, shards: int) -> int:
    """The shard (0..shards-1) of ``key``: a stable hash, the same in every process and
    Python version (``1`` and ``"1"`` are one key)."""
    if isinstance(key, bool) or not isinstance(key, str | int):
        raise inturn.InvalidKey(f"a key must be a str or an int, not {type(key).__name__}")
    digest = hashlib.blake2b(str(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


class KeyedRouter:
    """A Celery router: a task with argument ``key`` goes to queue ``f"{prefix}{n}"``,
    ``n = shard_of(key, queues)``. Consume each shard queue with concurrency 1 and a
    key's tasks run one at a time, in order, without a lock.

        app.conf.task_routes = (KeyedRouter(queues=4, key="user_id"),)
        # celery -A proj worker -Q inturn.shard.0 -c 1   (one per shard)

    ``tasks``: only these task names (default: every task that takes ``key``).
    Tasks it does not route go on to the next router (it returns None).
    """

    def __init__(
        self,
        queues: int,
        key: str,
        *,
        prefix: str = "inturn.shard.",
        tasks: Sequence[str] | None = None,
    ) -> None:
        if isinstance(queues, bool) or not isinstance(queues, int) or queues < 1:
            raise ConfigurationError(f"queues must be a positive int, not {queues!r}")
        if not isinstance(key, str) or not key:
            raise ConfigurationError("key must be the name of a task argument")
        self.queues = queues
        self.key = key
        self.prefix = prefix
        self.tasks = None if tasks is None else frozenset(tasks)
        self._positions: dict[str, int | None] = {}

    @property
    def queue_names(self) -> list[str]:
        """Every shard queue, for ``-Q`` and ``task_queues``."""
        return [f"{self.prefix}{n}" for n in range(self.queues)]

    def queue_for(self, key: str | int) -> str:
        return f"{self.prefix}{shard_of(key, self.queues)}"

    def _position(self, name: str, task: Any) -> int | None:
        if name not in self._positions:
            position = None
            run = getattr(task, "run", None)
            if run is not None:
                try:
                    params = list(inspect.signature(run).parameters)
                except (TypeError, ValueError):
                    params = []
                if self.key in params:
                    position = params.index(self.key)
            self._positions[name] = position
        return self._positions[name]

    def __call__(
        self,
        name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: Mapping[str, Any],
        task: Any = None,
        **_: Any,
    ) -> dict[str, str] | None:
        if self.tasks is not None and name not in self.tasks:
            return None
        if kwargs and self.key in kwargs:
            key = kwargs[self.key]
        else:
            position = self._position(name, task) if task is not None else None
            if position is None or position >= len(args or ()):
                return None
            key = args[position]
        return {"queue": self.queue_for(key)}
