"""What every scenario checks about one user's conversation, from the fakes' records."""

from __future__ import annotations

from ai_bot.responder import APOLOGY
from tests.fakes.llm import FakeLLM, answered_texts
from tests.fakes.telegram import FakeTelegram


def replies_to(tg: FakeTelegram, user: int) -> list[str]:
    return [c.text or "" for c in list(tg.sent) if c.chat_id == user and c.text != APOLOGY]


def answered(tg: FakeTelegram, user: int) -> list[str]:
    """The user's messages the replies answered, reply after reply."""
    out: list[str] = []
    for reply in replies_to(tg, user):
        out += answered_texts(reply)
    return out


def all_answered(tg: FakeTelegram, user: int, texts: list[str]) -> bool:
    return sorted(answered(tg, user)) == sorted(texts)


def check_user(
    tg: FakeTelegram, llm: FakeLLM, user: int, texts: list[str], sent_at: dict[str, float]
) -> None:
    """One user's messages: each answered once, in order; the model's calls for the user
    never overlap; no prompt holds a message sent after its call began."""
    assert llm.overlaps(user) == [], "two model calls for one user overlapped"
    assert answered(tg, user) == texts, "each message answered once, in order"
    for request in llm.for_user(user):
        for text in request.answering:
            assert text in sent_at, f"answered an unknown message {text!r}"
            assert sent_at[text] < request.start, f"{text!r} arrived after its turn began"
    # the replies came one after another: each after the model call that made it
    successful = [r for r in llm.for_user(user) if r.status == 200]
    assert len(successful) == len(replies_to(tg, user))
