"""PostgreSQL reliability: first use in a fresh process, fences across crashes, role-level
timeouts, hostile keys, lost replies, restarts during a drain."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

_BURST = textwrap.dedent(
    """
    import asyncio, json, sys
    import inturn
    from inturn.testing import History, check_history

    async def one(dsn, namespace):
        gate = inturn.Gate.from_url(dsn, namespace=namespace)  # a fresh engine: first use
        order, history = [], History()

        async def call(i):
            async with gate.turn("user-1", timeout=10) as turn:
                with history.span(turn):
                    order.append(i)
                    await asyncio.sleep(0.001)

        await asyncio.gather(*(call(i) for i in range(5)))  # made in the order 0..4
        check_history(history.spans)
        await gate.aclose()
        return order

    dsn, namespace, engines = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps([asyncio.run(one(dsn, f"{namespace}{n}")) for n in range(engines)]))
    """
)


def test_a_burst_in_a_fresh_process_runs_in_the_order_it_was_made(postgres_dsn: str) -> None:
    """20 fresh engines (4 fresh processes, 5 engines each), 5 calls for one key at once:
    every engine runs them in the order they were made (before: out of order in 5 of 5)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BURST, postgres_dsn, f"p{p}e", "5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(4)
    ]
    orders = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        orders += json.loads(out)
    assert len(orders) == 20
    assert all(order == [0, 1, 2, 3, 4] for order in orders), orders
