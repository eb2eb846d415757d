"""What the per-bot and shared LanceDB tables have in common.

- SQL literals: ``quote`` is the only way a value enters a predicate.
  Bot and user ids come from platforms and may hold quotes; a literal is
  wrapped in single quotes with inner quotes doubled (SQL standard, what
  ``lancedb.expr.lit`` renders too), so it can never close the string early.
- Schemas carry the embedding model name and dimension in their metadata;
  ``check_model`` refuses a table written with another model.
- ``hybrid_search``: a vector leg and a full-text (BM25) leg run in
  parallel with the same filter, once the table has a full-text index; the
  union is ranked by ``cosine + FTS_WEIGHT * bm25 / max bm25``. Measured on
  LoCoMo (benchmarks/locomo.py, 3 conversations): recall@5 0.663 against
  0.629 for vector only; LanceDB's reciprocal-rank-fusion reranker scored
  0.653 in the same experiment. ``score`` stays the plain cosine similarity (the policy's
  floor and duplicate thresholds are cosine values); the order is the fused one.
- ``Maintainer``: one background task per table that builds the full-text
  and scalar (filter column) indexes, builds the ANN index past a row
  threshold (retrained after 4x growth), and runs ``optimize``
  (index new rows, compact, drop old versions). It runs after writes,
  debounced, never on the reply path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, ParamSpec, TypeVar

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import FTS, Bitmap, BTree, IvfPq

from engine.errors import BoternityError, EmbeddingMismatch, StorageError
from engine.ports import Embedder, Progress

log = logging.getLogger(__name__)

MODEL_KEY = b"boternity.embedding_model"
DIM_KEY = b"boternity.embedding_dim"
OWNER_KEY = b"boternity.owner"  # the bot id of a per-bot table; "" for shared

# Measured (benchmarks/bench_memory.py, 2-core machine): a filtered flat scan
# grows linearly with rows (p95 76 ms at 10k, 184 ms at 100k) and its scan
# buffers push RSS past 1 GB at 100k; IvfPq + refine is already faster at 10k
# (p95 6.5 ms; 15.5 ms at 100k) and keeps model + 100k rows at 430 MB peak RSS.
# IvfFlat builds ~10x faster but needed ~300 MB more at 100k. So: IvfPq from 10k.
ANN_THRESHOLD = 10_000
REFINE_FACTOR = 10
REBUILD_GROWTH = 4  # retrain the vector index when the table has grown this much
NPROBES = 20
# Weight of the normalized BM25 score in hybrid ranking (swept on LoCoMo: 0.1..0.3 all
# help; 0.2-0.3 best).
FTS_WEIGHT = 0.25
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ScalarIndex = Literal["btree", "bitmap"]  # btree: many distinct values; bitmap: a few
EMBED_BATCH = 256  # texts per embedder call when writing or re-embedding
# The columns every memory table has, in this order (each table adds its own around them).
FACT_FIELDS = [
    pa.field("text", pa.string(), nullable=False),
    pa.field("user", pa.string(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("importance", pa.float64(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
]


P = ParamSpec("P")
R = TypeVar("R")


def storage_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Map whatever LanceDB/Arrow/the OS raise to ``StorageError`` (errors at the edge).

    The memory policy catches ``BoternityError`` so a storage fault never
    breaks a reply; a raw ``RuntimeError`` from lance would.
    """

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except BoternityError:
            raise
        except Exception as exc:
            raise StorageError(f"memory store: {exc}") from exc

    return wrapper


def quote(value: str) -> str:
    """A SQL string literal for ``value``: quotes doubled, never closed early."""
    if "\x00" in value:
        # NUL never appears in a legitimate id; refuse rather than guess.
        raise ValueError("NUL byte in a filter value")
    return "'" + value.replace("'", "''") + "'"


