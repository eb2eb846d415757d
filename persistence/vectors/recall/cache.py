"""Keeps each bot's ``Snapshot`` (``persistence/vectors/recall/scan.py``) current, within a budget.

Consistency: LanceDB stays the store of record. ``RecallCache.current``
reads the table's version and schema (``read_consistency_interval=0`` makes
them see other processes' commits; searches asking together share one read
that starts after they asked, see ``_state``) and answers with the snapshot
only when it is of exactly that version (and generation, see ``GENERATION_KEY``).
Otherwise the caller searches LanceDB while the snapshot catches up in the
background: by the difference in the current rows' ids (a delete, a
supersede, an add, index maintenance by anyone) or, when that is large, by a
full reload. So a row deleted by another process (CLI ``memory forget``,
another worker) is never recalled after its delete committed. This
process's own writes go through ``RecallCache.write``: when the write made
exactly the next version, the change is applied to the snapshot at once.
A snapshot's text index (``recall/text.py``) changes with it and is
committed (``Snapshot.settle``, in a worker thread) before the snapshot is
published at its new version, so both legs always answer for one version.

The shared table (``persistence/vectors/shared.py``) uses the same cache with
``prepare`` (its rows in the snapshot's shape: partition key, vector digests)
and ``delta=False``: a row edited in place outside the API keeps its id, so
only a full reload lets the hash check see the edit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyarrow as pa

from persistence.vectors.recall.scan import Snapshot
from persistence.vectors.tables import in_list

log = logging.getLogger(__name__)
T = TypeVar("T")
# Schema metadata: a random id a table gets when it is created or rewritten. Another
# process may drop a table and create it again, and its versions restart at 1: the
# version alone could match a snapshot of the old table.
GENERATION_KEY = b"boternity.generation"
CACHE_MB = 512  # default budget of one cache: ~290k memories of 384 dims
ROW_OVERHEAD = 340  # bytes per row besides the vector (its columns as Python values): measured


@functools.cache
def one_blas_thread() -> None:
    """Run numpy's BLAS on one thread, in this whole process (once).

    Measured on a busy 2-core machine: OpenBLAS spreads a 2,000 x 384
    matrix-vector product over its threads and took 3-27 ms waiting for
    them; on one thread it takes 0.07 ms. Nothing else here needs threaded
    BLAS (the model runs in onnxruntime, LanceDB in Rust), and scans of
    large tables already run in worker threads.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


