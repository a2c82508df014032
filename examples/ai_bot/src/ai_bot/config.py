"""Settings from the environment, checked at start: one clear line per problem."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Settings", "SettingsError"]

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///ai_bot.sqlite3"
DEFAULT_SYSTEM_PROMPT = (
    "You are a warm, attentive companion in a Telegram chat. Answer the user's latest "
    "messages together, briefly and naturally."
)
DEFAULT_PROACTIVE_PROMPT = (
    "The user has been quiet for a while. Write one short, friendly message that picks up "
    "the conversation. Do not repeat an earlier answer."
)


class SettingsError(Exception):
    """The environment does not describe a runnable bot; ``problems`` has one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Settings:
    """What the bot needs to run. Build it with :meth:`from_env`."""

    bot_token: str
    llm_base_url: str
    llm_api_key: str
    llm_model: str
    telegram_api_url: str | None = None
    inturn_url: str = "memory://"
    inturn_namespace: str = "ai_bot"
    database_url: str = DEFAULT_DATABASE_URL
    lease: float = 30.0
    debounce: float = 0.0
    history_limit: int = 40
    llm_timeout: float = 60.0
    proactive_idle_minutes: float = 60.0
    proactive_every_seconds: float = 300.0
    celery_broker_url: str | None = None
    webhook_url: str | None = None
    webhook_host: str = "0.0.0.0"
    webhook_port: int = 8080
    webhook_secret: str | None = None
    shutdown_grace: float = 10.0
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    proactive_prompt: str = DEFAULT_PROACTIVE_PROMPT

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and check every setting; raise :class:`SettingsError` listing all problems."""
        env = os.environ if env is None else env
        problems: list[str] = []

        def text(name: str, default: str | None = None, *, required: bool = False) -> str:
            value = env.get(name, "").strip()
            if not value:
                if required:
                    problems.append(f"{name} is not set")
                return default or ""
            return value

        def url(name: str, schemes: tuple[str, ...], value: str) -> str:
            if value:
                scheme = urllib.parse.urlsplit(value).scheme.lower()
                if not any(scheme == s or scheme.startswith(s + "+") for s in schemes):
                    allowed = ", ".join(f"{s}://" for s in schemes)
                    problems.append(f"{name}={value!r} is not a URL starting with {allowed}")
            return value

        def number(name: str, default: float, *, low: float = 0.0) -> float:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                problems.append(f"{name}={raw!r} is not a number")
                return default
            if not value >= low:
                problems.append(f"{name}={raw!r} must be at least {low:g}")
                return default
            return value

        token = text("BOT_TOKEN", required=True)
        if token and ":" not in token:
            problems.append("BOT_TOKEN does not look like a bot token (expected '<id>:<secret>')")
        api_url = url("TELEGRAM_API_URL", ("http", "https"), text("TELEGRAM_API_URL"))
        llm_url = url("LLM_BASE_URL", ("http", "https"), text("LLM_BASE_URL", required=True))
        llm_key = text("LLM_API_KEY", required=True)
        model = text("LLM_MODEL", required=True)
        inturn_url = url(
            "INTURN_URL",
            ("memory", "redis", "rediss", "unix", "postgresql", "postgres"),
            text("INTURN_URL", "memory://"),
        )
        database_url = url(
            "DATABASE_URL", ("sqlite", "postgresql", "postgres"), text("DATABASE_URL")
        )
        webhook_url = url("WEBHOOK_URL", ("https", "http"), text("WEBHOOK_URL"))
        port = number("WEBHOOK_PORT", 8080, low=1)
        settings = cls(
            bot_token=token,
            llm_base_url=llm_url,
            llm_api_key=llm_key,
            llm_model=model,
            telegram_api_url=api_url or None,
            inturn_url=inturn_url or "memory://",
            inturn_namespace=text("INTURN_NAMESPACE", "ai_bot"),
            database_url=normalize_database_url(database_url or DEFAULT_DATABASE_URL),
            lease=number("INTURN_LEASE", 30.0, low=0.1),
            debounce=number("REPLY_DEBOUNCE", 0.0),
            history_limit=int(number("HISTORY_LIMIT", 40, low=1)),
            llm_timeout=number("LLM_TIMEOUT", 60.0, low=0.1),
            proactive_idle_minutes=number("PROACTIVE_IDLE_MINUTES", 60.0),
            proactive_every_seconds=number("PROACTIVE_EVERY_SECONDS", 300.0, low=1),
            celery_broker_url=text("CELERY_BROKER_URL") or None,
            webhook_url=webhook_url or None,
            webhook_host=text("WEBHOOK_HOST", "0.0.0.0"),
            webhook_port=int(port),
            webhook_secret=text("WEBHOOK_SECRET") or None,
            shutdown_grace=number("SHUTDOWN_GRACE", 10.0),
            system_prompt=text("SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT),
            proactive_prompt=text("PROACTIVE_PROMPT", DEFAULT_PROACTIVE_PROMPT),
        )
        if problems:
            raise SettingsError(problems)
        return settings

    @property
    def broker_url(self) -> str:
        """Celery's broker: CELERY_BROKER_URL, else the Redis of INTURN_URL, else in-memory."""
        if self.celery_broker_url:
            return self.celery_broker_url
        if self.inturn_url.startswith(("redis://", "rediss://")):
            return self.inturn_url
        return "memory://"


def normalize_database_url(url: str) -> str:
    """Pick the async driver SQLAlchemy needs: aiosqlite for SQLite, asyncpg for PostgreSQL."""
    scheme, sep, rest = url.partition("://")
    if scheme in ("sqlite",):
        return f"sqlite+aiosqlite{sep}{rest}"
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+asyncpg{sep}{rest}"
    return url