def in_list(column: str, values: Iterable[str]) -> str:
    """``column IN ('a', 'b')``; callers handle the empty case (it matches nothing)."""
    items = sorted(set(values))
    if not items:
        return "false"
    return f"{column} IN ({', '.join(quote(v) for v in items)})"


def micros(moment: datetime) -> int:
    """Exact microseconds since the epoch (no float rounding), for hashing."""
    return (moment - EPOCH) // timedelta(microseconds=1)


def now() -> datetime:
    # Truncated to microseconds: exactly what an Arrow timestamp[us] stores.
    return datetime.now(UTC)


def with_model(fields: Sequence[pa.Field], model: str, dim: int, owner: str) -> pa.Schema:
    meta = {MODEL_KEY: model.encode(), DIM_KEY: str(dim).encode(), OWNER_KEY: owner.encode()}
    return pa.schema([*fields, pa.field("vector", pa.list_(pa.float32(), dim))], metadata=meta)


def check_model(name: str, schema: pa.Schema, model: str, dim: int) -> None:
    """Raise ``EmbeddingMismatch`` when ``schema`` was written with another model."""
    meta = schema.metadata or {}
    stored_model = meta.get(MODEL_KEY, b"").decode()
    stored_dim = meta.get(DIM_KEY, b"0").decode()
    if stored_model != model or stored_dim != str(dim):
        raise EmbeddingMismatch(
            f"memory table '{name}' was embedded with {stored_model or 'an unknown model'} "
            f"({stored_dim} dims) but this Boternity uses {model} ({dim} dims); "
            "run `boternity memory reembed` to rewrite its vectors"
        )


async def connect(uri: str, storage_options: dict[str, str] | None) -> Any:
    """Open a LanceDB database with the async API.

    ``read_consistency_interval=0``: every read sees writes from other
    handles (the default never does).
    """
    return await lancedb.connect_async(
        uri, read_consistency_interval=timedelta(0), storage_options=storage_options)


STAGING_PREFIX = "reembed_"  # a table being rewritten: never a bot's table


async def rewrite_beside(
    db: Any, name: str, data: pa.Table, embedder: Embedder, schema: pa.Schema,
    progress: Progress | None, *,
    finish: Callable[[pa.Table], Awaitable[pa.Table]] | None = None,
) -> int:
    """Replace table ``name`` by ``data`` (every column but the vector) embedded again.

    Nothing is deleted before the new rows are safe: they are written, batch
    by batch, to a staging table beside the old one (``reembed_<name>``),
    counted, and only then swapped in with one overwrite (a single new
    version of the dataset: an interrupted swap leaves the old version).
    A failure or a kill at any point leaves the old table whole; a rerun
    drops the stale staging table and starts again. ``finish`` may rework
    the complete table before the swap (the shared table re-hashes its chain).
    Returns the rows written.
    """
    staging = STAGING_PREFIX + name
    if staging in await table_names(db):
        await db.drop_table(staging)  # a leftover of an interrupted run
    table = await db.create_table(staging, schema=schema)
    total: int = data.num_rows
    for start in range(0, total, EMBED_BATCH):
        chunk = data.slice(start, EMBED_BATCH)
        vectors = await embedder.embed(chunk.column("text").to_pylist())
        await table.add(pa.Table.from_arrays(
            [*chunk.columns, pa.array(vectors, type=pa.list_(pa.float32(), embedder.dimension))],
            schema=schema))
        if progress is not None:
            progress(min(start + EMBED_BATCH, total), total)
    written: int = await table.count_rows()
    if written != total:
        raise StorageError(f"re-embedding {name}: wrote {written} of {total} rows; "
                           "the old table is unchanged, run it again")
    rebuilt = await table.query().to_arrow()
    if finish is not None:
        rebuilt = await finish(rebuilt)
    await db.create_table(name, rebuilt, mode="overwrite")
    await db.drop_table(staging)
    return total


