"""One writer per database: writes that arrive together commit together.

``execute(statement, params, key=None)`` takes one prepared Core statement
(an INSERT or an upsert) and its parameters, and answers once the
transaction that ran it has committed (what it returns is durable). Every
write of a batch that shares a statement object runs as ONE group: one
executemany (on SQLite an INSERT ... RETURNING runs once a row, its driver
keeping the statement prepared; on PostgreSQL it is one statement), each
caller getting its own row, so a burst of replies costs a few statements,
not a few per reply. Writes with the same ``key`` on the same statement supersede each
other: only the last queued runs and the earlier callers get its result (for
last-writer-wins upserts, e.g. the recall log's one row per chat).

One task drains the queue: it takes every write waiting at that moment (up
to ``max_batch``) and runs them in one transaction, each statement group at
the place of its first write (groups touch different rows: their order
between each other does not matter), then commits once. If a write fails
before the commit, the batch is rolled back and its writes are run again one
transaction each, so only the failing write's caller gets its error. If the
commit itself fails, every caller of that batch gets the error (it is not
retried: a commit whose answer was lost may have happened). Errors are
SQLAlchemy's (``sqlalchemy.exc``) on both backends.

Why: on SQLite each reply used to open several write transactions (user
message, assistant message, usage row, recall log) from a pool of
connections, and most of the time in SQLite was the busy handler sleeping
for the write lock (issue 10). Here one connection holds the lock, takes it
with ``BEGIN IMMEDIATE`` (no deferred-lock upgrade to fail), and a burst of
replies costs one commit (one fsync) instead of one each. Savepoints per
write (two statements each, each a thread hop on aiosqlite) are gone: the
optimistic batch plus the one-by-one retry keeps a failure to its caller.
PostgreSQL gets the same batching, which saves round trips and commits.

Where a batch runs: given a synchronous SQLite ``Engine`` (the stdlib
driver), each batch runs whole in one dedicated thread, so it costs the
event loop one wake-up instead of one per driver call (aiosqlite makes each
cursor, execute, fetch and close its own hop to its thread, and every hop
waits for a turn of a busy loop: a batch of 15 hops took 15 turns). That
thread holds one ``sqlite3`` connection and runs each statement as SQL that
SQLAlchemy compiled once (``prepare``, below): SQLAlchemy's own
execution of a reply's batch cost 2.5 times what the whole batch costs on
the driver, all of it holding the GIL the event loop needs. Given an ``AsyncEngine`` (PostgreSQL,
asyncpg), the batch runs through SQLAlchemy on the loop (``run_sync``).

Compiled once (``prepare``; the hot history read uses it too): SQLAlchemy
still writes the SQL, once per statement (for an INSERT, per set of
parameter names), and each run only converts values as SQLAlchemy would,
every bind through its type's ``bind_processor`` and every returned column
through its ``result_processor``. The Core statement stays the one source
of the SQL and of the schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Executable, PoolProxiedConnection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

log = logging.getLogger(__name__)

MAX_BATCH = 256
_REQUIRED = object()
# A group's statement and parameters -> the RETURNING row of each (None without one)
_Execute = Callable[[Executable, list[Mapping[str, Any]]], list[Any]]


@dataclass(eq=False)
class _Write:
    done: asyncio.Future[Any]
    statement: Executable
    params: Mapping[str, Any]
    key: Hashable | None = None


class _BodyFailed(Exception):
    """A write of the batch failed before the commit (the batch rolled back)."""


class GroupWriter:
    """The single writer of one engine (see the module docstring)."""

    def __init__(self, engine: AsyncEngine | Engine, *, max_batch: int = MAX_BATCH) -> None:
        self._engine = engine
        # One thread, so the SQLite connection stays on it.
        self._sqlite = _SqliteWriter(engine) if isinstance(engine, Engine) else None
        self._thread = (ThreadPoolExecutor(1, thread_name_prefix="sql-writer")
                        if self._sqlite is not None else None)
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Write] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # how many transactions committed (for tests and benchmarks)
        self.jobs = 0  # how many writes they carried
        self.statements = 0  # how many statement groups they ran

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
            assert self._sqlite is not None
            # Closed on the thread that opened its connection.
            await asyncio.get_running_loop().run_in_executor(self._thread, self._sqlite.close)
            self._thread.shutdown()

    async def execute(
        self, statement: Executable, params: Mapping[str, Any], *, key: Hashable | None = None,
    ) -> tuple[Any, ...] | None:
        """Run ``statement`` with ``params`` in the next group transaction.

        Returns its RETURNING row as a tuple (None without one) once committed.
        Pass the same statement object every time: that is what groups writes.
        ``params`` names every column the statement writes (on SQLite a
        default computed in Python is refused with ValueError).
        """
        if self._task is None:
            raise RuntimeError("the writer is not started")
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # A caller cancelled while waiting never reads the outcome: mark it read.
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue.put_nowait(_Write(done, statement, params, key))
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
        if self._sqlite is not None:
            assert self._thread is not None
            results, statements = await asyncio.get_running_loop().run_in_executor(
                self._thread, self._sqlite.transaction, batch)
        else:
            assert isinstance(engine, AsyncEngine)
            async with engine.begin() as connection:
                results, statements = await connection.run_sync(_in_sqlalchemy, batch)
        self.batches += 1
        self.jobs += len(batch)
        self.statements += statements
        return results


class _SqliteWriter:
    """The writer thread's one ``sqlite3`` connection, opened at its first batch.

    Only ever used from that thread. The engine's ``connect`` listeners set
    it up (WAL, busy timeout, the driver's own transactions off); each batch
    takes the write lock with ``BEGIN IMMEDIATE`` and runs every statement as
    its compiled SQL (``prepare``).
    """

    def __init__(self, engine: Engine) -> None:
        if engine.dialect.name != "sqlite":
            raise ValueError(f"a synchronous engine must be SQLite's, not {engine.dialect.name}")
        self._engine = engine
        self._connection: PoolProxiedConnection | None = None
        # (id(statement), parameter names) -> its SQL; the statement kept alive with it
        self._prepared: dict[tuple[int, tuple[str, ...]], tuple[Prepared, Executable]] = {}

    def transaction(self, batch: Sequence[_Write]) -> tuple[list[Any], int]:
        if self._connection is None:
            self._connection = self._engine.raw_connection()
        driver = self._connection.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        dialect = self._engine.dialect
        with translated("BEGIN IMMEDIATE", dialect):
            driver.execute("BEGIN IMMEDIATE")
        try:
            done = _run(batch, lambda statement, params: self._group(driver, statement, params))
        except _BodyFailed:
            with translated("ROLLBACK", dialect):
                driver.rollback()
            raise
        try:
            with translated("COMMIT", dialect):
                driver.commit()
        except BaseException:
            # A failed commit must not leave the transaction (and the lock) open.
            with contextlib.suppress(sqlite3.Error):
                driver.rollback()
            raise
        return done

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self._engine.dispose()

    def _group(self, driver: sqlite3.Connection, statement: Executable,
               params: list[Mapping[str, Any]]) -> list[Any]:
        names = tuple(params[0])
        found = self._prepared.get((id(statement), names))
        if found is None:
            found = (prepare(statement, self._engine.dialect, names), statement)
            self._prepared[(id(statement), names)] = found
        prepared = found[0]
        rows = [prepared.args(p) for p in params]
        with (translated(prepared.sql, self._engine.dialect),
              contextlib.closing(driver.cursor()) as cursor):
            if not prepared.returns_rows:
                cursor.executemany(prepared.sql, rows)
                return [None] * len(rows)
            # One execution a row (SQLite keeps the statement prepared): each
            # caller gets its own row back, in order.
            returned = []
            for args in rows:
                got = cursor.execute(prepared.sql, args).fetchall()
                if len(got) != 1:
                    raise RuntimeError(f"{len(got)} rows returned for one write")
                returned.extend(prepared.rows(got))
            return returned


def _in_sqlalchemy(connection: Connection, batch: Sequence[_Write]) -> tuple[list[Any], int]:
    def group(statement: Executable, params: list[Mapping[str, Any]]) -> list[Any]:
        result = connection.execute(statement, [dict(p) for p in params])
        # Only an explicit RETURNING answers the callers (PostgreSQL may return
        # the key of a single-row INSERT on its own).
        if not getattr(statement, "exported_columns", ()):
            return [None] * len(params)
        return [tuple(row) for row in result.all()]

    return _run(batch, group)


def _run(batch: Sequence[_Write], execute: _Execute) -> tuple[list[Any], int]:
    """Each write's result, in order, and how many statement groups ran.

    Raises ``_BodyFailed`` (the caller then rolls back) if one failed.
    """
    try:
        groups: dict[int, list[int]] = {}  # id(statement) -> positions, first seen first
        for position, write in enumerate(batch):
            groups.setdefault(id(write.statement), []).append(position)
        results: dict[int, Any] = {}
        for positions in groups.values():
            # The last write of each key stands for the earlier ones.
            last: dict[Hashable, int] = {}
            for position in positions:
                if (key := batch[position].key) is not None:
                    last[key] = position
            run = [p for p in positions if batch[p].key is None or last[batch[p].key] == p]
            rows = execute(batch[positions[0]].statement, [batch[p].params for p in run])
            if len(rows) != len(run):
                raise RuntimeError(f"{len(rows)} rows returned for {len(run)} writes")
            results.update(zip(run, rows, strict=True))
            for position in positions:
                if position not in results:
                    results[position] = results[last[batch[position].key]]
    except Exception as exc:
        raise _BodyFailed(type(exc).__name__) from exc
    return [results[position] for position in range(len(batch))], len(groups)


def _answer(done: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(value)
    else:
        done.set_exception(error)


@dataclass(frozen=True)
class Prepared:
    """One statement's driver SQL and how to convert its values."""

    sql: str
    # (name, default or _REQUIRED, converter) for each parameter, in position order
    binds: tuple[tuple[str, Any, Callable[[Any], Any] | None], ...]
    # (column index, converter) for each returned column whose type converts one
    changes: tuple[tuple[int, Callable[[Any], Any]], ...]
    returns_rows: bool

    def args(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        """The positional arguments for ``params``; KeyError if a required one is missing."""
        values = []
        for name, default, convert in self.binds:
            value = params[name] if default is _REQUIRED else params.get(name, default)
            values.append(value if convert is None else convert(value))
        return tuple(values)

    def rows(self, raw: Iterable[Sequence[Any]]) -> list[tuple[Any, ...]]:
        """The driver's rows as tuples, each converted column as SQLAlchemy returns it."""
        if not self.changes:
            return [tuple(row) for row in raw]
        converted: list[tuple[Any, ...]] = []
        for row in raw:
            values = list(row)
            for i, convert in self.changes:
                values[i] = convert(values[i])
            converted.append(tuple(values))
        return converted


def prepare(statement: Executable, dialect: Dialect,
            keys: Sequence[str] | None = None) -> Prepared:
    """``statement`` compiled for ``dialect`` (an INSERT for the parameter names ``keys``).

    Only for a dialect with positional parameters (SQLite's ``?``). Raises
    ValueError for a statement that needs SQLAlchemy at each execution: a
    column default computed in Python, or a parameter rendered into the SQL.
    """
    assert isinstance(statement, ClauseElement)  # every Executable SQLAlchemy makes is one
    compiled = statement.compile(dialect=dialect, column_keys=list(keys) if keys else None)
    assert isinstance(compiled, SQLCompiler)  # a statement's, not DDL's
    if compiled.positiontup is None:
        raise ValueError(f"{dialect.name}: named parameters, not positional")
    if (compiled.insert_prefetch or compiled.update_prefetch or compiled.post_compile_params
            or compiled.literal_execute_params):
        raise ValueError("the statement needs SQLAlchemy's execution (a Python-side default "
                         "or a parameter rendered into the SQL): pass every column's value")
    binds = []
    for name in compiled.positiontup:
        bind = compiled.binds[name]
        # A bind with its own value (e.g. the OFFSET 0 SQLite adds after LIMIT) has a default.
        default = _REQUIRED if bind.required else bind.effective_value
        binds.append((name, default, bind.type.dialect_impl(dialect).bind_processor(dialect)))
    columns = getattr(statement, "exported_columns", ())
    convert = (column.type.dialect_impl(dialect).result_processor(dialect, None)
               for column in columns)
    changes = tuple((i, f) for i, f in enumerate(convert) if f is not None)
    return Prepared(str(compiled), tuple(binds), changes, bool(columns))


@contextlib.contextmanager
def translated(sql: str, dialect: Dialect) -> Iterator[None]:
    """The driver's errors as SQLAlchemy's (``sqlalchemy.exc``, as its own
    execution raises them), without the parameters (people's messages) in
    their text."""
    dbapi_error = dialect.loaded_dbapi.Error
    try:
        yield
    except dbapi_error as exc:
        raise DBAPIError.instance(sql, None, exc, dbapi_error, hide_parameters=True,
                                  dialect=dialect) from exc
