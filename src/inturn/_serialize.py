"""``@gate.serialize``: one line that makes a function run in turn per key, at most once per id.

    @gate.serialize(key="user_id", dedup="message_id", on_busy="wait")
    async def send_ai_response(user_id: int, message_id: int | None, text: str) -> str: ...

Busy policies (what a call does when the key's turn is taken):

- ``wait`` (default): wait in the key's FIFO line;
- ``skip``: raise :class:`~inturn.Skipped` at once;
- ``latest``: only the newest waiting call survives; older *waiting* calls raise
  :class:`~inturn.Superseded` (at once in this process; a waiter in another
  process finds out when its turn comes, and steps aside without running);
- ``cancel``: like ``latest``, and the *running* call is cancelled too — also in
  another process on Redis (a push reaches it) — and raises ``Superseded``.
  Async functions only.

With ``dedup``, the call claims its message id inside the turn: a duplicate of
a finished call returns the first call's stored result (when it was JSON and at
most 64 KiB) or raises :class:`~inturn.Duplicate`; a call that raised leaves
the id free for a retry. A dedup id of ``None`` means "no id": that call is not
deduplicated (a proactive message has no message id).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, Literal, ParamSpec, TypeVar, overload

from ._backends.base import SupersedeBackend, SyncSupersedeBackend
from ._dedup import Deduplicator
from ._errors import Busy, ConfigurationError, Duplicate, Skipped, Superseded
from ._keys import new_token, normalize_key
from ._runtime import Runtime
from ._turn_async import TurnRequest
from ._turn_sync import SyncTurnRequest, refuse_on_a_loop

__all__ = ["POLICIES", "OnBusy", "Serializer"]

P = ParamSpec("P")
R = TypeVar("R")

OnBusy = Literal["wait", "skip", "latest", "cancel"]
POLICIES: tuple[OnBusy, ...] = ("wait", "skip", "latest", "cancel")

Getter = Callable[[inspect.BoundArguments], object]


def _getter(sig: inspect.Signature, spec: str | Callable[..., object], what: str) -> Getter:
    if isinstance(spec, str):
        if spec not in sig.parameters:
            raise ConfigurationError(f"{what}={spec!r} names no parameter of the function")
        return lambda bound: bound.arguments.get(spec)
    if callable(spec):
        return lambda bound: spec(*bound.args, **bound.kwargs)
    raise ConfigurationError(f"{what} must be a parameter name or a callable, not {spec!r}")


class _Call:
    """One call under ``latest``/``cancel``: can be told that a newer call took its place."""

    __slots__ = ("_cancel", "active", "cancelled", "superseded")

    def __init__(self) -> None:
        self.superseded = False
        self.active = True
        self.cancelled = False
        self._cancel: Callable[[], None] | None = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a thread: it learns it was superseded when its turn comes
        task = asyncio.current_task()
        if task is not None:

            def cancel_now() -> None:
                # Checked on the loop, so the call cannot finish meanwhile; once only, since
                # the registry and a push can both ask (uncancel() must then reach 0).
                if self.active and not self.cancelled:
                    self.cancelled = True
                    task.cancel("inturn: superseded by a newer call")

            def cancel_soon() -> None:
                loop.call_soon_threadsafe(cancel_now)

            self._cancel = cancel_soon

    def supersede(self) -> None:
        self.superseded = True
        if self._cancel is not None:
            self._cancel()


class Serializer:
    """The decorator returned by :meth:`Gate.serialize` (see the module docstring)."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        key: str | Callable[..., object],
        dedup: str | Callable[..., object] | None,
        on_busy: str,
        timeout: float | None,
        window: float,
        name: str | None,
    ) -> None:
        if on_busy not in POLICIES:
            raise ConfigurationError(
                f"on_busy must be one of {', '.join(POLICIES)}; not {on_busy!r}"
            )
        self._runtime = runtime
        self.key = key
        self.dedup = dedup
        self.on_busy: OnBusy = on_busy  # narrowed by the check above
        self.timeout = timeout
        self.window = window
        self.name = name

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        sig = inspect.signature(fn)
        plan = _Plan(self, fn, sig)
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await plan.run_async(args, kwargs)

            return run_async
        if self.on_busy == "cancel":
            raise ConfigurationError(
                f"on_busy='cancel' needs an async function: a thread cannot be cancelled "
                f"({fn.__qualname__} is a plain def)"
            )

        @functools.wraps(fn)
        def run_sync(*args: P.args, **kwargs: P.kwargs) -> Any:
            return plan.run_sync(args, kwargs)

        return run_sync


