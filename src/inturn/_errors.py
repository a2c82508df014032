"""The exception hierarchy: one root, names that state the condition."""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "Busy",
    "ConfigurationError",
    "InturnError",
    "InvalidKey",
    "LeaseLost",
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
    """The backend's server could not be reached in time."""
