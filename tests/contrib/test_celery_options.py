"""Celery tasks run in process (eager): the ``on_busy`` option, and ``.apply()`` runs in turn."""

from __future__ import annotations

import threading

import pytest

import inturn

celery = pytest.importorskip("celery")

from inturn.contrib.celery import SerializedTask  # noqa: E402


@pytest.fixture
def app() -> object:
    app = celery.Celery("options", broker="memory://")
    app.conf.update(inturn_url="memory://", inturn_namespace="options", task_always_eager=True)
    return app


def _held_elsewhere(key: int) -> tuple[threading.Event, threading.Thread]:
    """Hold ``key``'s turn in another thread until the returned event is set."""
    gate = inturn.Gate.from_url("memory://", namespace="options")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with gate.turn_sync(key):
            held.set()
            release.wait(30)
        gate.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(10)
    return release, thread


def test_skip_returns_none_while_the_key_is_busy_and_runs_when_free(app: object) -> None:
    ran: list[int] = []

    @app.task(  # type: ignore[attr-defined, untyped-decorator, misc]
        base=SerializedTask,
        inturn={"key": "user_id", "mode": "turn", "on_busy": "skip", "wait": 0, "dedup": None},
    )
    def ping(user_id: int, fence: int = 0) -> str:
        ran.append(fence)
        return "sent"

    release, thread = _held_elsewhere(7)
    try:
        assert ping.apply(kwargs={"user_id": 7}).get() is None
        assert ping.apply(kwargs={"user_id": 8}).get() == "sent"  # another user: free
    finally:
        release.set()
        thread.join(10)
    assert ping.apply(kwargs={"user_id": 7}).get() == "sent"
    assert len(ran) == 2
    assert all(f > 0 for f in ran)  # each ran in a turn (a fence)


def test_a_waiting_skip_waits_up_to_wait_seconds(app: object) -> None:
    @app.task(  # type: ignore[attr-defined, untyped-decorator, misc]
        base=SerializedTask,
        inturn={"key": "user_id", "mode": "turn", "on_busy": "skip", "wait": 5.0, "dedup": None},
    )
    def ping(user_id: int) -> str:
        return "sent"

    release, thread = _held_elsewhere(9)
    threading.Timer(0.3, release.set).start()  # freed while the task waits
    try:
        assert ping.apply(kwargs={"user_id": 9}).get() == "sent"
    finally:
        release.set()
        thread.join(10)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"key": "user_id", "mode": "turn", "on_busy": "later"}, "'retry' or 'skip'"),
        ({"key": "user_id", "on_busy": "skip"}, "needs mode 'turn'"),
    ],
)
def test_bad_on_busy_is_refused_when_the_task_is_made(
    app: object, options: dict[str, object], says: str
) -> None:
    @app.task(base=SerializedTask, inturn=options)  # type: ignore[attr-defined, untyped-decorator, misc]
    def ping(user_id: int) -> None:
        return None

    with pytest.raises(inturn.ConfigurationError, match=says):
        ping.apply(kwargs={"user_id": 1})  # Celery binds a task when it is first used