def owner_of(schema: pa.Schema) -> str:
    owner: bytes = (schema.metadata or {}).get(OWNER_KEY, b"")
    return owner.decode()


def cosines(query: np.ndarray, data: pa.Table) -> np.ndarray:
    """Cosine similarity of ``query`` to each row's unit ``vector``: a dot product.

    Read straight from the Arrow column: turning 384 floats per row into
    Python objects and back cost more than the whole dot product.
    """
    if data.num_rows == 0:
        return np.empty(0, dtype=np.float32)
    column = data.column("vector").combine_chunks()
    matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)
    scores: np.ndarray = matrix @ query
    return scores


def vector_digests(column: pa.ChunkedArray | pa.Array) -> list[str]:
    """SHA-256 of each vector as little-endian float32 bytes (the shared table's hash)."""
    if len(column) == 0:
        return []
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    matrix = column.flatten().to_numpy(zero_copy_only=False).astype("<f4").reshape(
        len(column), -1)
    return [hashlib.sha256(vector.tobytes()).hexdigest() for vector in matrix]


async def table_names(db: Any) -> list[str]:
    """Every table in a LanceDB database (``list_tables`` is paginated)."""
    names: list[str] = []
    page: str | None = None
    while True:
        response = await db.list_tables(page_token=page)
        names.extend(response.tables)
        page = response.page_token
        if not page:
            return names


async def has_index(table: Any, column: str) -> bool:
    return any(column in ix.columns for ix in await table.list_indices())


async def hybrid_search(
    table: Any, vector: Sequence[float], text: str, where: str, limit: int, *, fts: bool,
    min_score: float | None = None, digests: bool = False,
) -> list[dict[str, Any]]:
    """Rows matching ``where``, best first, each with ``score`` (cosine) added
    (and ``vector_sha``, the vector's digest, with ``digests``).

    ``min_score`` drops candidates below that cosine before the top ``limit``
    are taken (so a keyword hit under the floor never takes a good row's place).

    Without a full-text index (a new table) or query text: vector search only.
    """
    query = np.asarray(vector, dtype=np.float32)
    pool = pool_size(limit)
    vector_leg = (table.query().nearest_to(query).distance_type("cosine").where(where)
                  .nprobes(NPROBES).refine_factor(REFINE_FACTOR).limit(pool).to_arrow())
    if fts and text.strip():
        text_leg = table.query().nearest_to_text(text).where(where).limit(pool).to_arrow()
        by_vector, by_text = await asyncio.gather(vector_leg, text_leg)
    else:
        by_vector, by_text = await vector_leg, None
    rows: dict[str, dict[str, Any]] = {}
    cosine: dict[str, float] = {}
    bm25: dict[str, float] = {}
    for leg in (by_vector, by_text):
        if leg is None or leg.num_rows == 0:
            continue
        scores = cosines(query, leg)
        shas = vector_digests(leg.column("vector")) if digests else [""] * len(scores)
        # The vector stays in Arrow: no caller needs it as Python floats.
        for row, score, sha in zip(leg.drop_columns(["vector"]).to_pylist(), scores, shas,
                                   strict=True):
            if digests:
                row["vector_sha"] = sha
            if row["id"] not in rows:
                rows[row["id"]] = row
                cosine[row["id"]] = float(score)
            if leg is by_text:
                bm25[row["id"]] = float(row["_score"])
    return [rows[i] | {"score": cosine[i]} for i in fuse(cosine, bm25, limit, min_score)]


def pool_size(limit: int) -> int:
    """Candidates per leg: a keyword hit outside the vector top-k still gets in."""
    return max(4 * limit, 20)


