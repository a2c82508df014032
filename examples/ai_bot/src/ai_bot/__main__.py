"""``python -m ai_bot [run|webhook|migrate|proactive]``: see ``--help``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from .config import Settings, SettingsError

USAGE = """\
environment:
  BOT_TOKEN          the bot's token from @BotFather (required)
  LLM_BASE_URL       an OpenAI-compatible API, e.g. https://api.openai.com/v1 (required)
  LLM_API_KEY        its key (required)
  LLM_MODEL          the model's name (required)
  TELEGRAM_API_URL   a local Bot API server (default: Telegram's)
  INTURN_URL         where turns and mailboxes live (default memory://; redis://... to
                     run several processes)
  DATABASE_URL       the conversations (default sqlite:///ai_bot.sqlite3;
                     postgresql://... in deployment)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ai_bot",
        description="A Telegram AI companion bot whose replies to each user run in turn.",
        epilog=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="long polling (the default)")
    sub.add_parser("webhook", help="serve a webhook (WEBHOOK_URL, WEBHOOK_PORT, WEBHOOK_SECRET)")
    sub.add_parser("migrate", help="create the database tables")
    pro = sub.add_parser("proactive", help="run one proactive tick now, or send one message")
    pro.add_argument("--user", type=int, help="send one proactive message to this user now")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiogram.event").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        for line in exc.problems:
            print(f"ai_bot: {line}", file=sys.stderr)
        print("ai_bot: see `python -m ai_bot --help` for the settings", file=sys.stderr)
        return 2
    command = args.command or "run"
    if command == "run":
        from .bot import run_polling

        asyncio.run(run_polling(settings))
    elif command == "webhook":
        from .bot import run_webhook

        asyncio.run(run_webhook(settings))
    elif command == "migrate":
        from .storage import Store

        async def migrate() -> None:
            store = await Store.open(settings.database_url)
            await store.aclose()

        asyncio.run(migrate())
        print("ai_bot: the database is up to date")
    elif command == "proactive":
        from .proactive_messaging import run_tick, send_one

        if args.user is not None:
            outcome = asyncio.run(send_one(settings, args.user))
            print(f"user {args.user}: {outcome}")
        else:
            print(asyncio.run(run_tick(settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
