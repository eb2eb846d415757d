"""What the memory policy adds to a reply, on top of the bare store search.

    python benchmarks/bench_recall_policy.py [--rows 10000] [--queries 200] [--shared-only]

Fills one bot's table with ``--rows`` memories (bench_memory's synthetic
facts, 60 users + general) and 1,000 shared facts, then times per question,
interleaved round-robin so machine load hits every variant alike:

1. ``store.search`` with the query vector given (the store alone);
2. ``store.search`` embedding the query (what any caller pays);
3. ``BotMemory.recall`` with own memories only (+ first-person rewrite, scope);
4. ``BotMemory.recall`` with own and shared memories (searched concurrently);
5. the same with the SQL recall log (the production wiring: one embedding,
   two searches, one upsert per reply).

Prints p50 / p95 in ms, process CPU ms per call (every thread: the model's,
LanceDB's) and each median as a ratio to (2). Real model, real
LanceDB and SQLite in a temp dir; nothing leaves the machine.

Then (alone with ``--shared-only``) ``SharedMemory.search`` with the vector
given, the recall cache's snapshot against LanceDB (``cache_mb=0``), two
stores on one table, interleaved: with the table empty, then with 1,000
shared facts, hybrid and vector only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import BOT, USERS, fill, sentences

from engine.background import Background
from engine.memory.policy import BotMemory, MemoryConfig
from engine.types import Fact, IncomingMessage
from persistence.sql.database import Database
from persistence.sql.recall_log import SqlRecallLog
from persistence.vectors.chain import LocalHeads
from persistence.vectors.embeddings import FastEmbedder
from persistence.vectors.memory import LanceMemoryStore
from persistence.vectors.shared import SharedMemory

QUESTIONS = ["What does {n} like to eat?", "Where does {n} live?", "What sport do I play?",
             "Which language am I learning?", "What is my dog called?"]


def p50_p95(ms: list[float]) -> tuple[float, float]:
    return statistics.median(ms), statistics.quantiles(ms, n=100)[94]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--shared-only", action="store_true",
                        help="only the shared search, snapshot against LanceDB")
    args = parser.parse_args()
    if args.shared_only:
        await shared_search(args.queries)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        embedder = await FastEmbedder.load(root, threads=2)
        await embedder.warm()  # the query model, loaded as a service's start does
        texts = sentences()
        base = np.array(await embedder.embed(texts), dtype=np.float32)
        uri = str(root / "lancedb")
        started = time.perf_counter()
        await fill(uri, texts, base, args.rows)
        print(f"filled {args.rows} memories in {time.perf_counter() - started:.1f} s")

        async with (
            Database(f"sqlite+aiosqlite:///{root / 'db.sqlite'}") as database,
            await LanceMemoryStore.open(uri, embedder) as store,
            await SharedMemory.open(uri, embedder) as shared,
            Background() as jobs,
        ):
            for i in range(1000):
                await shared.publish(Fact(id="", text=f"{texts[i % len(texts)]} (shared {i})",
                                          bot="other", user="" if i % 3 else "user1"), "public")
            await store.maintain(BOT)
            await shared.maintain()
            config = MemoryConfig(bot=BOT, top_k=5, min_score=0.3)
            own_only = BotMemory(config, store=store, embedder=embedder, jobs=jobs)
            both = BotMemory(config, store=store, embedder=embedder, jobs=jobs, shared=shared)
            full = BotMemory(config, store=store, embedder=embedder, jobs=jobs, shared=shared,
                             recall_log=SqlRecallLog(database))

            names = ["Ana", "Ben", "Chen", "Dora"]
            questions = [QUESTIONS[i % len(QUESTIONS)].format(n=names[i % len(names)])
                         for i in range(args.queries)]
            vectors = await embedder.embed(questions)
            timings: dict[str, list[float]] = {
                k: [] for k in ("vector", "search", "own", "both", "full")}
            cpu = dict.fromkeys(timings, 0.0)
            for i, (q, v) in enumerate(zip(questions, vectors, strict=True)):
                users = [f"user{i % USERS}", ""]
                message = IncomingMessage(platform="terminal", bot=BOT, chat=f"c{i % 20}",
                                          user=f"user{i % USERS}", user_name=names[i % 4],
                                          text=q, message_id=str(i))
                variants: dict[str, Callable[[], Awaitable[object]]] = {
                    "vector": partial(store.search, BOT, q, users=users, limit=5, vector=v),
                    "search": partial(store.search, BOT, q, users=users, limit=5),
                    "own": partial(own_only.recall, message),
                    "both": partial(both.recall, message),
                    "full": partial(full.recall, message),
                }
                order = list(variants)
                order = order[i % 5:] + order[:i % 5]  # rotate who goes first
                for name in order:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    await variants[name]()
                    timings[name].append((time.perf_counter() - start) * 1000)
                    cpu[name] += time.process_time() - start_cpu

    reference = statistics.median(timings["search"])
    labels = {
        "vector": "store.search, vector given",
        "search": "store.search, embeds the query",
        "own": "BotMemory.recall, own memories",
        "both": "BotMemory.recall, own + shared",
        "full": "BotMemory.recall, own + shared + recall log",
    }
    print(f"{'':<52} {'p50 ms':>8} {'p95 ms':>8} {'cpu ms':>8} {'x search':>9}")
    for name, label in labels.items():
        p50, p95 = p50_p95(timings[name])
        print(f"{label:<52} {p50:>8.1f} {p95:>8.1f} {cpu[name] * 1000 / args.queries:>8.2f} "
              f"{p50 / reference:>9.2f}")
    await shared_search(args.queries)
    return 0


async def shared_search(queries: int) -> None:
    """``SharedMemory.search`` (vector given): the snapshot against LanceDB, 0 and 1,000 facts."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        embedder = await FastEmbedder.load(root, threads=2)
        texts, uri = sentences(), str(root / "lancedb")
        questions = [QUESTIONS[i % len(QUESTIONS)].format(n=["Ana", "Ben", "Chen", "Dora"][i % 4])
                     for i in range(queries)]
        vectors = await embedder.embed(questions)
        heads = LocalHeads()  # one chain head for both, as the app's SQL store would be
        async with (await SharedMemory.open(uri, embedder, maintain_delay_s=600,
                                            heads=heads) as fast,
                    await SharedMemory.open(uri, embedder, maintain_delay_s=600, heads=heads,
                                            cache_mb=0) as plain):
            print(f"\n{'SharedMemory.search, vector given':<52} {'p50 ms':>8} {'p95 ms':>8} "
                  f"{'cpu ms':>8}")
            assert await fast.warm()
            await _time_shared({"0 facts, LanceDB": plain, "0 facts, snapshot": fast},
                               questions, vectors)
            for i in range(1000):  # as in main(): 2 of 3 general, 1 of 3 about user1
                await fast.publish(Fact(id="", text=f"{texts[i % len(texts)]} (shared {i})",
                                        bot="other", user="" if i % 3 else "user1"), "public")
            await plain.maintain()
            await fast.maintain()
            assert await fast.warm()
            await _time_shared({"1,000 facts (1,000 versions kept), LanceDB, hybrid": plain,
                                "1,000 facts (1,000 versions kept), snapshot, hybrid": fast},
                               questions, vectors)
            # What maintenance leaves a minute after the writes: the old versions gone (each
            # search's version check reads the table's version list).
            with warnings.catch_warnings():  # (nothing else reads the table meanwhile)
                warnings.simplefilter("ignore")
                await fast._raw.optimize(cleanup_older_than=timedelta(0))
            assert await fast.warm()
            await _time_shared({"1,000 facts, LanceDB, hybrid": plain,
                                "1,000 facts, snapshot, hybrid": fast}, questions, vectors)
            fast._maintainer.fts = plain._maintainer.fts = False
            await _time_shared({"1,000 facts, LanceDB, vector only": plain,
                                "1,000 facts, snapshot, vector only": fast}, questions, vectors)
            assert await fast.cache.current("shared_memories", fast._raw) is not None


async def _time_shared(stores: dict[str, SharedMemory], questions: list[str],
                       vectors: list[list[float]]) -> None:
    timings: dict[str, list[float]] = {k: [] for k in stores}
    cpu = dict.fromkeys(stores, 0.0)
    for i, (q, v) in enumerate(zip(questions, vectors, strict=True)):
        order = list(stores) if i % 2 else list(reversed(stores))  # alternate who goes first
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            await stores[name].search("bot", [], q, users=[f"user{i % USERS}", ""], limit=5,
                                      min_score=0.3, vector=v)
            timings[name].append((time.perf_counter() - start) * 1000)
            cpu[name] += time.process_time() - start_cpu
    for name, ms in timings.items():
        p50, p95 = p50_p95(ms)
        print(f"{name:<52} {p50:>8.2f} {p95:>8.2f} {cpu[name] * 1000 / len(questions):>8.3f}")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
