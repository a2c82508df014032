"""Mailbox processes for the multi-process tests: `python -m tests.mailbox._worker MODE ...`.

`submit URL NS OUT INDEX USERS PER_USER`: submit PER_USER messages for each of USERS users,
interleaved, handle what this process drains, record each handler call to OUT.
`victim URL NS EFFECTS`: drain three messages of user "victim" with a 1 s debounce and kill
itself 0.3 s after the first handler returned (its message done, not yet acknowledged).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import inturn


async def submit(url: str, namespace: str, out: str, index: int, users: int, per_user: int) -> None:
    gate = inturn.Gate.from_url(url, namespace=namespace)
    records: list[dict[str, object]] = []

    async def handler(msg: inturn.Message) -> None:
        start = time.monotonic()
        await asyncio.sleep(0)
        records.append(
            {
                "key": msg.key,
                "fence": msg.fence,
                "start": start,
                "end": time.monotonic(),
                "payload": msg.payload,
                "pid": os.getpid(),
            }
        )

    box = gate.mailbox("mp", handler=handler)
    for n in range(per_user):
        for user in range(users):
            await box.submit(f"user{user}", {"p": index, "n": n}, id=f"{index}-{user}-{n}")
    await box.drained()
    await gate.aclose()
    with open(out, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


async def victim(url: str, namespace: str, effects: str) -> None:
    gate = inturn.Gate.from_url(url, namespace=namespace, lease=1.0)

    async def handler(msg: inturn.Message) -> None:
        with open(effects, "a", encoding="utf-8") as f:
            f.write(f"{msg.payload}\n")
        print(f"effect {msg.payload}", flush=True)
        asyncio.get_running_loop().call_later(0.3, os.kill, os.getpid(), signal.SIGKILL)

    box = gate.mailbox("kill", handler=handler, debounce=1.0)
    for n in range(3):
        await box.submit("victim", n, id=n)
    await asyncio.sleep(30)


if __name__ == "__main__":
    mode, url, namespace, *rest = sys.argv[1:]
    if mode == "submit":
        asyncio.run(submit(url, namespace, rest[0], int(rest[1]), int(rest[2]), int(rest[3])))
    else:
        asyncio.run(victim(url, namespace, rest[0]))
