"""Shared setup for the Telegram integrations' tests."""

from __future__ import annotations

import os

# python-telegram-bot 22 warns on every RetryAfter unless durations are opted in to timedelta
# (its next major's behaviour); the suite turns warnings into errors.
os.environ.setdefault("PTB_TIMEDELTA", "1")

from tests.contrib._gates import backend_url, gate  # noqa: F401  (fixtures)
