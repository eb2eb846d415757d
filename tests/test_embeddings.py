"""The offline embedding model: prepared once, unit vectors, never blocks the loop."""

from __future__ import annotations

import asyncio
import copy
import functools
import math
import threading
from pathlib import Path
from typing import Any

import pytest

from persistence.vectors import query_model
from persistence.vectors.attention_fusion import fuse_attention
from persistence.vectors.embeddings import (
    DIMENSION,
    FastEmbedder,
    _load_query,
    prepare_model_dir,
)
from persistence.vectors.query_model import CACHE_ENV, KIND, prepare_query_model_dir


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
    batches: list[tuple[int, bool]] = []  # (thread, the loop answered meanwhile)

    class Observed:
        """fastembed's TextEmbedding, observed, not replaced."""

        def __init__(self, model: Any) -> None:
            self.model = model

        def embed(self, texts: list[str], **options: Any) -> Any:
            answered = threading.Event()
            loop.call_soon_threadsafe(answered.set)
            vectors = list(self.model.embed(texts, **options))
            batches.append((threading.get_ident(), answered.wait(timeout=60)))
            return vectors

    await embedder.warm()  # the query model is loaded: it can be observed
    for lane in (embedder._stored, embedder._query):
        monkeypatch.setattr(lane, "model", Observed(lane.model))
    texts = [f"Sentence {i}: the user mentioned their favourite hobby is number {i}"
             for i in range(64)]
    vectors = await embedder.embed(texts)
    assert len(vectors) == 64 and len(batches) == 64 // 16
    await asyncio.gather(*(embedder.embed_query(f"question {i} (loop test)") for i in range(3)))
    assert len(batches) > 64 // 16  # the questions went to the query model too
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


async def test_a_question_is_not_stuck_behind_a_big_import(embedder: FastEmbedder) -> None:
    """A search's question has its own model and lane: it is answered while an
    import's batches keep the stored model busy."""
    bulk = [f"Imported fact number {i} about somebody's plans (lane test)" for i in range(320)]
    order: list[str] = []

    async def importing() -> None:
        await embedder.embed(bulk)
        order.append("import")

    task = asyncio.create_task(importing())
    await asyncio.sleep(0)  # the import starts first
    await embedder.embed_query("what does Alice like? (lane test)")
    order.append("question")
    await task
    assert order == ["question", "import"]


async def test_a_repeated_query_is_served_from_the_cache(embedder: FastEmbedder) -> None:
    """One-text calls are cached by their exact text, per model: a repeated
    question costs no model call."""
    for embed_one in (functools.partial(_one, embedder), embedder.embed_query):
        first = await embed_one("what is Alice allergic to? (cache test)")
        calls = embedder.calls
        again = await embed_one("what is Alice allergic to? (cache test)")
        assert again == first and embedder.calls == calls
        other = await embed_one("what is Bob allergic to? (cache test)")
        assert embedder.calls == calls + 1 and other != first


async def _one(embedder: FastEmbedder, text: str) -> list[float]:
    [vector] = await embedder.embed([text])
    return vector


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


async def test_questions_waiting_together_go_to_the_query_model_as_one_batch(
        embedder: FastEmbedder) -> None:
    texts = [f"where does person {i} live? (query batch test)" for i in range(8)]
    calls = embedder.calls
    together = await asyncio.gather(*(embedder.embed_query(t) for t in texts))
    assert embedder.calls == calls + 1
    alone = [await embedder.embed_query(t + " ") for t in texts]  # uncached, one by one
    for got, want in zip(together, alone, strict=True):
        assert got == pytest.approx(want, abs=0.05)


async def test_the_query_model_finds_what_the_exact_model_stored(
        embedder: FastEmbedder) -> None:
    """Questions are embedded by the int8 model, facts by the exact one: the
    two agree closely, and a question finds its fact first among the others."""
    facts = ["Alice is allergic to peanuts", "Bob moved to Lisbon last spring",
             "Carol's daughter Emma loves dinosaurs", "The team meets on Tuesdays at 10",
             "Dan drives a red bicycle to work"]
    questions = ["what is Alice allergic to?", "where did Bob move?",
                 "what does Emma love?", "when does the team meet?", "how does Dan commute?"]
    stored = await embedder.embed(facts)
    for i, question in enumerate(questions):
        [exact] = await embedder.embed([question])
        fast = await embedder.embed_query(question)
        assert math.isclose(math.fsum(x * x for x in fast), 1.0, abs_tol=1e-3)
        assert math.fsum(a * b for a, b in zip(exact, fast, strict=True)) > 0.97
        scores = [math.fsum(a * b for a, b in zip(fast, fact, strict=True)) for fact in stored]
        assert max(range(len(facts)), key=scores.__getitem__) == i, (question, scores)


