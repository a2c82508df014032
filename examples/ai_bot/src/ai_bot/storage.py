"""The conversation store: SQLAlchemy 2 async, SQLite by default, PostgreSQL in deployment.

A turn's write is *fenced*. Each conversation row keeps the highest fence that wrote it
(and where that fence came from). A write carrying a lower fence from the same source is
a stale holder's (its turn was lost and given to someone else): it is refused and logged.
The check and the update are one conditional ``UPDATE``, atomic on both databases.

A memory:// gate counts fences from 1 in every process, so fences are compared only
within one source: the Redis or PostgreSQL gate's URL, or one memory:// process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    event,
    func,
    insert,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Conversation", "Incoming", "StaleFence", "Store", "Turn"]

logger = logging.getLogger("ai_bot.storage")


class Base(DeclarativeBase):
    pass


class Conversation(Base):
    """One row per user: the fence floor and activity times."""

    __tablename__ = "conversations"

    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    chat_id: Mapped[int] = mapped_column(BigInteger)
    fence: Mapped[int] = mapped_column(BigInteger, default=0)
    fence_source: Mapped[str] = mapped_column(String(200), default="")
    last_user_at: Mapped[float] = mapped_column(Float, default=0.0)
    last_bot_at: Mapped[float] = mapped_column(Float, default=0.0)
    last_proactive_at: Mapped[float] = mapped_column(Float, default=0.0)


class ChatMessage(Base):
    """One line of a conversation: a user's message (with its Telegram id) or a reply."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("user_id", "tg_message_id", name="uq_messages_user_tg"),
        Index("ix_messages_user_id_id", "user_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("conversations.user_id"))
    role: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    tg_message_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    fence: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)


class StaleFence(Exception):
    """A write whose fence is lower than the one the conversation already holds."""

    def __init__(self, user_id: int, fence: int, stored: int) -> None:
        super().__init__(f"user {user_id}: fence {fence} is older than the stored fence {stored}")
        self.user_id = user_id
        self.fence = fence
        self.stored = stored


@dataclass(frozen=True, slots=True)
class Incoming:
    """A user's message, as the turn answers it."""

    message_id: int
    text: str
    at: float


@dataclass(frozen=True, slots=True)
class Turn:
    """What one reply writes: the user's messages it answered and the reply's text."""

    user_id: int
    chat_id: int
    fence: int
    fence_source: str
    incoming: Sequence[Incoming]
    reply: str
    proactive: bool = False


