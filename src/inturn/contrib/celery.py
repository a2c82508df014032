"""Celery tasks that run in turn per key: ``@app.task(base=SerializedTask, inturn={...})``.

    app.conf.inturn_url = "redis://localhost:6379/0"

    @app.task(base=SerializedTask, inturn={"key": "user_id", "dedup": "message_id"})
    def reply(user_id: int, message_id: int, text: str, fence: int = 0) -> None: ...

    reply.delay(user_id=42, message_id=7, text="hi")       # through the broker, as usual

Two modes (``inturn={"mode": ...}``):

- ``"mailbox"`` (default): ``.delay()``/``.apply_async()`` store the call in the
  key's mailbox before the task message is sent, so the queue keeps the order of
  the calls; the task message only kicks a worker. The call that found the key
  without a drainer passes that role to its task: the worker running it drains
  the key's calls one per turn, oldest first, until the queue is empty. Every
  other task only returns: a worker slot never waits for another holder.
- ``"turn"``: the body runs inside the key's turn; if the key stays busy past
  ``wait`` seconds, the task is retried (``self.retry(countdown=...)``) instead of
  holding its slot.

:class:`KeyedRouter` sends a key's tasks to one of N shard queues (a stable hash),
each consumed with concurrency 1. ``inturn.sweep`` (registered on the app) resumes
mailboxes whose drainer died; put it on beat. See ``docs/celery.md``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random
import threading
import uuid
import weakref
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import inturn
from inturn import ConfigurationError, Gate, Mailbox, Message
from inturn.contrib.celery_routing import KeyedRouter, shard_of

try:
    from celery import Task, signals
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ConfigurationError(
        "inturn.contrib.celery needs Celery: pip install 'inturn[celery]'"
    ) from exc

__all__ = [
    "KeyedRouter",
    "SerializedTask",
    "check_configuration",
    "current_gate",
    "shard_of",
]

logger = logging.getLogger("inturn.celery")

KICK = "_inturn_kick"
"""The keyword a mailbox-mode task message carries instead of running the body: which key
to drain and, when the sender took the key's drainer role, its token."""

SWEEP_TASK = "inturn.sweep"
"""The name of the task that sweeps the mailboxes of an app's serialized tasks."""

_OPTION_NAMES = frozenset(
    {
        "key",
        "mode",
        "dedup",
        "mailbox",
        "batch",
        "max_batch",
        "debounce",
        "debounce_max",
        "max_attempts",
        "backoff",
        "max_pending",
        "overflow",
        "wait",
        "countdown",
        "busy_retries",
        "on_busy",
    }
)


@dataclass(frozen=True)
class Options:
    """A serialized task's ``inturn={...}`` options, checked."""

    key: str
    mode: Literal["mailbox", "turn"] = "mailbox"
    dedup: str | None = "task_id"
    mailbox: str | None = None
    batch: bool = False
    max_batch: int = 100
    debounce: float = 0.0
    debounce_max: float | None = None
    max_attempts: int = 5
    backoff: Sequence[float] = (0.5, 2.0, 10.0, 30.0)
    max_pending: int = 10_000
    overflow: Literal["reject", "drop_oldest"] = "reject"
    wait: float = 0.2
    countdown: float = 0.5
    busy_retries: int = 1000
    on_busy: Literal["retry", "skip"] = "retry"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, task_name: str, raw: object) -> Options:
        if not isinstance(raw, Mapping):
            raise ConfigurationError(
                f"task {task_name!r}: inturn= must be a dict such as "
                '{"key": "user_id"}, not ' + repr(raw)
            )
        unknown = set(raw) - _OPTION_NAMES
        if unknown:
            raise ConfigurationError(
                f"task {task_name!r}: unknown inturn option(s) {sorted(unknown)}; "
                f"known: {sorted(_OPTION_NAMES)}"
            )
        key = raw.get("key")
        if not isinstance(key, str) or not key:
            raise ConfigurationError(
                f"task {task_name!r}: inturn needs 'key', the name of the argument "
                "that holds the key (a user id)"
            )
        mode = raw.get("mode", "mailbox")
        if mode not in ("mailbox", "turn"):
            raise ConfigurationError(
                f"task {task_name!r}: inturn mode must be 'mailbox' or 'turn', not {mode!r}"
            )
        dedup = raw.get("dedup", "task_id")
        if dedup is not None and (not isinstance(dedup, str) or not dedup):
            raise ConfigurationError(
                f"task {task_name!r}: inturn dedup must be an argument name, 'task_id' or None"
            )
        on_busy = raw.get("on_busy", "retry")
        if on_busy not in ("retry", "skip"):
            raise ConfigurationError(
                f"task {task_name!r}: inturn on_busy must be 'retry' or 'skip', not {on_busy!r}"
            )
        if on_busy == "skip" and mode != "turn":
            raise ConfigurationError(
                f"task {task_name!r}: inturn on_busy='skip' needs mode 'turn' (a mailbox "
                "never skips a call: it queues it)"
            )
        for name in ("wait", "countdown", "debounce"):
            value = raw.get(name, 0.0)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigurationError(
                    f"task {task_name!r}: inturn {name} must be seconds >= 0, not {value!r}"
                )
        known = {k: v for k, v in raw.items() if k in _OPTION_NAMES}
        return cls(**known)


