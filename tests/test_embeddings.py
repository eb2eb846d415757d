"""The offline embedding model: prepared once, unit vectors, never blocks the loop."""

from __future__ import annotations

import asyncio
import math
import threading
from pathlib import Path
from typing import Any

import pytest

from persistence.vectors.embeddings import DIMENSION, FastEmbedder, prepare_model_dir


def test_model_dir_is_prepared_once_and_repaired(tmp_path: Path) -> None:
    target = prepare_model_dir(tmp_path)
    names = sorted(p.name for p in target.iterdir())
    assert names == sorted(["model.onnx", "tokenizer.json", "config.json",
                            "special_tokens_map.json", "tokenizer_config.json"])
    stamp = (target / "model.onnx").stat().st_mtime_ns
    assert prepare_model_dir(tmp_path) == target
    assert (target / "model.onnx").stat().st_mtime_ns == stamp  # idempotent: not copied again
    (target / "tokenizer.json").write_text("{truncated")  # a damaged copy is replaced
    prepare_model_dir(tmp_path)
    assert (target / "tokenizer.json").read_text().startswith("{") and (
        (target / "tokenizer.json").stat().st_size > 100_000)


async def test_vectors_are_unit_length_and_meaningful(embedder: FastEmbedder) -> None:
    assert embedder.dimension == DIMENSION == 384
    assert await embedder.embed([]) == []
    cat, kitten, tax = await embedder.embed(
        ["The cat sleeps on the sofa", "A kitten naps on the couch",
         "Tax returns are due in April"])
    for v in (cat, kitten, tax):
        assert len(v) == 384
        assert math.isclose(math.fsum(x * x for x in v), 1.0, abs_tol=1e-3)

    def dot(a: list[float], b: list[float]) -> float:
        return math.fsum(x * y for x, y in zip(a, b, strict=True))

    assert dot(cat, kitten) > dot(cat, tax) + 0.3


async def test_embedding_a_batch_leaves_the_event_loop_responsive(
    embedder: FastEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proved by where the work runs, not by a stopwatch (the lag itself is
    measured in benchmarks/bench_embedding_lag.py): every batch goes to the
    model from another thread, and while each batch is being embedded the
    event loop serves a callback (it would deadlock if the batch ran on it)."""
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    model = embedder._model  # fastembed's TextEmbedding: observed, not replaced
    batches: list[tuple[int, bool]] = []  # (thread, the loop answered meanwhile)

    class Observed:
        def embed(self, texts: list[str], **options: Any) -> Any:
            answered = threading.Event()
            loop.call_soon_threadsafe(answered.set)
            vectors = list(model.embed(texts, **options))
            batches.append((threading.get_ident(), answered.wait(timeout=60)))
            return vectors

    monkeypatch.setattr(embedder, "_model", Observed())
    texts = [f"Sentence {i}: the user mentioned their favourite hobby is number {i}"
             for i in range(64)]
    vectors = await embedder.embed(texts)
    assert len(vectors) == 64 and len(batches) == 64 // 16
    assert all(thread != loop_thread and answered for thread, answered in batches), batches


async def test_a_query_is_not_stuck_behind_a_big_import(embedder: FastEmbedder) -> None:
    """The model lock is per batch: a one-line embed finishes before a long import does."""
    bulk = [f"Imported fact number {i} about somebody's hobbies and plans" for i in range(320)]
    order: list[str] = []

    async def run(name: str, texts: list[str]) -> None:
        await embedder.embed(texts)
        order.append(name)

    importing = asyncio.create_task(run("import", bulk))
    await asyncio.sleep(0)  # the import starts first
    await run("query", ["what does Alice like?"])
    await importing
    assert order == ["query", "import"]


async def test_a_repeated_query_is_served_from_the_cache(embedder: FastEmbedder) -> None:
    """One-text calls are cached by their exact text: a repeated question costs no model call."""
    [first] = await embedder.embed(["what is Alice allergic to? (cache test)"])
    calls = embedder.calls
    [again] = await embedder.embed(["what is Alice allergic to? (cache test)"])
    assert again == first and embedder.calls == calls
    [other] = await embedder.embed(["what is Bob allergic to? (cache test)"])
    assert embedder.calls == calls + 1 and other != first


async def test_queries_waiting_together_go_to_the_model_as_one_batch(
        embedder: FastEmbedder) -> None:
    """Concurrent replies each embed one query: those waiting share one model call,
    and each still gets its own text's vector."""
    texts = [f"where does person {i} live? (batch test)" for i in range(8)]
    alone = [embedder.embed_sync([t])[0] for t in texts]  # one at a time, not cached
    calls = embedder.calls
    together = await asyncio.gather(*(embedder.embed([t]) for t in texts))
    assert embedder.calls == calls + 1
    for [got], want in zip(together, alone, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