class _Bound:
    """One call's arguments, resolved."""

    __slots__ = ("bound", "inject_fence", "key", "msg_id")

    def __init__(
        self, bound: inspect.BoundArguments, key: Any, msg_id: Any, inject_fence: bool
    ) -> None:
        self.bound = bound
        self.key = key
        self.msg_id = msg_id
        self.inject_fence = inject_fence


class _Plan:
    """What one decorated function does per call, worked out once at decoration."""

    def __init__(self, s: Serializer, fn: Callable[..., Any], sig: inspect.Signature) -> None:
        self.fn = fn
        self.sig = sig
        self.runtime = s._runtime
        self.on_busy = s.on_busy
        self.timeout = s.timeout
        self.scope = s.name or f"{fn.__module__}.{fn.__qualname__}"
        self.key_name = s.key if isinstance(s.key, str) else "key"
        self.get_key = _getter(sig, s.key, "key")
        self.get_id = None if s.dedup is None else _getter(sig, s.dedup, "dedup")
        self.id_name = s.dedup if isinstance(s.dedup, str) else "dedup"
        self.dedup = (
            None if s.dedup is None else Deduplicator(s._runtime, self.scope, window=s.window)
        )
        self.wants_fence = "fence" in sig.parameters

    def _skipped(self, message: str, *, key: str) -> Skipped:
        self.runtime.metrics.count("calls_skipped", scope=self.scope)
        return Skipped(message, key=key)

    def _draining(self, key: object) -> Skipped:
        return self._skipped(f"key {key!r} has a mailbox draining: call skipped", key=str(key))

    def _superseded(self, message: str, *, key: str) -> Superseded:
        self.runtime.metrics.count("calls_superseded", scope=self.scope)
        return Superseded(message, key=key)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Bound:
        bound = self.sig.bind(*args, **kwargs)
        inject_fence = self.wants_fence and "fence" not in bound.arguments
        bound.apply_defaults()
        key = self.get_key(bound)
        if key is None or key == "":
            raise ValueError(f"the serialize key {self.key_name!r} resolved to {key!r}")
        msg_id = None if self.get_id is None else self.get_id(bound)
        if msg_id == "":
            raise ValueError(f"the dedup id {self.id_name!r} resolved to ''")
        return _Bound(bound, key, msg_id, inject_fence)

    def _turn(self, key: object, *, nowait: bool = False) -> TurnRequest:
        rt = self.runtime
        timeout = None if nowait else self.timeout
        return TurnRequest(
            rt, normalize_key(key), timeout=timeout, nowait=nowait, settings=rt.settings
        )

    def _turn_sync(self, key: object, *, nowait: bool = False) -> SyncTurnRequest:
        rt = self.runtime
        timeout = None if nowait else self.timeout
        return SyncTurnRequest(
            rt, normalize_key(key), timeout=timeout, nowait=nowait, settings=rt.settings
        )

    def _args(self, call: _Bound, fence: int) -> inspect.BoundArguments:
        if call.inject_fence:
            call.bound.arguments["fence"] = fence
        return call.bound

    # -- async ------------------------------------------------------------------------

    async def run_async(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        call = self.bind(args, kwargs)
        try:
            return await self._call_async(call)
        except Duplicate as dup:
            if dup.has_result:
                return dup.result
            raise

    async def _call_async(self, call: _Bound) -> Any:
        key = call.key
        if self.on_busy == "skip":
            if await self.runtime.busy_elsewhere(normalize_key(key)):
                raise self._draining(key)
            try:
                async with self._turn(key, nowait=True) as turn:
                    return await self._body_async(call, turn.fence)
            except Busy as busy:
                if isinstance(busy, Skipped):
                    raise
                raise self._skipped(
                    f"key {busy.key!r} is busy: call skipped", key=busy.key
                ) from None
        if self.on_busy == "wait":
            async with self._turn(key) as turn:
                return await self._body_async(call, turn.fence)
        return await self._newest_async(call)

    async def _newest_async(self, bound_call: _Bound) -> Any:
        cancel, key = self.on_busy == "cancel", bound_call.key
        name = (self.scope, str(key))
        call = _Call()
        task = asyncio.current_task()
        registry = self.runtime.newest
        registry.arrive(name, call, cancel_running=cancel)
        store = self.runtime.backend
        backend = store if isinstance(store, SupersedeBackend) else None
        try:
            generation = None
            if backend is not None:
                generation = await backend.supersede(str(key), self.scope, cancel_running=cancel)
            async with self._turn(key) as turn:
                registry.start(name, call)
                if call.superseded or (
                    backend is not None
                    and generation is not None
                    and not await backend.is_newest(str(key), self.scope, generation)
                ):
                    raise self._superseded(
                        f"a newer call for key {turn.key!r} took over", key=turn.key
                    )
                token = new_token()
                if cancel and backend is not None:
                    await backend.start_running(turn.key, self.scope, token, call.supersede)
                try:
                    return await self._body_async(bound_call, turn.fence)
                finally:
                    if cancel and backend is not None:
                        await asyncio.shield(backend.stop_running(turn.key, self.scope, token))
        except asyncio.CancelledError:
            if call.superseded and task is not None and task.uncancel() == 0:
                raise self._superseded(
                    f"a newer call for key {key!r} took over", key=str(key)
                ) from None
            raise
        finally:
            call.active = False
            registry.leave(name, call)

    async def _body_async(self, call: _Bound, fence: int) -> Any:
        bound = self._args(call, fence)
        if self.dedup is None or call.msg_id is None:
            return await self.fn(*bound.args, **bound.kwargs)
        async with self.dedup.claim(call.key, call.msg_id, fence=fence) as claim:
            claim.result = result = await self.fn(*bound.args, **bound.kwargs)
            return result

    # -- sync -------------------------------------------------------------------------

    def run_sync(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.on_busy != "skip":
            refuse_on_a_loop(
                f"{self.fn.__qualname__}(...), a serialized def,",
                f"await asyncio.to_thread({self.fn.__qualname__}, ...)",
            )
        call = self.bind(args, kwargs)
        try:
            return self._call_sync(call)
        except Duplicate as dup:
            if dup.has_result:
                return dup.result
            raise

    def _call_sync(self, call: _Bound) -> Any:
        key = call.key
        if self.on_busy == "skip":
            if self.runtime.busy_elsewhere_sync(normalize_key(key)):
                raise self._draining(key)
            try:
                with self._turn_sync(key, nowait=True) as turn:
                    return self._body_sync(call, turn.fence)
            except Busy as busy:
                if isinstance(busy, Skipped):
                    raise
                raise self._skipped(
                    f"key {busy.key!r} is busy: call skipped", key=busy.key
                ) from None
        if self.on_busy == "wait":
            with self._turn_sync(key) as turn:
                return self._body_sync(call, turn.fence)
        name = (self.scope, str(key))
        newer = _Call()
        registry = self.runtime.newest
        registry.arrive(name, newer, cancel_running=False)
        backend = self.runtime.sync_backend
        newest = backend if isinstance(backend, SyncSupersedeBackend) else None
        try:
            generation = None
            if newest is not None:
                generation = newest.supersede(str(key), self.scope, cancel_running=False)
            with self._turn_sync(key) as turn:
                registry.start(name, newer)
                if newer.superseded or (
                    newest is not None
                    and generation is not None
                    and not newest.is_newest(str(key), self.scope, generation)
                ):
                    raise self._superseded(
                        f"a newer call for key {turn.key!r} took over", key=turn.key
                    )
                return self._body_sync(call, turn.fence)
        finally:
            newer.active = False
            registry.leave(name, newer)

    def _body_sync(self, call: _Bound, fence: int) -> Any:
        bound = self._args(call, fence)
        if self.dedup is None or call.msg_id is None:
            return self.fn(*bound.args, **bound.kwargs)
        with self.dedup.claim_sync(call.key, call.msg_id, fence=fence) as claim:
            claim.result = result = self.fn(*bound.args, **bound.kwargs)
            return result
