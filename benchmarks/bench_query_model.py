"""The int8 query model against the exact model, side by side in one run.

    .venv/bin/python benchmarks/bench_query_model.py [--rounds 5]

Both models as the product loads them (``FastEmbedder.load``: fastembed, one
onnxruntime thread each). For batches of 1, 2 and 8 questions shaped like a
chat's ("what do you know about ..."), prints the CPU time per question of
each model (``time.thread_time`` around the blocking call, median of
``--rounds``; the same questions for both, alternating which goes first) and
their ratio, then the cosine between the two models' vectors of the same
texts (min and mean) over 136 sentences: questions, facts, a few long ones.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from persistence.vectors.embeddings import FastEmbedder


def _questions(n: int, offset: int) -> list[str]:
    return [f"chat {i % 8}, turn {offset + i}: what do you know about topic {(i * 7919) % 2000}?"
            for i in range(n)]


def _cpu_per_text(embedder: FastEmbedder, lane: object, texts: list[str]) -> float:
    started = time.thread_time()
    embedder._run(lane, texts)  # type: ignore[arg-type]
    return (time.thread_time() - started) / len(texts) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        embedder = await FastEmbedder.load(Path(tmp))
    exact, fast = embedder._stored, embedder._query
    for lane in (exact, fast):  # warm both sessions
        embedder._run(lane, _questions(8, 0))
    print(f"{'batch':>5}{'exact ms':>10}{'int8 ms':>10}{'ratio':>7}   (CPU per question)")
    offset = 100
    for batch in (1, 2, 8):
        runs: dict[str, list[float]] = {"exact": [], "int8": []}
        for round_ in range(args.rounds):
            texts = _questions(batch * 4, offset)
            offset += batch * 4
            order = [("exact", exact), ("int8", fast)][:: 1 if round_ % 2 == 0 else -1]
            for name, lane in order:
                runs[name].append(statistics.fmean(
                    _cpu_per_text(embedder, lane, texts[i:i + batch])
                    for i in range(0, len(texts), batch)))
        e, q = statistics.median(runs["exact"]), statistics.median(runs["int8"])
        print(f"{batch:>5}{e:>10.2f}{q:>10.2f}{q / e:>7.2f}")
    texts = (_questions(64, 5000)
             + [f"User {n % 8} mentioned topic {n}: item {n * 7}" for n in range(64)]
             + ["I moved to Lisbon last spring and I am learning to surf with my sister.",
                "My daughter's name is Emma and she loves dinosaurs and the museum.",
                "What did I say about my sister's wedding in June?",
                "Caroline went to the LGBTQ support group yesterday and found it helpful.",
                "Remind me what the doctor said about my knee after the marathon.",
                "We decided to adopt a rescue dog called Biscuit next month.",
                "Which restaurant did Tom recommend for the anniversary dinner?",
                "The project deadline moved to Friday because the client asked for more"
                " time to review the second draft of the contract."])
    import numpy as np

    a = np.asarray(embedder._run(exact, texts))
    b = np.asarray(embedder._run(fast, texts))
    cos = (a * b).sum(axis=1)
    print(f"cosine exact vs int8 over {len(texts)} texts: min {cos.min():.4f}, "
          f"mean {cos.mean():.4f}")


if __name__ == "__main__":
    asyncio.run(main())
