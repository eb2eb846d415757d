"""Memory store benchmark: embedding throughput, recall latency, peak RSS.

    python benchmarks/bench_memory.py [--sizes 10000 100000] [--queries 200]

Prints one table. What it measures, and how:

- Embedding: the real all-MiniLM-L6-v2 (int8) through ``FastEmbedder``: one
  sentence at a time (latency) and 1,024 at once (throughput; the embedder batches by 16).
- Recall latency: ``LanceMemoryStore.search`` for one bot with N memories,
  filtered to the speaker and general facts (60 users), top 5, with the
  query vector given (search only) and with the query embedded (what a reply
  waits for). Flat scan vs ANN index (IvfPq, refine) side by side, hybrid
  (vector + full text) and vector only.
  Synthetic memories: 2,000 distinct template sentences are embedded for
  real once, then each stored row gets one of those vectors plus Gaussian
  noise (cosine ~0.9 to its source) so 100k rows do not take 5 minutes to
  embed; its text is the source sentence plus a row number. Rows go through
  the store's own ``add_many`` (an embedder that serves those vectors).
- Peak RSS: a fresh process loads the model, opens the 100k-row store and
  runs the queries; its ``ru_maxrss`` is reported.
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
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.types import Fact
from persistence.vectors.embeddings import FastEmbedder
from persistence.vectors.memory import LanceMemoryStore

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


async def time_search(store: LanceMemoryStore, embedder: FastEmbedder,
                      queries: list[str], qvecs: list[list[float]],
                      embed: bool) -> list[float]:
    ms = []
    for i, (q, v) in enumerate(zip(queries, qvecs, strict=True)):
        users = [f"user{i % USERS}", ""]
        start = time.perf_counter()
        if embed:
            await store.search(BOT, q, users=users, limit=5)
        else:
            await store.search(BOT, q, users=users, limit=5, vector=v)
        ms.append((time.perf_counter() - start) * 1000)
    return ms


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
    return [f"{'embed 1 sentence':<44} {'':>8} {p50:>8.1f} {p95:>8.1f}",
            f"{'embed 1024 sentences, one call (sentences/s)':<44} {rate:>8.0f}"]


async def main() -> int:
    parser = argparse.ArgumentParser(description="memory store benchmark")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, help="keep the databases here (default: a temp dir)")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    root = args.data or Path(tmp.name)
    embedder = await FastEmbedder.load(root / "models", threads=args.threads)
    rng = np.random.default_rng(1)
    queries = [QUESTIONS[i % len(QUESTIONS)].format(n=NAMES[rng.integers(len(NAMES))])
               for i in range(args.queries)]
    qvecs = await embedder.embed(queries)
    if args.rss_child:  # the serving process: model + store + queries, nothing else
        async with await LanceMemoryStore.open(args.rss_child, embedder) as store:
            await time_search(store, embedder, queries, qvecs, embed=True)
        print(peak_rss_mb())
        return 0

    base_texts = sentences()
    start = time.perf_counter()
    base = np.asarray(await embedder.embed(base_texts), dtype=np.float32)
    print(f"embedded {len(base_texts)} source sentences in {time.perf_counter() - start:.1f} s")
    print(f"{'what':<44} {'rows':>8} {'p50 ms':>8} {'p95 ms':>8}")
    print("-" * 71)
    for line in await bench_embedding(embedder, base_texts):
        print(line, flush=True)
    for size in sorted(args.sizes):
        uri = str(root / f"db{size}")
        start = time.perf_counter()
        await fill(uri, base_texts, base, size)
        print(f"{'load (add_many, vectors precomputed) s':<44} {size:>8} "
              f"{time.perf_counter() - start:>8.1f}", flush=True)
        async with await LanceMemoryStore.open(uri, embedder, ann_threshold=10**9) as store:
            await store.maintain(BOT)  # full-text index only
            for hybrid in (False, True):
                store._hybrid = hybrid
                label = "hybrid" if hybrid else "vector"
                p50, p95 = percentiles(await time_search(store, embedder, queries, qvecs, False))
                print(f"{'search, flat scan, ' + label:<44} {size:>8} {p50:>8.1f} {p95:>8.1f}",
                      flush=True)
        async with await LanceMemoryStore.open(uri, embedder, ann_threshold=1) as store:
            start = time.perf_counter()
            await store.maintain(BOT)  # builds the IvfPq index
            print(f"{'build ANN index + optimize s':<44} {size:>8} "
                  f"{time.perf_counter() - start:>8.1f}", flush=True)
            for hybrid in (False, True):
                store._hybrid = hybrid
                label = "hybrid" if hybrid else "vector"
                p50, p95 = percentiles(await time_search(store, embedder, queries, qvecs, False))
                print(f"{'search, IvfPq refine 10, ' + label:<44} {size:>8} {p50:>8.1f} "
                      f"{p95:>8.1f}", flush=True)
            p50, p95 = percentiles(await time_search(store, embedder, queries, qvecs, True))
            print(f"{'embed query + search (IvfPq, hybrid)':<44} {size:>8} {p50:>8.1f} "
                  f"{p95:>8.1f}", flush=True)
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
