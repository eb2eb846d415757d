"""Event-loop lag while the local embedding model embeds a batch.

    .venv/bin/python benchmarks/bench_embedding_lag.py [--texts 256]

A ticker sleeps 5 ms at a time on the event loop while ``FastEmbedder.embed``
embeds ``--texts`` sentences (batches of 16 in a worker thread); reported:
the worst and median extra delay of the ticker, against the same ticker with
the batch embedded on the loop (``embed_sync``, what ``to_thread`` avoids).
Absolute times depend on the machine (a busy one adds its own lag); the side
by side is the point. The test suite proves the same property structurally
(tests/test_embeddings.py), without a stopwatch.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from persistence.vectors.embeddings import FastEmbedder


async def lag_while(work: Callable[[], Awaitable[object]]) -> list[float]:
    """The ticker's extra delays (seconds) while ``work`` runs."""
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - before - 0.005)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)  # the ticker is running
    await work()
    stop.set()
    await task
    return lags


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        embedder = await FastEmbedder.load(Path(tmp), threads=2)
        texts = [f"Sentence {i}: the user mentioned their favourite hobby is number {i}"
                 for i in range(count)]
        await embedder.embed(texts[:16])  # warm up

        async def on_loop() -> None:
            embedder.embed_sync(texts)

        rows = [("embed (worker thread, per batch)", await lag_while(
            lambda: embedder.embed(texts))),
            ("embed_sync on the loop (for comparison)", await lag_while(on_loop))]
        print(f"event-loop lag while embedding {count} sentences")
        for name, lags in rows:
            print(f"  {name:42s} worst {max(lags) * 1000:7.1f} ms  "
                  f"median {statistics.median(lags) * 1000:6.1f} ms  ({len(lags)} ticks)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=256)
    asyncio.run(main(parser.parse_args().texts))
