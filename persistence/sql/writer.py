"""One writer per database: writes that arrive together commit together.

Two kinds of write, both answered once the transaction that ran them has
committed (what they return is durable):

- ``execute(statement, params, key=None)``: one prepared Core statement and
  its parameters. Every write of a batch that shares a statement object runs
  as ONE executemany (an INSERT ... RETURNING gets its rows back in parameter
  order), so a burst of replies costs a few statements, not a few per reply.
  Writes with the same ``key`` on the same statement supersede each other: only
  the last queued runs and the earlier callers get its result (for
  last-writer-wins upserts, e.g. the recall log's one row per chat).
- ``write(job)``: a (synchronous) function of one SQLAlchemy ``Connection``,
  for anything else.

One task drains the queue: it takes every write waiting at that moment (up
to ``max_batch``) and runs them in one transaction, each statement group at
the place of its first write (groups touch different rows: their order
between each other does not matter), then commits once. If a write fails
before the commit, the batch is rolled back and its writes are run again one
transaction each, so only the failing write's caller gets its error (a job
must therefore do nothing but use its connection: it may run twice). If the
commit itself fails, every caller of that batch gets the error (it is not
retried: a commit whose answer was lost may have happened).

Why: on SQLite each reply used to open several write transactions (user
message, assistant message, usage row, recall log) from a pool of
connections, and most of the time in SQLite was the busy handler sleeping
for the write lock (issue 10). Here one connection holds the lock, takes it
with ``BEGIN IMMEDIATE`` (no deferred-lock upgrade to fail), and a burst of
replies costs one commit (one fsync) instead of one each. Savepoints per
write (two statements each, each a thread hop on aiosqlite) are gone: the
optimistic batch plus the one-by-one retry keeps a failure to its caller.
PostgreSQL gets the same batching, which saves round trips and commits.

Where a batch runs: given a synchronous ``Engine`` (SQLite, the stdlib
driver), each batch runs whole in one dedicated thread, so it costs the
event loop one wake-up instead of one per driver call (aiosqlite makes each
cursor, execute, fetch and close its own hop to its thread, and every hop
waits for a turn of a busy loop: a batch of 15 hops took 15 turns). Given an
``AsyncEngine`` (PostgreSQL, asyncpg), the same code runs on the loop through
``run_sync``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Executable
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[Connection], Any]
MAX_BATCH = 256


@dataclass(eq=False)
class _Write:
    done: asyncio.Future[Any]
    job: Job | None = None
    statement: Executable | None = None
    params: Mapping[str, Any] | None = None
    key: Hashable | None = None


class _BodyFailed(Exception):
    """A write of the batch failed before the commit (the batch rolled back)."""


class GroupWriter:
    """The single writer of one engine (see the module docstring)."""

    def __init__(self, engine: AsyncEngine | Engine, *, max_batch: int = MAX_BATCH) -> None:
        self._engine = engine
        # One thread, so the sync engine's one connection stays on it.
        self._thread = (ThreadPoolExecutor(1, thread_name_prefix="sql-writer")
                        if isinstance(engine, Engine) else None)
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Write] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # how many transactions committed (for tests and benchmarks)
        self.jobs = 0  # how many writes they carried
        self.statements = 0  # how many statements (or jobs) they executed

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="sql-group-writer")

    async def close(self) -> None:
        """Finish every write already queued, then stop."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._thread is not None:
            engine = self._engine
            assert isinstance(engine, Engine)
            # Closed on the thread that opened its connection.
            await asyncio.get_running_loop().run_in_executor(self._thread, engine.dispose)
            self._thread.shutdown()

    async def write(self, job: Callable[[Connection], T]) -> T:
        """Run ``job`` in the next group transaction; its result once committed."""
        result: T = await self._submit(_Write(self._future(), job=job))
        return result

    async def execute(
        self, statement: Executable, params: Mapping[str, Any], *, key: Hashable | None = None,
    ) -> Any:
        """Run ``statement`` with ``params`` in the next group transaction.

        Returns its RETURNING row (None without one) once committed. Pass the
        same statement object every time: that is what groups writes.
        """
        return await self._submit(_Write(self._future(), statement=statement, params=params,
                                         key=key))

    def _future(self) -> asyncio.Future[Any]:
        if self._task is None:
            raise RuntimeError("the writer is not started")
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # A caller cancelled while waiting never reads the outcome: mark it read.
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        return done

    async def _submit(self, write: _Write) -> Any:
        self._queue.put_nowait(write)
        # shield: a caller that gives up still has its write committed (or
        # failed) as one unit with the rest of its batch, never half-done.
        return await asyncio.shield(write.done)

    async def _drain(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit(self, batch: list[_Write]) -> None:
        try:
            results = await self._transaction(batch)
        except _BodyFailed as failed:
            if len(batch) == 1:
                _answer(batch[0].done, None, failed.__cause__ or failed)
                return
            # Someone's write failed: find whose, each in its own transaction.
            for write in batch:
                try:
                    (result,) = await self._transaction([write])
                except _BodyFailed as alone:
                    _answer(write.done, None, alone.__cause__ or alone)
                except Exception as exc:  # the commit failed: the caller gets it
                    _answer(write.done, None, exc)
                else:
                    _answer(write.done, result, None)
            return
        except Exception as exc:  # the commit failed: nothing of it is known to be kept
            log.warning("a group write of %d write(s) failed: %s", len(batch), type(exc).__name__)
            for write in batch:
                _answer(write.done, None, exc)
            return
        for write, result in zip(batch, results, strict=True):
            _answer(write.done, result, None)

    async def _transaction(self, batch: Sequence[_Write]) -> list[Any]:
        """Run ``batch`` in one transaction; each write's result, in order."""
        engine = self._engine
        if isinstance(engine, Engine):
            assert self._thread is not None
            results, statements = await asyncio.get_running_loop().run_in_executor(
                self._thread, _in_transaction, engine, batch)
        else:
            async with engine.begin() as connection:
                results, statements = await connection.run_sync(_run, batch)
        self.batches += 1
        self.jobs += len(batch)
        self.statements += statements
        return results


def _in_transaction(engine: Engine, batch: Sequence[_Write]) -> tuple[list[Any], int]:
    with engine.begin() as connection:
        return _run(connection, batch)


def _run(connection: Connection, batch: Sequence[_Write]) -> tuple[list[Any], int]:
    """Each write's result, in order, and how many statements ran.

    Raises ``_BodyFailed`` (the transaction is then rolled back) if one failed.
    """
    try:
        results: dict[int, Any] = {}
        groups: dict[int, list[int]] = {}  # id(statement) -> positions, first seen first
        order: list[int | Executable] = []
        for position, write in enumerate(batch):
            if write.statement is None:
                order.append(position)
            elif (group := groups.get(id(write.statement))) is None:
                groups[id(write.statement)] = [position]
                order.append(write.statement)
            else:
                group.append(position)
        for step in order:
            if isinstance(step, int):
                job = batch[step].job
                assert job is not None
                results[step] = job(connection)
            else:
                _group(connection, step, batch, groups[id(step)], results)
    except Exception as exc:
        raise _BodyFailed(type(exc).__name__) from exc
    return [results[position] for position in range(len(batch))], len(order)


def _group(connection: Connection, statement: Executable, batch: Sequence[_Write],
           positions: list[int], results: dict[int, Any]) -> None:
    # The last write of each key stands for the earlier ones.
    last: dict[Hashable, int] = {}
    for position in positions:
        if (key := batch[position].key) is not None:
            last[key] = position
    run = [p for p in positions if batch[p].key is None or last[batch[p].key] == p]
    result = connection.execute(statement, [dict(batch[p].params or {}) for p in run])
    # Only an explicit RETURNING answers the callers (PostgreSQL may return
    # the key of a single-row INSERT on its own).
    returning = bool(getattr(statement, "exported_columns", ()))
    rows = result.all() if returning else [None] * len(run)
    if len(rows) != len(run):
        raise RuntimeError(f"{len(rows)} rows returned for {len(run)} writes")
    for position, row in zip(run, rows, strict=True):
        results[position] = row
    for position in positions:
        if position not in results:
            results[position] = results[last[batch[position].key]]


def _answer(done: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(value)
    else:
        done.set_exception(error)