class RecallCache:
    """Snapshots of memory tables within a byte budget; see the module docstring.

    ``budget_bytes`` caps the estimated memory of every snapshot together; a
    table that would pass it is not loaded (its searches use LanceDB).
    ``prepare`` turns read rows (``columns`` and the vector) into what
    ``Snapshot.add`` takes (``user``, ``chat``, ``superseded_by`` and the rest);
    it runs in a worker thread. ``delta=False``: never catch up by the
    difference in ids, reload instead. ``text``: snapshots carry a full-text
    index (the text leg in memory); without it, that leg stays in LanceDB.
    """

    def __init__(self, dim: int, *, budget_bytes: int, columns: Sequence[str],
                 prepare: Callable[[pa.Table], pa.Table] | None = None,
                 delta: bool = True, text: bool = True) -> None:
        self.dim = dim
        self._text = text
        self.budget = budget_bytes
        if budget_bytes > 0:
            one_blas_thread()
        self._columns = [*columns, "vector"]
        self._prepare = prepare or (lambda data: data)
        self._delta = delta
        self._snaps: dict[str, Snapshot] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._loading: dict[str, asyncio.Task[None]] = {}
        # bot -> (table, its state read that has not started yet: ``_state``)
        self._next: dict[str, tuple[Any, asyncio.Future[tuple[int, pa.Schema]]]] = {}
        self._too_big: dict[str, int] = {}  # bot -> the version found too big (not retried)
        self.reloads = 0  # how many snapshots were built (tests, benchmarks)

    def lock(self, bot: str) -> asyncio.Lock:
        return self._locks.setdefault(bot, asyncio.Lock())

    async def current(self, bot: str, table: Any) -> Snapshot | None:
        """The snapshot of exactly the table's current version, or None (use LanceDB)."""
        if self.budget <= 0:
            return None
        version, schema = await self._state(bot, table)
        snap = self._snaps.get(bot)
        if (snap is not None and snap.version == version
                and snap.generation == _generation(schema)):
            return snap
        if self._too_big.get(bot) != version:
            self.reload(bot, table)
        return None

    def _state(self, bot: str, table: Any) -> Awaitable[tuple[int, pa.Schema]]:
        """The table's (version, schema), read after this call was made.

        Searches that ask in the same turn of the event loop share one read
        (replies whose questions were embedded in one batch resume together:
        measured at 8 concurrent chats, ~2.6 checks a read). Each read starts
        after every one of its callers asked, so it sees every commit made
        before any of their searches began. Two LanceDB calls, each a round
        trip through LanceDB's threads and a wake-up of the loop: ~0.1 ms of
        the loop's CPU each.
        """
        pending = self._next.get(bot)
        if pending is None or pending[0] is not table:
            read = asyncio.ensure_future(self._read_state(bot, table))
            pending = self._next[bot] = (table, read)
        # shield: a caller cancelled (its reply given up) must not cancel the others' read
        return asyncio.shield(pending[1])

    async def _read_state(self, bot: str, table: Any) -> tuple[int, pa.Schema]:
        if self._next.get(bot, (None,))[0] is table:
            del self._next[bot]  # started: who asks from now on needs a later read
        # The version first, then the schema (not gathered): the generation read after
        # the version, so a table rebuilt meanwhile (versions restart at 1) cannot
        # pass with the old table's version number.
        version: int = await table.version()
        schema: pa.Schema = await table.schema()
        return version, schema

    def reload(self, bot: str, table: Any) -> None:
        """Build the snapshot again in the background (one build per bot at a time)."""
        task = self._loading.get(bot)
        if task is None or task.done():
            self._loading[bot] = asyncio.create_task(self._load(bot, table),
                                                     name=f"recall cache {bot}")

    async def wait(self, bot: str) -> None:
        """Wait for a running reload (tests, benchmarks)."""
        task = self._loading.get(bot)
        if task is not None:
            await asyncio.shield(task)

    async def _load(self, bot: str, table: Any) -> None:
        try:
            async with self.lock(bot):  # never between a write and its apply
                version, schema = await asyncio.gather(table.version(), table.schema())
                snap = self._snaps.get(bot)
                if snap is not None and snap.generation == _generation(schema):
                    if snap.version == version or (
                            self._delta and await self._catch_up(snap, table, version)):
                        return  # a write brought it up to date while this waited, or a delta
                rows: int = await table.count_rows()
                others = sum(s.nbytes for b, s in self._snaps.items() if b != bot)
                if others + rows * (4 * self.dim + ROW_OVERHEAD) > self.budget:
                    self._snaps.pop(bot, None)
                    self._too_big[bot] = version
                    log.info("recall cache: memories of bot %s (%d rows) pass the budget; "
                             "searched in LanceDB", bot, rows)
                    return
                # Batch by batch: the peak holds the snapshot and one batch, not the table twice.
                reader = await table.query().select(self._columns).to_batches(
                    max_batch_length=8192)
                snap = Snapshot.of(self._prepare(pa.Table.from_batches([], reader.schema)),
                                   version, _generation(schema), self.dim, text=self._text)
                async for batch in reader:
                    await asyncio.to_thread(self._add, snap, pa.Table.from_batches([batch]))
                if await table.version() != version:
                    return  # changed under the read: the next search asks again
                await asyncio.to_thread(snap.trim)
                await asyncio.to_thread(snap.settle)
                await asyncio.to_thread(_give_back_memory)
                self._snaps[bot] = snap
                self._too_big.pop(bot, None)
                self.reloads += 1
        except Exception:
            log.exception("recall cache: loading the memories of bot %s failed", bot)

    async def _catch_up(self, snap: Snapshot, table: Any, version: int) -> bool:
        """Bring ``snap`` to ``version`` by the difference in its current rows: read
        id, user and chat (not the vectors), kill what went, add what came. Index
        maintenance (anyone's) changes no row, so this finds nothing to do.
        False when that cannot be done cheaply (many new rows, a user changed)."""
        data = await table.query().where("superseded_by = ''").select(
            ["id", "user", "chat"]).to_arrow()
        if await table.version() != version:
            return False
        gone, new, moved = await asyncio.to_thread(_diff, snap, data)
        if len(new) > max(1_000, len(snap.where) // 4):
            return False  # as cheap to read it all
        rows = []
        for start in range(0, len(new) + len(moved), 256):  # bounded filter strings
            batch = (new + moved)[start:start + 256]
            rows.append(await table.query().where(in_list("id", batch)).select(
                self._columns).to_arrow())
        if await table.version() != version:
            return False
        snap.kill(gone + moved)  # a moved row is added again at its new place
        if rows:
            self._add(snap, pa.concat_tables(rows))
        await asyncio.to_thread(snap.settle)  # not yet at ``version``: searches use LanceDB
        snap.version = version
        return True

    def _add(self, snap: Snapshot, data: pa.Table) -> None:
        snap.add(self._prepare(data))

    async def write(self, bot: str, table: Any, op: Callable[[], Awaitable[T]],
                    apply: Callable[[Snapshot, T], None]) -> T:
        """Run one write (one LanceDB commit); mirror it into the snapshot when it
        made exactly the next version."""
        async with self.lock(bot):
            before = await table.version()
            result = await op()
            after = await table.version()
            snap = self._snaps.get(bot)
            if snap is None or after == before:
                return result
            if snap.version == before and after == before + 1:
                try:  # until it is at ``after``, searches use LanceDB
                    apply(snap, result)
                    await asyncio.to_thread(snap.settle)
                except Exception:  # the write itself is done: never fail it for the cache
                    self._snaps.pop(bot, None)  # half applied: built again by the next search
                    log.exception("recall cache: applying a write of bot %s failed", bot)
                    return result
                snap.version = after
                if snap.nbytes > self.budget:  # grown past it: LanceDB from now on
                    self._snaps.pop(bot, None)
                    self._too_big[bot] = after
            # else someone else wrote too: the snapshot stays at its version, and the
            # next search catches it up (``_load``)
            return result

    def drop(self, bot: str) -> None:
        self._snaps.pop(bot, None)
        self._too_big.pop(bot, None)

    async def close(self) -> None:
        for task in self._loading.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _give_back_memory() -> None:
    """Return freed heap to the OS after a load (glibc only; elsewhere nothing).

    Measured at 100k rows: glibc's arenas kept ~340 MB of the load's freed
    batches resident (RSS 944 MB, 605 MB after ``malloc_trim``; the snapshot is 178 MB).
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def new_generation(schema: pa.Schema) -> pa.Schema:
    """``schema`` for a table being created or rewritten: a fresh generation id."""
    return schema.with_metadata({**(schema.metadata or {}),
                                 GENERATION_KEY: uuid.uuid4().hex.encode()})


def _generation(schema: pa.Schema) -> bytes:
    generation: bytes = (schema.metadata or {}).get(GENERATION_KEY, b"")
    return generation


def _diff(snap: Snapshot, data: pa.Table) -> tuple[list[str], list[str], list[str]]:
    """(ids gone, ids new, ids moved to another user or chat): the snapshot against
    ``data`` (id, user, chat of the current rows of a newer version)."""
    seen: set[str] = set()
    new, moved = [], []
    for fact_id, user, chat in zip(data.column("id").to_pylist(), data.column("user").to_pylist(),
                                   data.column("chat").to_pylist(), strict=True):
        seen.add(fact_id)
        place = snap.where.get(fact_id)
        if place is None:
            new.append(fact_id)
        elif place[0] != (user, chat):
            moved.append(fact_id)
    return [i for i in snap.where if i not in seen], new, moved