class Store:
    """The bot's database. ``await Store.open(url)``; ``await store.aclose()``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._upserts: dict[tuple[str, ...], Any] = {}

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True) -> Store:
        kwargs: dict[str, object] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        engine = create_async_engine(url, **kwargs)
        if url.startswith("sqlite"):

            @event.listens_for(engine.sync_engine, "connect")
            def _pragmas(conn: Any, _record: Any) -> None:
                cursor = conn.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across app crashes
                cursor.close()

        store = cls(engine)
        if migrate:
            await store.migrate()
        return store

    async def migrate(self) -> None:
        """Create the tables that are missing (idempotent)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)

    async def aclose(self) -> None:
        await self.engine.dispose()

    # -- reading ------------------------------------------------------------------------

    async def history(self, user_id: int, limit: int) -> list[tuple[str, str]]:
        """The last ``limit`` lines of the conversation, oldest first, as (role, text)."""
        query = (
            select(ChatMessage.role, ChatMessage.text)
            .where(ChatMessage.user_id == user_id)
            .order_by(ChatMessage.id.desc())
            .limit(limit)
        )
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
        return [(role, text) for role, text in reversed(rows)]

    async def load(
        self, user_id: int, message_ids: Iterable[int], limit: int
    ) -> tuple[set[int], tuple[int, str] | None, list[tuple[str, str]]]:
        """What a reply needs, in one connection: which of ``message_ids`` were answered,
        the conversation's fence and source, and its last ``limit`` lines."""
        ids = list(message_ids)
        async with self._sessions() as session:
            done: set[int] = set()
            if ids:
                query = select(ChatMessage.tg_message_id).where(
                    ChatMessage.user_id == user_id, ChatMessage.tg_message_id.in_(ids)
                )
                done = {int(i) for i in (await session.scalars(query)).all() if i is not None}
            row = (
                await session.execute(
                    select(Conversation.fence, Conversation.fence_source).where(
                        Conversation.user_id == user_id
                    )
                )
            ).first()
            lines = (
                await session.execute(
                    select(ChatMessage.role, ChatMessage.text)
                    .where(ChatMessage.user_id == user_id)
                    .order_by(ChatMessage.id.desc())
                    .limit(limit)
                )
            ).all()
        fence = None if row is None else (int(row[0]), str(row[1]))
        return done, fence, [(role, text) for role, text in reversed(lines)]

    async def answered(self, user_id: int, message_ids: Iterable[int]) -> set[int]:
        """Which of ``message_ids`` were answered already (their turn was recorded)."""
        ids = list(message_ids)
        if not ids:
            return set()
        query = select(ChatMessage.tg_message_id).where(
            ChatMessage.user_id == user_id, ChatMessage.tg_message_id.in_(ids)
        )
        async with self._sessions() as session:
            return {int(i) for i in (await session.scalars(query)).all() if i is not None}

    async def chat_of(self, user_id: int) -> int | None:
        """The chat the user's conversation is in (None: no conversation yet)."""
        async with self._sessions() as session:
            row = await session.get(Conversation, user_id)
            return None if row is None else int(row.chat_id)

    async def fence_of(self, user_id: int) -> tuple[int, str] | None:
        async with self._sessions() as session:
            row = await session.get(Conversation, user_id)
            return None if row is None else (row.fence, row.fence_source)

    async def idle_users(self, idle_seconds: float, *, now: float | None = None) -> list[int]:
        """Users quiet for ``idle_seconds`` who wrote since their last proactive message."""
        cutoff = (time.time() if now is None else now) - idle_seconds
        query = select(Conversation.user_id).where(
            Conversation.last_user_at > 0,
            Conversation.last_user_at < cutoff,
            Conversation.last_bot_at < cutoff,
            Conversation.last_user_at > Conversation.last_proactive_at,
        )
        async with self._sessions() as session:
            return [int(u) for u in (await session.scalars(query)).all()]

    async def count_messages(self, user_id: int | None = None) -> int:
        query = select(func.count(ChatMessage.id))
        if user_id is not None:
            query = query.where(ChatMessage.user_id == user_id)
        async with self._sessions() as session:
            return int((await session.scalar(query)) or 0)

    # -- writing ------------------------------------------------------------------------

    async def check_fence(
        self, user_id: int, fence: int, source: str, stored: tuple[int, str] | None = None
    ) -> None:
        """Raise :class:`StaleFence` now if a write with ``fence`` would be refused
        (against ``stored``, the conversation's fence and source, when given)."""
        if stored is None:
            stored = await self.fence_of(user_id)
        if stored is not None and stored[1] == source and fence < stored[0]:
            self._refused(user_id, fence, stored[0])

    async def record(self, turn: Turn) -> None:
        """Store a turn's messages and reply, fenced: raise :class:`StaleFence` (and log it)
        when the conversation already holds a higher fence from the same source."""
        now = time.time()
        values: dict[str, Any] = {"fence": turn.fence, "fence_source": turn.fence_source}
        if turn.incoming:
            values["last_user_at"] = max(m.at for m in turn.incoming)
        if turn.proactive:
            values["last_proactive_at"] = now
        values["last_bot_at"] = now
        params = {
            "user_id": turn.user_id,
            "chat_id": turn.chat_id,
            "last_user_at": 0.0,
            "last_proactive_at": 0.0,
            **values,
        }
        async with self._sessions() as session, session.begin():
            result = await session.execute(self._fenced_upsert(tuple(values)), params)
            if getattr(result, "rowcount", 1) == 0:
                stored = await session.scalar(
                    select(Conversation.fence).where(Conversation.user_id == turn.user_id)
                )
                self._refused(turn.user_id, turn.fence, int(stored or 0))
            rows = [
                {
                    "user_id": turn.user_id,
                    "role": "user",
                    "text": m.text,
                    "tg_message_id": m.message_id,
                    "fence": turn.fence,
                    "created_at": m.at,
                }
                for m in turn.incoming
            ]
            rows.append(
                {
                    "user_id": turn.user_id,
                    "role": "assistant",
                    "text": turn.reply,
                    "tg_message_id": None,
                    "fence": turn.fence,
                    "created_at": now,
                }
            )
            await session.execute(insert(cast(Table, ChatMessage.__table__)), rows)

    def _fenced_upsert(self, updated: tuple[str, ...]) -> Any:
        """One statement: make the conversation row, or update ``updated`` columns only
        if the stored fence is not higher (from the same source). Built once per set of
        columns, with bind parameters, so a reply does not rebuild it."""
        stmt = self._upserts.get(updated)
        if stmt is None:
            insert_: Any = pg_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
            columns = ("user_id", "chat_id", "last_user_at", "last_proactive_at", *updated)
            base = insert_(Conversation.__table__).values(
                {name: bindparam(name) for name in dict.fromkeys(columns)}
            )
            stmt = base.on_conflict_do_update(
                index_elements=["user_id"],
                set_={name: getattr(base.excluded, name) for name in updated},
                where=or_(
                    Conversation.fence_source != base.excluded.fence_source,
                    Conversation.fence <= base.excluded.fence,
                ),
            )
            self._upserts[updated] = stmt
        return stmt

    @staticmethod
    def _refused(user_id: int, fence: int, stored: int) -> None:
        logger.warning(
            "refused a stale write for user %s: fence %s is older than the stored fence %s "
            "(another reply holds this user's turn now)",
            user_id,
            fence,
            stored,
        )
        raise StaleFence(user_id, fence, stored)