# -- per-process, per-loop gates ------------------------------------------------------


class _State:
    """One process's gate and mailboxes for one app (never carried across a fork)."""

    def __init__(self, app: Any) -> None:
        self.pid = os.getpid()
        self.gate = _make_gate(app)
        self.mailboxes: dict[str, Mailbox] = {}
        self.lock = threading.Lock()


_states: dict[int, _State] = {}
_states_lock = threading.Lock()
_loop_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, Gate]] = (
    weakref.WeakKeyDictionary()
)
_local = threading.local()


def _setting(app: Any, name: str, default: Any = None) -> Any:
    try:
        value = app.conf.get(name)
    except Exception:  # a conf that cannot be read is a missing setting
        value = None
    return default if value is None else value


def _make_gate(app: Any) -> Gate:
    url = _setting(app, "inturn_url") or os.environ.get("INTURN_URL")
    if not url:
        raise ConfigurationError(
            "inturn needs a URL for Celery tasks: set app.conf.inturn_url "
            "(or the INTURN_URL environment variable), e.g. redis://localhost:6379/0"
        )
    return Gate.from_url(
        str(url),
        namespace=str(_setting(app, "inturn_namespace", "celery")),
        lease=float(_setting(app, "inturn_lease", 30.0)),
    )


def _state(app: Any) -> _State:
    """This process's state for ``app``; made on first use after a fork."""
    pid = os.getpid()
    state = _states.get(id(app))
    if state is not None and state.pid == pid:
        return state
    with _states_lock:
        state = _states.get(id(app))
        if state is None or state.pid != pid:
            # A state inherited through fork belongs to the parent: drop it, never close
            # it (its sockets are the parent's).
            state = _states[id(app)] = _State(app)
        return state


def current_gate(app: Any) -> Gate:
    """The gate of ``app`` for the caller: one per worker process, and one per event loop
    for code running inside a loop (an ``async def`` task body).

    A gate's async connections belong to one event loop; a gate made before a fork
    belongs to the parent. This hands out the right one for where it is called.
    """
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is None:
        return _state(app).gate
    gates = _loop_gates.setdefault(loop, {})
    gate = gates.get(id(app))
    if gate is None:
        gate = gates[id(app)] = _make_gate(app)
    return gate


def _run_coroutine(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run an ``async def`` task body on this thread's event loop (one per thread and
    process, kept between tasks so per-loop gates and clients are reused)."""
    loop: asyncio.AbstractEventLoop | None = getattr(_local, "loop", None)
    if loop is None or getattr(_local, "pid", None) != os.getpid() or loop.is_closed():
        loop = asyncio.new_event_loop()
        _local.loop, _local.pid = loop, os.getpid()
    return loop.run_until_complete(coro)


def _reset_after_fork(**_: object) -> None:
    """``worker_process_init``: forget the parent's gates and loops (never close them)."""
    with _states_lock:
        _states.clear()
    _loop_gates.clear()
    _local.__dict__.clear()


# -- the task base class ---------------------------------------------------------------