def fuse(cosine: dict[str, float], bm25: dict[str, float], limit: int,
         min_score: float | None) -> list[str]:
    """The ids of the best ``limit`` candidates, best first (the one fusion both paths use).

    ``cosine`` holds every candidate (vector leg first, in its order; ties keep
    it), ``bm25`` the text leg's scores. Rank: ``cosine + FTS_WEIGHT * bm25 /
    max bm25``; candidates under ``min_score`` (cosine) are dropped first.
    """
    top_bm25 = max(bm25.values(), default=0.0) or 1.0
    fused = [(score + FTS_WEIGHT * bm25.get(fact_id, 0.0) / top_bm25, fact_id)
             for fact_id, score in cosine.items()
             if min_score is None or score >= min_score]
    fused.sort(key=lambda pair: pair[0], reverse=True)
    return [fact_id for _, fact_id in fused[:limit]]


class Maintainer:
    """Keeps one table's indexes fresh, in a background task.

    ``poke()`` after a write schedules a run (debounced by ``delay_s``);
    ``run_now()`` does one pass at once (tests, benchmarks, import). Errors
    are logged: maintenance never breaks a write or a read.
    """

    def __init__(self, name: str, table: Callable[[], Any], *,
                 ann_threshold: int = ANN_THRESHOLD, delay_s: float = 2.0,
                 scalar: dict[str, ScalarIndex] | None = None) -> None:
        self.name = name
        self._scalar = scalar or {}
        self._table = table
        self._ann_threshold = ann_threshold
        self._delay_s = delay_s
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._dirty = False
        self.fts = False  # whether a full-text index exists (search uses hybrid)

    async def refresh(self) -> None:
        self.fts = await has_index(self._table(), "text")

    def poke(self) -> None:
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._later(), name=f"maintain {self.name}")

    async def _later(self) -> None:
        # Writes during a run set _dirty again: run once more, so none is left unindexed.
        while self._dirty:
            await asyncio.sleep(self._delay_s)
            self._dirty = False
            await self.run_now()

    async def run_now(self) -> None:
        async with self._lock:
            try:
                await self._run()
            except Exception:
                log.exception("maintenance of memory table %s failed", self.name)

    async def _run(self) -> None:
        table = self._table()
        rows = await table.count_rows()
        if rows == 0:
            return
        indexed = {c for ix in await table.list_indices() for c in ix.columns}
        if "text" not in indexed:
            await table.create_index("text", config=FTS(with_position=False))
        # Scalar indexes make the filters (user, trust, superseded) cheap: measured at
        # 100k rows, a filtered ANN search drops from 30.6 to 18.6 ms p50.
        for column, kind in self._scalar.items():
            if column not in indexed:
                await table.create_index(column, config=BTree() if kind == "btree" else Bitmap())
        await self._vector_index(table, rows)
        # Indexes new rows, compacts small fragments, drops versions older than a minute.
        await table.optimize(cleanup_older_than=timedelta(minutes=1))
        self.fts = True

    async def wait(self) -> None:
        """Wait for a scheduled run to finish (tests, benchmarks)."""
        if self._task is not None and not self._task.done():
            await self._task

    async def _vector_index(self, table: Any, rows: int) -> None:
        """Build the IvfPq index past the threshold; retrain it when the table has grown.

        ``optimize`` adds new rows to the existing partitions without retraining,
        so partitions sized for 10k rows would serve 1M poorly. The index name
        records the rows it was trained on (``vector_idx_<rows>``); past
        ``REBUILD_GROWTH`` times that, a new one is trained while the old one
        still serves, then the old one is dropped.
        """
        if rows < self._ann_threshold:
            return
        current = [ix.name for ix in await table.list_indices() if "vector" in ix.columns]
        trained = max((int(n.rsplit("_", 1)[1]) for n in current
                       if n.rsplit("_", 1)[1].isdigit()), default=0)
        if current and rows < REBUILD_GROWTH * trained:
            return
        await table.create_index("vector", name=f"vector_idx_{rows}", config=IvfPq(
            distance_type="cosine", num_partitions=max(1, int(rows**0.5)), num_sub_vectors=48))
        for name in current:
            await table.drop_index(name)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
