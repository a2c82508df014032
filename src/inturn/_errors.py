"""The exception hierarchy: one root, names that state the condition."""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "Busy",
    "ConfigurationError",
    "Duplicate",
    "InturnError",
    "InvalidKey",
    "InvalidPayload",
    "LeaseLost",
    "MailboxFull",
    "Skipped",
    "Superseded",
    "TurnTimeout",
]


class InturnError(Exception):
    """Root of every error this library raises on purpose."""


class ConfigurationError(InturnError, ValueError):
    """A URL, option or missing extra makes the requested setup impossible."""


class InvalidKey(InturnError, ValueError):
    """A key is not a non-empty ``str`` or ``int`` of at most 1 KiB of UTF-8."""


class Busy(InturnError):
    """The key's turn is held or has a line, and the caller would not wait.

    ``key`` is the normalised key (a ``str``).
    """

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class TurnTimeout(Busy, TimeoutError):
    """The caller waited ``waited`` seconds in line for ``key`` and gave up.

    The caller has left the line when this is raised: nobody behind it is blocked.
    """

    def __init__(self, message: str, *, key: str, waited: float) -> None:
        super().__init__(message, key=key)
        self.waited = waited


class LeaseLost(InturnError):
    """The holder's lease ran out (it stalled, or ``max_hold`` passed) while the body ran.

    Raised only with ``on_lost="cancel"``; otherwise ``turn.lost`` is set and a
    WARNING is logged.
    """

    def __init__(self, message: str, *, key: str, fence: int, reason: str) -> None:
        super().__init__(message)
        self.key = key
        self.fence = fence
        self.reason = reason


class BackendUnavailable(InturnError, ConnectionError):
    """The backend's server could not be reached in time, or refused the work.

    ``transient`` is True for an outage that may pass (a refused or dropped connection,
    a failover, a timeout): a waiter that reached the server before rides it out until
    its deadline. False for a refusal that waiting does not cure (a wrong password, an
    unknown role, database or host name, a server out of memory), and for a server the
    backend never reached: it is raised at once. The message names the driver's cause
    (``connection refused``, ``WRONGPASS ...``, ``role "x" does not exist``).
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class Duplicate(InturnError):
    """A message id was already processed (``state="done"``) or is being processed
    (``state="in_progress"``) within its dedup window.

    ``result`` is the stored JSON result of the first run when ``has_result``.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str,
        id: str,
        state: str,
        result: object = None,
        has_result: bool = False,
    ) -> None:
        super().__init__(message)
        self.key = key
        self.id = id
        self.state = state
        self.result = result
        self.has_result = has_result


class Skipped(Busy):
    """``on_busy="skip"``: the key was busy (held, queued, or its mailbox draining)."""


class Superseded(InturnError):
    """A newer call for the same key took this call's place (``on_busy="latest"``/``"cancel"``)."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class MailboxFull(InturnError):
    """A key's mailbox queue holds ``max_pending`` messages (``overflow="reject"``)."""

    def __init__(self, message: str, *, key: str, mailbox: str) -> None:
        super().__init__(message)
        self.key = key
        self.mailbox = mailbox


class InvalidPayload(InturnError, ValueError):
    """A mailbox payload is not JSON or is larger than ``max_payload_bytes``."""