def test_the_query_model_is_built_once_per_machine_and_beside_the_data_without_a_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = prepare_model_dir(tmp_path / "data")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    built = prepare_query_model_dir(model_dir)
    assert built.parent == tmp_path / "cache" and built.name.startswith(KIND)
    assert sorted(p.name for p in built.iterdir()) == sorted(p.name for p in model_dir.iterdir())
    int8 = (built / "model.onnx").read_bytes()
    assert int8 != (model_dir / "model.onnx").read_bytes()
    stamp = (built / "model.onnx").stat().st_mtime_ns
    # A second data dir on the same machine reuses it: no rebuild.
    assert prepare_query_model_dir(prepare_model_dir(tmp_path / "other")) == built
    assert (built / "model.onnx").stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "cache").iterdir() if p != built]  # no scratch left
    # A cache path that cannot be a directory: the model is built with the data.
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "file" / "cache"))
    beside = prepare_query_model_dir(model_dir)
    assert beside.parent == model_dir.parent and (beside / "model.onnx").read_bytes() == int8


async def test_the_query_model_loads_once_at_the_first_question_off_the_loop(
        embedder: FastEmbedder, tmp_path: Path) -> None:
    """Nothing is built nor loaded for questions until one is asked (or ``warm``
    is called); then it loads once, in a worker thread, while every caller
    (on this loop and on another thread's) waits for that one load."""
    loop_thread = threading.get_ident()
    loads: list[int] = []
    model_dir = prepare_model_dir(tmp_path)

    def load() -> Any:
        loads.append(threading.get_ident())
        return _load_query(model_dir)

    fresh = FastEmbedder(embedder._stored.model, load_query=load)
    await fresh.embed(["stored facts need only the exact model"])
    assert loads == [] and fresh._query.model is None
    question = "what is Alice allergic to? (lazy test)"
    elsewhere = asyncio.to_thread(asyncio.run, fresh.embed_query(question + " elsewhere"))
    _, _, *vectors = await asyncio.gather(
        fresh.warm(), elsewhere, *(fresh.embed_query(f"{question} {i}") for i in range(3)))
    assert len(loads) == 1 and loads[0] != loop_thread
    for i, vector in enumerate(vectors):  # the int8 model's (a batch shifts them a little)
        assert vector == pytest.approx(await embedder.embed_query(f"{question} {i}"), abs=0.05)
    await fresh.warm()
    assert len(loads) == 1


def test_the_fused_attention_computes_what_the_model_did(tmp_path: Path) -> None:
    """The query model's layers run onnxruntime's fused Attention (quantized:
    QAttention). The rewrite itself changes no number: before quantization, the
    fused graph gives the hidden states of the original for a padded batch."""
    import numpy as np
    import onnx
    import onnxruntime
    from tokenizers import Tokenizer

    model_dir = prepare_model_dir(tmp_path)
    folded = query_model._fold(model_dir / "model.onnx", tmp_path)
    fused = copy.deepcopy(folded)
    assert fuse_attention(fused, num_heads=12) == 6
    assert not [n for n in fused.graph.node if n.op_type in ("Softmax", "Transpose")]
    assert [i.name for i in fused.graph.input] == [i.name for i in folded.graph.input]

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(
        ["hi", "what is Alice allergic to?",
         "The project deadline moved to Friday because the client asked for more time."])
    mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
    ids = np.array([e.ids for e in encoded], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    before, after = (onnxruntime.InferenceSession(m.SerializeToString(),
                                                  providers=["CPUExecutionProvider"])
                     .run(None, feed)[0] for m in (folded, fused))
    kept = mask.astype(bool)  # padding's hidden states are never pooled
    assert np.allclose(before[kept], after[kept], atol=1e-4)

    built = onnx.load(str(prepare_query_model_dir(model_dir) / "model.onnx"))
    assert [n.op_type for n in built.graph.node].count("QAttention") == 6
