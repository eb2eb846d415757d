"""The int8 query model against the exact model, side by side in one run.

    .venv/bin/python benchmarks/bench_query_model.py [--rounds 5] [--compare DIR]

Both models as the product loads them (``FastEmbedder.load``: fastembed, one
onnxruntime thread each). For batches of 1, 2 and 8 questions shaped like a
chat's ("what do you know about ..."), prints the CPU time per question of
each model (``time.thread_time`` around the blocking call, median of
``--rounds``; the same questions for all, the order rotating each round),
the ratio of the query model's to the exact one's, and how much of the query
model's time is spent inside ``InferenceSession.run`` (the rest: fastembed's
tokenizer and pooling, and our conversion to lists). Then the cosine between
each model's vectors and the exact model's of the same texts (min and mean)
over 136 sentences: questions, facts, a few long ones.

``--compare DIR``: also a query model from another directory (``model.onnx``
beside the tokenizer files), e.g. one that an older checkout built into
``$BOTERNITY_MODEL_CACHE``, measured the same way in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from persistence.vectors.embeddings import FastEmbedder


def _questions(n: int, offset: int) -> list[str]:
    return [f"chat {i % 8}, turn {offset + i}: what do you know about topic {(i * 7919) % 2000}?"
            for i in range(n)]


class _RunClock:
    """An ``InferenceSession`` seen through: the CPU time its ``run`` takes."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.seconds = 0.0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return self.session.run(*args, **kwargs)
        finally:
            self.seconds += time.thread_time() - started

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def _clock(lane: Any) -> _RunClock:
    """Time the session inside a lane's fastembed model (TextEmbedding -> its
    OnnxTextEmbedding -> the InferenceSession)."""
    inner = lane.model.model
    inner.model = _RunClock(inner.model)
    return inner.model  # type: ignore[no-any-return]


def _cpu_per_text(embedder: FastEmbedder, lane: Any, texts: list[str]) -> float:
    started = time.thread_time()
    embedder._run(lane, texts)
    return (time.thread_time() - started) / len(texts) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compare", type=Path, help="another query model's directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        embedder = await FastEmbedder.load(Path(tmp))
        await embedder.warm()
    lanes: dict[str, Any] = {"exact": embedder._stored, "int8": embedder._query}
    if args.compare is not None:
        from persistence.vectors.embeddings import _Lane, _open

        lanes["compared"] = _Lane(_open(args.compare, 1))
    clocks = {name: _clock(lane) for name, lane in lanes.items() if name != "exact"}
    for lane in lanes.values():  # warm every session
        embedder._run(lane, _questions(8, 0))
    ratios = [("int8", "exact")] + ([("int8", "compared")] if "compared" in lanes else [])
    header = "".join(f"{name + ' ms':>13}" for name in lanes)
    header += "".join(f"{a + '/' + b:>15}" for a, b in ratios)
    header += "".join(f"{name + ' run':>14}" for name in clocks)
    print(f"{'batch':>5}{header}   (CPU per question)")
    offset = 100
    names = list(lanes)
    for batch in (1, 2, 8):
        runs: dict[str, list[float]] = {name: [] for name in names}
        run_ms: dict[str, list[float]] = {name: [] for name in clocks}
        for round_ in range(args.rounds):
            texts = _questions(batch * 4, offset)
            offset += batch * 4
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                if name in clocks:
                    clocks[name].seconds = 0.0
                runs[name].append(statistics.fmean(
                    _cpu_per_text(embedder, lanes[name], texts[i:i + batch])
                    for i in range(0, len(texts), batch)))
                if name in clocks:
                    run_ms[name].append(clocks[name].seconds / len(texts) * 1000)
        ms = {name: statistics.median(values) for name, values in runs.items()}
        cells = "".join(f"{ms[name]:>13.2f}" for name in names)
        cells += "".join(f"{ms[a] / ms[b]:>15.2f}" for a, b in ratios)
        cells += "".join(f"{statistics.median(run_ms[name]):>14.2f}" for name in clocks)
        print(f"{batch:>5}{cells}")
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

    exact = np.asarray(embedder._run(lanes["exact"], texts))
    for name in names[1:]:
        cos = (exact * np.asarray(embedder._run(lanes[name], texts))).sum(axis=1)
        print(f"cosine exact vs {name} over {len(texts)} texts: min {cos.min():.4f}, "
              f"mean {cos.mean():.4f}")


if __name__ == "__main__":
    asyncio.run(main())