class SerializedTask(Task):
    """A Celery task whose calls run in turn per key. Configure with the task option
    ``inturn={"key": "<argument name>", "mode": "mailbox"|"turn", "dedup": ...}``.

    The body may declare ``fence`` (it receives the turn's fence) and, in mailbox mode
    with ``"batch": True``, ``inturn_messages`` (it receives the batch's
    :class:`Message` objects, oldest first; the other arguments are the newest
    call's). Give both a default, so ``.delay()`` can leave them out.
    """

    inturn: ClassVar[Mapping[str, Any] | None] = None
    _inturn_options: ClassVar[Options | None] = None
    _inturn_params: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def on_bound(cls, app: Any) -> None:
        super().on_bound(app)
        if "run" not in cls.__dict__:
            return  # the base class itself, or an abstract subclass
        options = Options.parse(cls.name, cls.inturn)
        serializer = cls.serializer or _setting(app, "task_serializer", "json")
        if serializer != "json":
            raise ConfigurationError(
                f"task {cls.name!r} uses the {serializer!r} serializer: inturn stores a "
                "call's arguments as JSON, so serialized tasks need "
                "task_serializer='json' (Celery's default); never pickle"
            )
        run = cls.__dict__["run"]
        func = run.__func__ if isinstance(run, staticmethod) else run
        params = tuple(inspect.signature(func).parameters)
        if not isinstance(run, staticmethod):
            params = params[1:]  # bind=True: the first parameter is the task
        for name in (options.key, options.dedup):
            if name not in (None, "task_id") and name not in params:
                raise ConfigurationError(
                    f"task {cls.name!r}: inturn names the argument {name!r}, "
                    f"which the task does not take (it takes {list(params)})"
                )
        cls._inturn_options = options
        cls._inturn_params = params
        _install(app)

    # -- the worker's entry point ----------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or self._inturn_options is None:
            # Called as a plain function: run the body here and now, as Celery does. (Eager
            # runs, ``.apply()`` or ``task_always_eager``, run below: in turn, here.)
            result = super().__call__(*args, **kwargs)
            return _run_coroutine(result) if inspect.iscoroutine(result) else result
        options = self._inturn_options
        kick = kwargs.pop(KICK, None)
        if kick is not None:  # the call was stored by its sender: drain if handed the role
            box = self._mailbox()
            if kick.get("token"):
                box.drain_sync(kick["key"], kick["token"])
                # A kick that waited in the broker past the lease finds its role lapsed:
                # then this task drains, unless another drainer took the queue meanwhile.
                box.resume_sync(kick["key"])
            return None
        call = self._bind_arguments(args, kwargs)
        key = self._key_of(call)
        msg_id = self._message_id(call)
        if options.mode == "turn":
            return self._run_in_turn(key, msg_id, args, kwargs)
        # Sent without a kick (send_task by name, an older sender): store and drain here.
        self._mailbox().submit_sync(key, {"args": list(args), "kwargs": kwargs}, id=msg_id)
        return None

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        **options: Any,
    ) -> Any:
        """Send the task. In mailbox mode the call is stored in the key's mailbox first (so
        the key's calls keep the order they were made in) and the message sent is a kick
        for the worker; eager mode and turn mode send the call as Celery does."""
        opts = self._inturn_options
        if opts is None or opts.mode != "mailbox" or _setting(self.app, "task_always_eager"):
            return super().apply_async(args, kwargs, task_id=task_id, **options)
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        if KICK in kwargs:  # a retry or a re-send of a kick: send it as it is
            return super().apply_async(args, kwargs, task_id=task_id, **options)
        call = self._bind_arguments(args, kwargs)
        key = self._key_of(call)
        task_id = task_id or str(uuid.uuid4())
        dedup = opts.dedup
        msg_id = task_id if dedup == "task_id" else self._message_id(call)
        token = self._mailbox().store_sync(key, {"args": list(args), "kwargs": kwargs}, id=msg_id)
        kicked = {**kwargs, KICK: {"key": key, "token": token}}
        # send_task: Celery's argument check would refuse the kick's extra keyword; the
        # task's own execution options (queue, routing key, serializer) still apply.
        options = {**self._get_exec_options(), **options}
        return self.app.send_task(self.name, args=args, kwargs=kicked, task_id=task_id, **options)

    def _key_of(self, call: Mapping[str, Any]) -> str | int:
        options = self._inturn_options
        assert options is not None
        key = call.get(options.key)
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise ConfigurationError(
                f"task {self.name!r}: the key argument {options.key!r} must be a str or "
                f"an int, not {type(key).__name__}"
            )
        return key

    def _bind_arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        call = dict(zip(self._inturn_params, args, strict=False))
        call.update(kwargs)
        return call

    def _message_id(self, call: Mapping[str, Any]) -> str | None:
        dedup = self._inturn_options.dedup if self._inturn_options else None
        if dedup is None:
            return None
        if dedup == "task_id":
            task_id = self.request.id
            return None if task_id is None else str(task_id)
        value = call.get(dedup)
        return None if value is None else str(value)

    def _body(
        self,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        fence: int,
        messages: list[Message] | None = None,
    ) -> Any:
        """Run the task's own body (its ``run``), an ``async def`` on this thread's loop."""
        extra: dict[str, Any] = {}
        if "fence" in self._inturn_params and "fence" not in kwargs:
            bound = self._bind_arguments(args, kwargs)
            if "fence" not in bound:
                extra["fence"] = fence
        if messages is not None and "inturn_messages" in self._inturn_params:
            extra["inturn_messages"] = messages
        result = self.run(*args, **kwargs, **extra)
        if inspect.iscoroutine(result):
            result = _run_coroutine(result)
        return result

    # -- turn mode -------------------------------------------------------------------

    def _run_in_turn(
        self, key: str | int, msg_id: str | None, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> Any:
        options = self._inturn_options
        assert options is not None
        gate = _state(self.app).gate
        try:
            request = (
                gate.turn_sync(key, timeout=options.wait)
                if options.wait > 0
                else gate.turn_nowait_sync(key)
            )
            with request as turn:
                if msg_id is None:
                    return self._body(args, kwargs, turn.fence)
                with gate.dedup(self.name).claim_sync(key, msg_id, fence=turn.fence):
                    return self._body(args, kwargs, turn.fence)
        except inturn.Duplicate as dup:
            if dup.state == "done":
                logger.info(
                    "inturn: task %s skipped message %r of key %r: done", self.name, msg_id, key
                )
                return dup.result
            busy: Exception = dup
        except inturn.Busy as exc:  # TurnTimeout: the key stayed busy past `wait`
            if options.on_busy == "skip":
                logger.info(
                    "inturn: task %s skipped: key %r stayed busy for %ss",
                    self.name,
                    key,
                    options.wait,
                )
                return None
            busy = exc
        countdown = options.countdown * (1 + random.random())  # spread the retries out
        raise self.retry(countdown=countdown, max_retries=options.busy_retries, exc=busy)

    # -- mailbox mode ----------------------------------------------------------------

    def _mailbox(self) -> Mailbox:
        state = _state(self.app)
        box = state.mailboxes.get(self.name)
        if box is not None:
            return box
        with state.lock:
            box = state.mailboxes.get(self.name)
            if box is None:
                box = state.mailboxes[self.name] = self._make_mailbox(state.gate)
            return box

    def _make_mailbox(self, gate: Gate) -> Mailbox:
        options = self._inturn_options
        assert options is not None

        def handle(msg: Message | list[Message]) -> None:
            if isinstance(msg, list):
                last = msg[-1]
                self._body(last.payload["args"], last.payload["kwargs"], last.fence, msg)
            else:
                self._body(msg.payload["args"], msg.payload["kwargs"], msg.fence, [msg])

        handle.__name__ = f"celery:{self.name}"
        interval = _setting(self.app, "inturn_sweep_interval", 5.0)
        return gate.mailbox(
            options.mailbox or self.name,
            handler=handle,
            batch=options.batch,
            max_batch=options.max_batch,
            max_pending=options.max_pending,
            overflow=options.overflow,
            drain="inline",
            debounce=options.debounce,
            debounce_max=options.debounce_max,
            max_attempts=options.max_attempts,
            backoff=options.backoff,
            sweep_interval=float(interval) if interval else None,
        )


# -- the app side: sweeper, signals, checks --------------------------------------------

_installed: weakref.WeakSet[Any] = weakref.WeakSet()


def _serialized_mailbox_tasks(app: Any) -> list[SerializedTask]:
    return [
        task
        for task in app.tasks.values()
        if isinstance(task, SerializedTask)
        and task._inturn_options is not None
        and task._inturn_options.mode == "mailbox"
    ]


def _install(app: Any) -> None:
    """Register ``inturn.sweep`` on ``app`` and connect the worker signals (once)."""
    if app in _installed:
        return
    _installed.add(app)

    @app.task(name=SWEEP_TASK, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def sweep() -> int:
        """Resume the mailboxes of this app's serialized tasks whose drainer died.

        Resumed queues are drained in this task, one key after another.
        """
        resumed = 0
        for task in _serialized_mailbox_tasks(app):
            resumed += task._mailbox().sweep_sync(inline=True)
        return resumed

    def after_setup(sender: object = None, instance: Any = None, **_: object) -> None:
        if instance is not None and getattr(instance, "app", None) is app:
            for warning in check_configuration(app):
                logger.warning("inturn: %s", warning)

    def ready(sender: Any = None, **_: object) -> None:
        if id(getattr(sender, "app", None)) != id(app) or not _serialized_mailbox_tasks(app):
            return
        # To a queue this worker consumes (a shard worker may consume no default queue).
        queues = getattr(getattr(sender, "task_consumer", None), "queues", None) or []
        options = {"queue": queues[0].name} if queues else {}
        try:
            app.send_task(SWEEP_TASK, **options)
        except Exception:
            logger.exception("inturn: could not send the sweep at worker start")

    signals.celeryd_after_setup.connect(after_setup, weak=False)
    signals.worker_ready.connect(ready, weak=False)
    signals.worker_process_init.connect(_reset_after_fork, weak=False)


def check_configuration(app: Any) -> list[str]:
    """What in ``app``'s configuration weakens the serialized tasks' guarantees: one
    sentence per unsafe setting (empty when it is all safe). Logged as WARNINGs when a
    worker starts."""
    conf = app.conf
    warnings: list[str] = []
    tasks = [t for t in app.tasks.values() if isinstance(t, SerializedTask)]
    if not tasks:
        return warnings
    early = sorted(t.name for t in tasks if not t.acks_late)
    if early:
        warnings.append(
            f"task_acks_late is off for {', '.join(early)}: a worker killed mid-task loses "
            "the message; set task_acks_late=True"
        )
    if not conf.get("task_reject_on_worker_lost"):
        warnings.append(
            "task_reject_on_worker_lost is off: a task whose worker process dies is acked "
            "instead of delivered again; set task_reject_on_worker_lost=True"
        )
    prefetch = conf.get("worker_prefetch_multiplier")
    if prefetch != 1:
        warnings.append(
            f"worker_prefetch_multiplier is {prefetch}: a worker holds messages it cannot "
            "start, and one busy slot delays them; set worker_prefetch_multiplier=1"
        )
    lease = float(_setting(app, "inturn_lease", 30.0))
    options = conf.get("broker_transport_options") or {}
    visibility = options.get("visibility_timeout")
    broker = str(conf.get("broker_url") or "")
    if visibility is None and broker.startswith(("redis", "rediss", "sqs")):
        visibility = 3600.0
    if visibility is not None:
        longest = max([lease, *(float(t.time_limit or 0) for t in tasks)])
        if float(visibility) <= longest:
            warnings.append(
                f"the broker's visibility_timeout ({visibility} s) is not longer than the "
                f"inturn lease or a task's time limit ({longest} s): a message is delivered "
                "again while its first delivery still runs; raise visibility_timeout"
            )
    serializer = conf.get("task_serializer")
    accept = list(conf.get("accept_content") or [])
    if serializer != "json" or any(
        c in ("pickle", "application/x-python-serialize") for c in accept
    ):
        warnings.append(
            f"the app accepts {accept} with task_serializer={serializer!r}: serialized tasks "
            "need JSON; set task_serializer='json' and accept_content=['json']"
        )
    return warnings
