"""One writer per database: writes that arrive together commit together.

``GroupWriter.write(job)`` queues ``job`` (an async function of one
``AsyncConnection``) and returns its result once the transaction that ran it
has committed: what ``write`` returns is durable. One task drains the queue:
it takes every job waiting at that moment (up to ``max_batch``), runs each in
its own SAVEPOINT inside one transaction, commits once, and answers every
caller. A job that fails is rolled back to its savepoint and its caller gets
the error; the others still commit. If the commit itself fails, every caller
of that batch gets the error.

Why: on SQLite each reply used to open several write transactions (user
message, assistant message, usage row, recall log) from a pool of
connections, and most of the time in SQLite was the busy handler sleeping
for the write lock (issue 10). Here one connection holds the lock, takes it
with ``BEGIN IMMEDIATE`` (no deferred-lock upgrade to fail), and a burst of
replies costs one commit (one fsync) instead of one each. PostgreSQL gets
the same batching, which saves a round trip and a commit per write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[AsyncConnection], Awaitable[Any]]
MAX_BATCH = 256


class GroupWriter:
    """The single writer of one engine (see the module docstring)."""

    def __init__(self, engine: AsyncEngine, *, max_batch: int = MAX_BATCH) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[Job, asyncio.Future[Any]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # how many transactions committed (for tests and benchmarks)
        self.jobs = 0  # how many jobs they carried

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="sql-group-writer")

    async def close(self) -> None:
        """Finish every job already queued, then stop."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def write(self, job: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``job`` in the next group transaction; its result once committed."""
        if self._task is None:
            raise RuntimeError("the writer is not started")
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        # A caller cancelled while waiting never reads the outcome: mark it read.
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue.put_nowait((job, done))
        # shield: a caller that gives up still has its write committed (or
        # failed) as one unit with the rest of its batch, never half-done.
        return await asyncio.shield(done)

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

    async def _commit(self, batch: list[tuple[Job, asyncio.Future[Any]]]) -> None:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            async with self._engine.begin() as connection:
                if len(batch) == 1:
                    # Alone, a job needs no savepoint: if it fails, the whole
                    # transaction is its own (two statements fewer per write).
                    job, done = batch[0]
                    results.append((done, await job(connection), None))
                else:
                    for job, done in batch:
                        savepoint = await connection.begin_nested()
                        try:
                            value = await job(connection)
                        except Exception as exc:  # the job's own error: only its caller's
                            await savepoint.rollback()
                            results.append((done, None, exc))
                        else:
                            await savepoint.commit()
                            results.append((done, value, None))
        except Exception as exc:  # the transaction failed: nothing of it committed
            log.warning("a group write of %d job(s) failed: %s", len(batch), type(exc).__name__)
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        self.batches += 1
        self.jobs += len(batch)
        for done, value, error in results:
            if done.done():
                continue
            if error is None:
                done.set_result(value)
            else:
                done.set_exception(error)
