"""How redis-py's errors reach the caller: as :class:`~inturn.BackendUnavailable` naming
the cause, ``transient`` or not (a refused login or an unknown host name is not)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import redis
import redis.exceptions

from inturn._errors import BackendUnavailable

__all__ = ["ClientClosed", "map_errors", "unavailable", "unknown_host"]

_TRANSPORT_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    # A Cluster that lost a slot's master, or is moving a slot: the same as a dropped
    # connection to the caller (try again later), not a bug in the command.
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    OSError,
)


class ClientClosed(redis.exceptions.ConnectionError):
    """A call on connections closed with the backend. It is not sent again, nor handed to
    redis-py's own client (that would connect anew, and nobody would close it)."""

    def __init__(self) -> None:
        super().__init__("inturn: the client was closed")


def unavailable(exc: BaseException, what: str) -> BackendUnavailable:
    """The caller's error for a failed call: its real cause in the text, and whether
    waiting may cure it.

    A refused login (a wrong or missing password, an unknown ACL user) and a host
    name that does not resolve are mistakes in the URL: waiting does not cure them,
    so they are not ``transient`` and nobody rides them out.
    """
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return BackendUnavailable(
            f"Redis refused the login ({what}): {_auth_code(exc)}{exc} "
            "(check the user name and password in the URL)",
            transient=False,
        )
    if unknown_host(exc):
        return BackendUnavailable(f"Redis host not found ({what}): {exc}", transient=False)
    note = ""
    if "refused" not in str(exc).lower() and _in_chain(exc, ConnectionRefusedError):
        note = " (Connection refused)"  # asyncio says only "Connect call failed"
    return BackendUnavailable(f"Redis did not answer ({what}): {exc}{note}")


def _in_chain(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _auth_code(exc: BaseException) -> str:
    """The error code redis-py strips from a refused login, put back for the reader."""
    message = str(exc)
    if "username-password" in message:
        return "WRONGPASS "
    if "authenticated" in message or "Authentication required" in message:
        return "NOAUTH "
    return ""


def unknown_host(exc: BaseException) -> bool:
    """The connect failed because the host name does not exist (not a passing DNS outage)."""
    seen: BaseException | None = exc
    for _ in range(4):  # redis-py wraps the resolver's error once or twice
        if seen is None:
            return False
        if isinstance(seen, socket.gaierror):
            return seen.errno in _NO_SUCH_NAME
        seen = seen.__cause__ or seen.__context__
    return False


_NO_SUCH_NAME = {
    code
    for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None))
    if code is not None
}
"""The resolver's "no such name" answers (EAI_AGAIN, a resolver that is down, passes)."""


def _is_oom(exc: redis.exceptions.ResponseError) -> bool:
    # redis-py parses "-OOM ..." into OutOfMemoryError and drops the code from the text.
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or str(exc).startswith("OOM")


@contextlib.contextmanager
def map_errors(what: str) -> Iterator[None]:
    """Raise redis-py's transport errors as :class:`BackendUnavailable`, chained.

    A dropped or timed-out connection, a Cluster that is down or moving a slot,
    and a server out of memory (``noeviction`` at ``maxmemory``) all mean "not
    now" to the caller; a refused login or command (``WRONGPASS``, ``NOPERM``) a
    setup to fix; any other error reply is a bug and passes unchanged.
    A plain ``with`` works around an ``await`` too.
    """
    try:
        yield
    except BackendUnavailable:  # said already (a ConnectionError too): unchanged
        raise
    except ClientClosed as exc:
        raise BackendUnavailable(f"the Redis backend was closed ({what})", transient=False) from exc
    except _TRANSPORT_ERRORS as exc:
        raise unavailable(exc, what) from exc
    except redis.exceptions.ResponseError as exc:
        if _is_oom(exc):
            raise BackendUnavailable(
                f"Redis is out of memory ({what}): {exc}", transient=False
            ) from exc
        if isinstance(exc, redis.exceptions.NoPermissionError):
            raise BackendUnavailable(
                f"Redis refused the command ({what}): NOPERM {exc} "
                "(the ACL user is not allowed this command or these keys)",
                transient=False,
            ) from exc
        raise
