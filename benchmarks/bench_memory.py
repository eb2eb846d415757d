"""Memory store benchmark: embedding throughput, recall latency, peak RSS.

    python benchmarks/bench_memory.py [--sizes 2000 10000 100000] [--queries 200]

Prints one table. What it measures, and how:

- Embedding: the real all-MiniLM-L6-v2 (int8) through ``FastEmbedder``: one
  sentence at a time (latency) and 1,024 at once (throughput; the embedder batches by 16).
- Embedding queries that arrive together: 64 distinct one-line queries one
  after another vs 8 at a time (the embedder batches those waiting into one
  model call), queries per second.
- Recall latency and CPU: ``LanceMemoryStore.search`` for one bot with N
  memories, filtered to the speaker and general facts (60 users), top 5,
  with the query vector given, interleaved per query (each variant in turn,
  so machine load hits them alike): LanceDB as it serves that size (flat
  under 10k rows, IvfPq + refine from 10k) and the in-memory exact scan
  (persistence/vectors/recall/scan.py), each vector only and hybrid (vector + full
  text), the full-text leg alone (LanceDB's query, and the snapshot's
  tantivy index: persistence/vectors/recall/text.py), and the exact scan
  with the query embedded through the embedder (its LRU serves repeated questions).
- The text index alone: the time to build it over every row and what it adds
  to the resident size (RSS after against before, freed heap returned first).
- One own write (``add`` of one fact, its embedding served by the LRU): CPU
  per write with the recall cache (LanceDB's commit, the snapshot's apply, the
  text index's commit) against a store without it, 20 of each. ``cpu ms`` is
  process CPU time (every thread) per search. ``recall@5`` is the share of
  the exact top 5 (a numpy scan of the filtered rows, computed here) that a
  vector-only variant returns. LanceDB's filtered flat scan is shown for
  the sizes where it is not what serves (40 queries: it is slow).
  Synthetic memories: 2,000 distinct template sentences are embedded for
  real once, then each stored row gets one of those vectors plus Gaussian
  noise (cosine ~0.9 to its source) so 100k rows do not take 5 minutes to
  embed; its text is the source sentence plus a row number. Rows go through
  the store's own ``add_many`` (an embedder that serves those vectors).
- Peak RSS: a fresh process loads the model, opens the 100k-row store, loads
  its exact-scan snapshot and runs the queries; its peak RSS is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.types import Fact
from persistence.vectors.embeddings import FastEmbedder
from persistence.vectors.memory import LanceMemoryStore
from persistence.vectors.recall.cache import _give_back_memory
from persistence.vectors.recall.scan import Snapshot
from persistence.vectors.recall.text import TextIndex, tokens
from persistence.vectors.tables import ANN_THRESHOLD

NAMES = ["Alice", "Bob", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun"]
VERBS = ["loves", "is learning", "gave up", "teaches", "collects things about",
         "wrote a blog post on", "is allergic to", "dreams of", "hates", "volunteers for"]
THINGS = ["Italian cooking", "rock climbing", "jazz piano", "the Berlin marathon",
          "vintage cameras", "Python type hints", "peanuts", "sailing to Crete",
          "tax law", "the local animal shelter", "Japanese pottery", "night photography",
          "chess openings", "sourdough bread", "electric bikes", "birdwatching",
          "salsa dancing", "board games", "quantum computing", "organic gardening"]
QUESTIONS = ["What does {n} like to do on weekends?", "Is {n} allergic to anything?",
             "What is {n} learning these days?", "Which hobby did {n} give up?",
             "What does {n} teach?", "What is {n} dreaming about?"]
USERS = 60
BOT = "bench"


def sentences() -> list[str]:
    return [f"{n} {v} {t}." for n, v, t in itertools.product(NAMES, VERBS, THINGS)]


def peak_rss_mb() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: on Linux ru_maxrss survives
    fork+exec, so a child started by a big parent reports the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def percentiles(ms: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(ms, n=100)
    return statistics.median(ms), q[94]


class ServedVectors:
    """Serves precomputed vectors to ``add_many`` (same model name: the same space)."""

    model_name = FastEmbedder.model_name
    dimension = FastEmbedder.dimension

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self.vectors = vectors

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [self.vectors[t] for t in texts]

    async def embed_query(self, text: str) -> list[float]:
        return self.vectors[text]


async def fill(uri: str, base_texts: list[str], base: np.ndarray, rows: int,
               seed: int = 7) -> None:
    rng = np.random.default_rng(seed)
    async with await LanceMemoryStore.open(uri, ServedVectors({}),
                                           ann_threshold=10**9) as store:
        served: ServedVectors = store._embedder  # type: ignore[assignment]
        have = await store.count(BOT)
        for start in range(have, rows, 10_000):
            n = min(10_000, rows - start)
            pick = rng.integers(0, len(base_texts), n)
            noisy = base[pick] + rng.normal(0, 0.023, (n, base.shape[1])).astype(np.float32)
            noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
            facts, served.vectors = [], {}
            for i, (p, v) in enumerate(zip(pick, noisy, strict=True)):
                text = f"{base_texts[p]} (note {start + i})"
                served.vectors[text] = v.tolist()
                user = "" if i % 5 == 0 else f"user{(start + i) % USERS}"
                facts.append(Fact(id="", text=text, bot=BOT, user=user))
            await store.add_many(facts)


Variant = Callable[[int], Awaitable[list[str]]]


def exact_top5(data: pa.Table, qvecs: list[list[float]]) -> list[list[str]]:
    """The truth: for each query, the 5 nearest of the rows its speaker may see."""
    ids = data.column("id").to_numpy(zero_copy_only=False)
    users = data.column("user").to_numpy(zero_copy_only=False)
    vectors = data.column("vector").combine_chunks()
    matrix = vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(vectors), -1)
    truth = []
    for i, v in enumerate(qvecs):
        rows = np.flatnonzero((users == f"user{i % USERS}") | (users == ""))
        scores = matrix[rows] @ np.asarray(v, dtype=np.float32)
        truth.append(list(ids[rows[np.argsort(-scores)[:5]]]))
    return truth


def searcher(store: LanceMemoryStore, queries: list[str], qvecs: list[list[float]], *,
             hybrid: bool, embed: bool = False) -> Variant:
    async def run(i: int) -> list[str]:
        store._hybrid = hybrid
        users = [f"user{i % USERS}", ""]
        vector = None if embed else qvecs[i]
        found = await store.search(BOT, queries[i], users=users, limit=5, vector=vector)
        return [f.id for f in found]
    return run


def text_leg(table: Any, queries: list[str]) -> Variant:
    async def run(i: int) -> list[str]:
        where = f"user IN ('user{i % USERS}', '') AND superseded_by = ''"
        found = await (table.query().nearest_to_text(queries[i]).where(where)
                       .select(["id", "_score"]).limit(20).to_arrow())
        ids: list[str] = found.column("id").to_pylist()
        return ids
    return run


def text_index_leg(snap: Snapshot, queries: list[str]) -> Variant:
    async def run(i: int) -> list[str]:
        assert snap.text is not None
        keys = snap.keys([f"user{i % USERS}", ""], None)
        rows, _ = snap.text.search(tokens(queries[i]), keys, 20)
        return [snap.ids[row] for row in rows.tolist()]
    return run


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def text_index_cost(snap: Snapshot) -> tuple[float, float]:
    """(seconds, MB of RSS) to build a text index over every row of ``snap``."""
    texts, users = snap.columns["text"], snap.columns["user"]
    keys = [f'["{u}", ""]' for u in users]
    _give_back_memory()
    before, start = rss_mb(), time.perf_counter()
    index = TextIndex()
    index.add(range(len(texts)), texts, users, keys)
    index.commit()
    seconds = time.perf_counter() - start
    _give_back_memory()
    grown = rss_mb() - before
    del index
    return seconds, grown


async def write_cost(fast: LanceMemoryStore, plain: LanceMemoryStore, writes: int = 20
                     ) -> tuple[float, float]:
    """CPU ms per ``add`` of one fact: with the recall cache, without."""
    cpu = {"fast": 0.0, "plain": 0.0}
    text = "Alice took up the cello this spring."
    await fast.add(Fact(id="", text=text, bot=BOT, user="user1"))  # the LRU serves it now
    for name, store in (("fast", fast), ("plain", plain)):  # not interleaved: a write by
        for _ in range(writes):  # the other handle would leave the snapshot behind
            start = time.process_time()
            await store.add(Fact(id="", text=text, bot=BOT, user="user1"))
            cpu[name] += time.process_time() - start
    return cpu["fast"] * 1000 / writes, cpu["plain"] * 1000 / writes


async def measure(variants: dict[str, Variant], queries: int, truth: list[list[str]],
                  size: int) -> None:
    """Each query through every variant in turn; one line per variant."""
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu = dict.fromkeys(variants, 0.0)
    hits = dict.fromkeys(variants, 0)
    for i in range(queries):
        for name, run in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            found = await run(i)
            wall[name].append((time.perf_counter() - start) * 1000)
            cpu[name] += time.process_time() - start_cpu
            hits[name] += len(set(found) & set(truth[i]))
    for name in variants:
        p50, p95 = percentiles(wall[name])
        recall = f"{hits[name] / (5 * queries):>8.3f}" if "vector" in name else f"{'':>8}"
        print(f"{name:<44} {size:>8} {p50:>8.1f} {p95:>8.1f} "
              f"{cpu[name] * 1000 / queries:>8.2f} {recall}", flush=True)


async def bench_embedding(embedder: FastEmbedder, texts: list[str]) -> list[str]:
    single = []
    for t in texts[:100]:
        start = time.perf_counter()
        await embedder.embed([t])
        single.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    await embedder.embed(texts[:1024])
    rate = 1024 / (time.perf_counter() - start)
    p50, p95 = percentiles(single)
    # Distinct texts never seen (the LRU must not help): one at a time, then 8 at once.
    fresh = [f"{t} Why?" for t in texts[:128]]
    start = time.perf_counter()
    for t in fresh[:64]:
        await embedder.embed([t])
    one_by_one = 64 / (time.perf_counter() - start)
    start = time.perf_counter()
    for k in range(64, 128, 8):
        await asyncio.gather(*(embedder.embed([t]) for t in fresh[k:k + 8]))
    together = 64 / (time.perf_counter() - start)
    return [f"{'embed 1 sentence':<44} {'':>8} {p50:>8.1f} {p95:>8.1f}",
            f"{'embed 1024 sentences, one call (sentences/s)':<44} {rate:>8.0f}",
            f"{'64 queries one by one (queries/s)':<44} {one_by_one:>8.0f}",
            f"{'64 queries, 8 concurrent, batched (q/s)':<44} {together:>8.0f}"]


async def main() -> int:
    parser = argparse.ArgumentParser(description="memory store benchmark")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, help="keep the databases here (default: a temp dir)")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    root = args.data or Path(tmp.name)
    embedder = await FastEmbedder.load(root / "models", threads=args.threads)
    await embedder.warm()  # the query model, loaded as a service's start does
    rng = np.random.default_rng(1)
    queries = [QUESTIONS[i % len(QUESTIONS)].format(n=NAMES[rng.integers(len(NAMES))])
               for i in range(args.queries)]
    qvecs = await embedder.embed(queries)
    if args.rss_child:  # the serving process: model + store + queries, nothing else
        async with await LanceMemoryStore.open(args.rss_child, embedder) as store:
            await store.warm(BOT)
            run = searcher(store, queries, qvecs, hybrid=True, embed=True)
            for i in range(len(queries)):
                await run(i)
        print(peak_rss_mb())
        return 0

    base_texts = sentences()
    start = time.perf_counter()
    base = np.asarray(await embedder.embed(base_texts), dtype=np.float32)
    print(f"embedded {len(base_texts)} source sentences in {time.perf_counter() - start:.1f} s")
    print(f"{'what':<44} {'rows':>8} {'p50 ms':>8} {'p95 ms':>8} {'cpu ms':>8} {'recall@5':>8}")
    print("-" * 89)
    for line in await bench_embedding(embedder, base_texts):
        print(line, flush=True)
    for size in sorted(args.sizes):
        uri = str(root / f"db{size}")
        start = time.perf_counter()
        await fill(uri, base_texts, base, size)
        print(f"{'load (add_many, vectors precomputed) s':<44} {size:>8} "
              f"{time.perf_counter() - start:>8.1f}", flush=True)
        async with await LanceMemoryStore.open(uri, embedder, cache_mb=0) as plain:
            table = await plain._table(BOT)
            assert table is not None
            truth = exact_top5(await table.query().select(["id", "user", "vector"]).to_arrow(),
                               qvecs)
            if size >= ANN_THRESHOLD:  # LanceDB's flat scan, for the record (not what serves)
                plain._ann_threshold = plain._maintainers[BOT]._ann_threshold = 10**9
                await plain.maintain(BOT)
                await measure({"LanceDB flat scan, vector": searcher(
                    plain, queries, qvecs, hybrid=False)}, min(40, args.queries), truth, size)
                plain._maintainers[BOT]._ann_threshold = ANN_THRESHOLD
            start = time.perf_counter()
            await plain.maintain(BOT)  # what serves this size: IvfPq from 10k rows
            print(f"{'build indexes + optimize s':<44} {size:>8} "
                  f"{time.perf_counter() - start:>8.1f}", flush=True)
            async with await LanceMemoryStore.open(uri, embedder) as fast:
                start = time.perf_counter()
                assert await fast.warm(BOT)
                snap = await fast.cache.current(BOT, await fast._table(BOT))
                assert snap is not None
                print(f"{'exact scan: load snapshot s / its MB':<44} {size:>8} "
                      f"{time.perf_counter() - start:>8.2f} {snap.nbytes / 2**20:>8.0f}",
                      flush=True)
                served = "IvfPq" if size >= ANN_THRESHOLD else "flat"
                print(f"{'variant (queries interleaved)':<44} {'rows':>8} {'p50 ms':>8} "
                      f"{'p95 ms':>8} {'cpu ms':>8} {'recall@5':>8}")
                await measure({
                    f"LanceDB {served}, vector": searcher(plain, queries, qvecs, hybrid=False),
                    "exact scan, vector": searcher(fast, queries, qvecs, hybrid=False),
                    f"LanceDB {served}, hybrid": searcher(plain, queries, qvecs, hybrid=True),
                    "exact scan, hybrid": searcher(fast, queries, qvecs, hybrid=True),
                    "full-text leg alone (LanceDB)": text_leg(table, queries),
                    "full-text leg alone (in memory)": text_index_leg(snap, queries),
                    "exact scan, hybrid, query embedded (LRU)": searcher(
                        fast, queries, qvecs, hybrid=True, embed=True),
                }, args.queries, truth, size)
                seconds, grown = await asyncio.to_thread(text_index_cost, snap)
                print(f"{'text index: build s / RSS it adds MB':<44} {size:>8} "
                      f"{seconds:>8.2f} {grown:>8.0f}", flush=True)
                with_cache, without = await write_cost(fast, plain)
                print(f"{'add 1 fact, cpu ms: recall cache / none':<44} {size:>8} "
                      f"{with_cache:>8.2f} {without:>8.2f}", flush=True)
    biggest = str(root / f"db{max(args.sizes)}")
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--rss-child", biggest, "--queries", str(args.queries),
        "--threads", str(args.threads), stdout=asyncio.subprocess.PIPE)
    stdout, _ = await child.communicate()
    rss = stdout.decode().strip().splitlines()[-1]
    print(f"{'peak RSS MB (model + store + queries)':<44} {max(args.sizes):>8} {rss:>8}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
