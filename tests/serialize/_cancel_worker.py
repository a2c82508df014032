"""`python -m tests.serialize._cancel_worker URL NAMESPACE`: a long call a newer one cancels."""

from __future__ import annotations

import asyncio
import sys

import inturn


async def main(url: str, namespace: str) -> None:
    gate = inturn.Gate.from_url(url, namespace=namespace)

    @gate.serialize(key="user", on_busy="cancel", name="answer")
    async def answer(user: int) -> str:
        print("running", flush=True)
        await asyncio.sleep(30)
        return "finished"

    try:
        print(await answer(1), flush=True)
    except inturn.Superseded:
        print("superseded", flush=True)
    await gate.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
