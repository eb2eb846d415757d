"""Retrieval quality on LoCoMo conversations, through the product's own paths.

    python benchmarks/locomo.py CONVERSATION.json [...] [--baseline]

For each LoCoMo conversation file (snap-research/locomo, ACL 2024; see the
data folder's README for the citation):

1. every ``session_N_observation`` fact is imported as a general memory of a
   fresh bot through ``MemoryAdmin.import_lines`` (the `boternity memory
   import` path: JSON Lines, metadata carries the fact's dialog ids);
2. every question of category 1-4 is asked through ``BotMemory.recall`` (the
   reply pipeline's path: personalization, own-store search, floor, top-k),
   once per k in (1, 5, 10) with ``top_k = k``, exactly as a bot configured
   with that top_k would recall;
3. a question is a hit at k when one of the recalled facts shares a dialog id
   with the question's evidence.

Printed per conversation: questions, the ceiling (questions for which some
observation carries the evidence at all: no retriever can score above it),
recall@1/5/10, and recall latency p50/p95 (top_k = 5) in milliseconds.
``--baseline`` also runs the same with vector-only ranking, for a side-by-side.
Everything runs locally: real model, LanceDB in a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.admin.memory import BotInfo, MemoryAdmin
from engine.background import Background
from engine.memory.policy import BotMemory, MemoryConfig
from engine.types import IncomingMessage
from persistence.vectors.embeddings import FastEmbedder
from persistence.vectors.memory import LanceMemoryStore

KS = (1, 5, 10)
BOT = "locomo"


def dialog_ids(raw: str | list[str]) -> set[str]:
    items = [raw] if isinstance(raw, str) else raw
    # One evidence entry in conversation 26 is "D8:6; D9:17".
    return {part.strip() for item in items for part in re.split(r"[;,]", item) if part.strip()}


@dataclass
class Conversation:
    name: str
    observations: list[tuple[str, str, set[str]]]  # speaker, fact, dialog ids
    questions: list[tuple[str, set[str]]]  # question, evidence dialog ids


def load(path: Path) -> Conversation:
    data = json.loads(path.read_text(encoding="utf-8"))
    observations = [
        (speaker, fact, dialog_ids(ids))
        for key, sessions in data.items() if key.endswith("_observation")
        for speaker, facts in sessions.items()
        for fact, ids in facts
    ]
    questions = [(q["question"], dialog_ids(q["evidence"])) for q in data["qa"]
                 if q.get("category") in (1, 2, 3, 4) and q.get("evidence")]
    return Conversation(path.stem, observations, questions)


@dataclass
class Result:
    hits: dict[int, int]
    latencies_ms: list[float]


async def run(conv: Conversation, embedder: FastEmbedder, *, hybrid: bool) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        async with await LanceMemoryStore.open(tmp, embedder, hybrid=hybrid) as store:
            admin = MemoryAdmin(store=store, bots={BOT: BotInfo(name="LoCoMo")})
            lines = [json.dumps({"text": fact, "metadata": {"evidence": sorted(ids),
                                                            "speaker": speaker}})
                     for speaker, fact, ids in conv.observations]
            report = await admin.import_lines(BOT, lines)
            assert report.added == len(lines), report
            await store.maintain(BOT)  # what the background maintainer does after an import
            await store.warm(BOT)  # every search on the recall snapshot (a running bot's path)
            jobs = Background(name="locomo")
            memories = {k: BotMemory(MemoryConfig(bot=BOT, top_k=k, min_score=-1.0),
                                     store=store, embedder=embedder, jobs=jobs) for k in KS}
            hits = dict.fromkeys(KS, 0)
            latencies: list[float] = []
            for number, (question, evidence) in enumerate(conv.questions):
                message = IncomingMessage(platform="terminal", bot=BOT, chat="bench",
                                          user="", text=question, message_id=str(number))
                for k in KS:
                    start = time.perf_counter()
                    facts = await memories[k].recall(message)
                    if k == 5:
                        latencies.append((time.perf_counter() - start) * 1000)
                    if any(set(json.loads(f.metadata)["evidence"]) & evidence for f in facts):
                        hits[k] += 1
            return Result(hits, latencies)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="LoCoMo conversation JSON files")
    parser.add_argument("--baseline", action="store_true",
                        help="also run vector-only ranking for comparison")
    parser.add_argument("--threads", type=int, default=2, help="embedding threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as models:
        embedder = await FastEmbedder.load(Path(models), threads=args.threads)
        await embedder.warm()  # the query model, loaded as a service's start does
        modes = [("hybrid", True)] + ([("vector", False)] if args.baseline else [])
        header = (f"{'conversation':>12} {'ranking':>7} {'questions':>9} {'ceiling':>7} "
                  f"{'recall@1':>8} {'recall@5':>8} {'recall@10':>9} {'p50 ms':>7} {'p95 ms':>7}")
        print(header)
        print("-" * len(header))
        totals: dict[str, list[float]] = {}
        for path in args.files:
            conv = load(path)
            evidence_known = set().union(*(ids for _, _, ids in conv.observations))
            n = len(conv.questions)
            ceiling = sum(1 for _, ev in conv.questions if ev & evidence_known) / n
            for mode, hybrid in modes:
                result = await run(conv, embedder, hybrid=hybrid)
                recall = [result.hits[k] / n for k in KS]
                totals.setdefault(mode, []).extend([*recall, ceiling])
                lat = result.latencies_ms
                print(f"{conv.name:>12} {mode:>7} {n:>9} {ceiling:>7.3f} {recall[0]:>8.3f} "
                      f"{recall[1]:>8.3f} {recall[2]:>9.3f} {statistics.median(lat):>7.1f} "
                      f"{percentile(lat, 95):>7.1f}", flush=True)
        for mode, values in totals.items():
            rows = [values[i:i + 4] for i in range(0, len(values), 4)]
            mean = [statistics.fmean(col) for col in zip(*rows, strict=True)]
            print(f"{'mean':>12} {mode:>7} {'':>9} {mean[3]:>7.3f} {mean[0]:>8.3f} "
                  f"{mean[1]:>8.3f} {mean[2]:>9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
