"""The relational database: one async engine, migrated to head at start.

``Database(url)`` is an async context manager. Entering it creates the data
directory (SQLite), opens the engine (``sqlite+aiosqlite`` or
``postgresql+asyncpg``) and applies every Alembic migration; leaving it
disposes of the engine. SQLite runs in WAL mode with a busy timeout so
readers never block the writer and concurrent writers wait instead of
failing with "database is locked".

Alembic is synchronous, so the upgrade runs in a worker thread on its own
short-lived engine and event loop: the serving loop is never blocked.
The URL may hold a password: it is never logged nor put in an error.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Hashable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import sqlalchemy
from sqlalchemy import (
    Column,
    Executable,
    MetaData,
    PrimaryKeyConstraint,
    Select,
    String,
    Table,
    event,
    make_url,
    pool,
    text,
)
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry, PoolResetState

from engine.errors import StorageError
from persistence.sql.migrations import HEAD, TABLES
from persistence.sql.tables import Base
from persistence.sql.writer import GroupWriter, Prepared, prepare

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 15_000
# Readers on SQLite: WAL lets them run beside the writer; each aiosqlite
# connection is a thread, so the pool is bounded (it grew to 57 under load).
SQLITE_READERS = 4
# PostgreSQL: a fixed pool, no overflow. With the default (5 + 10 overflow)
# eight concurrent replies opened and closed an overflow connection per read
# (59 new connections in 480 replies, each a login and SQLAlchemy's set-up
# queries); waiting a moment for a pooled one costs far less.
POSTGRES_POOL = 16
WAL_SWITCH_ATTEMPTS = 100  # x 50 ms: 5 s for a rival start to finish its switch
MIGRATION_LOCK = 0x626F7465  # any fixed key; "bote"


def _safe(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # busy_timeout first: switching to WAL itself needs the lock.
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    _switch_to_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another process switches a new file.

    Workers that open a new database file at the same moment race to switch
    it to WAL; SQLite answers "database is locked" at once, without the busy
    handler, to the one whose switch would deadlock with the other's (4 of 60
    starts of three workers failed so). Once one has switched, the pragma is
    a no-op for the others, so a short retry is enough. It only happens on a
    new file, which ``Database.migrate`` opens in its own thread: the sleep
    never holds up a serving event loop.
    """
    for attempt in range(WAL_SWITCH_ATTEMPTS):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:  # aiosqlite re-raises sqlite3's own
            if "locked" not in str(exc) or attempt == WAL_SWITCH_ATTEMPTS - 1:
                raise
            time.sleep(0.05)


def storable(text: str, what: str = "text") -> str:
    """``text`` without what a text column cannot hold, said in the log.

    PostgreSQL refuses NUL in text (and the whole INSERT with it: the message
    would be lost and "try again" could never succeed); no UTF-8 column holds
    a lone surrogate. Both go on every backend, so a chat reads the same on
    SQLite and PostgreSQL.
    """
    # Nearly always clean, which two scans in C tell (a Python loop over the
    # characters took 75 us of the event loop for a 2 KB answer).
    if "\x00" not in text and (text.isascii() or _encodes(text)):
        return text
    nul = text.count("\x00")
    broken = sum(1 for c in text if "\ud800" <= c <= "\udfff")
    log.warning("could not store %d NUL and %d lone surrogate character(s) of a %s: NUL "
                "removed, the others replaced with U+FFFD", nul, broken, what)
    text = text.replace("\x00", "")
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _encodes(text: str) -> bool:
    """Whether ``text`` is valid UTF-8 once encoded: only a lone surrogate is not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def create_engine(url: str | URL, **kwargs: Any) -> AsyncEngine:
    """An async engine; SQLite ones get WAL and a busy timeout on every connection."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database or ""
        if db and db != ":memory:" and not db.startswith("file:"):
            Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def alembic_config() -> Config:
    # Alembic is imported here, not at the top: only the migration (in a worker
    # thread) needs it, and one-shot commands start faster without it.
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def _upgrade(connection: Connection) -> None:
    from alembic import command

    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _to_head(connection: Connection) -> None:
    """Bring the database to ``HEAD``: nothing when it is there (Alembic is not
    imported), the schema at head in one go when it is new, else the migrations."""
    current = _current(connection)
    if current == HEAD:
        return
    if connection.dialect.name == "postgresql":
        # Several workers may start at once: one migrates, the others wait
        # here (the lock lasts until this transaction ends), then find head.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        current = _current(connection)  # as the worker before us left it
        if current == HEAD:
            return
    if (current is None and set(Base.metadata.tables) == TABLES
            and not sqlalchemy.inspect(connection).get_table_names()):
        _create_at_head(connection)
    else:
        _upgrade(connection)


def _create_at_head(connection: Connection) -> None:
    """A new, empty database: the tables as the models declare them, stamped ``HEAD``.

    Alembic's recipe for a database built from scratch (create_all, then
    stamp), without importing Alembic (~0.2 s of a first start, e.g. a new
    user's first ``boternity chat``). Only when ``Base`` declares every table
    of ``TABLES`` (the modules declaring them import this one, so the caller
    imports them: the wiring does). The models equal the migrations' result:
    tests/test_database.py reflects both schemas and compares them.
    """
    Base.metadata.create_all(connection)
    version = Table("alembic_version", MetaData(),  # as Alembic creates it
                    Column("version_num", String(32), nullable=False),
                    PrimaryKeyConstraint("version_num", name="alembic_version_pkc"))
    version.create(connection)
    connection.execute(version.insert().values(version_num=HEAD))


def _current(connection: Connection) -> str | None:
    # Read as Alembic keeps it (one row in a linear history), without importing Alembic.
    if not sqlalchemy.inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _rollback_if_open(dbapi_connection: Any, record: ConnectionPoolEntry,
                      state: PoolResetState) -> None:
    """The pool's reset of an aiosqlite connection: a rollback only if a
    transaction is open. A hot read runs outside any transaction (the driver
    begins one only before a write), and the pool's default rollback cost the
    event loop a thread hop per read."""
    if state.asyncio_safe and not state.transaction_was_reset:
        driver = record.driver_connection
        if driver is not None and driver.in_transaction:
            dbapi_connection.rollback()


def _sqlite_driver_autocommit(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # we say BEGIN ourselves (below)


def _sqlite_begin_immediate(connection: Connection) -> None:
    # Take the write lock up front: a second process starting at the same
    # time waits (busy timeout), then finds the schema at head. Without it,
    # sqlite3 runs DDL outside any transaction and both would create tables.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


async def _migrate(url: URL) -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_driver_autocommit)
        event.listen(engine.sync_engine, "begin", _sqlite_begin_immediate)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_to_head)
    finally:
        await engine.dispose()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


class Database:
    """The engine, a session factory and the group writer, migrated to head while entered.

    The hot-path writes (messages, usage rows, the recall log) go through
    ``execute``: one writer per database commits what arrives together in one
    transaction (``persistence.sql.writer``). On SQLite the writer has its own
    thread and stdlib ``sqlite3`` connection, which takes the lock with
    ``BEGIN IMMEDIATE``; readers use the aiosqlite pool (``read`` for the hot
    one-statement reads).
    """

    def __init__(self, url: str | URL, *, echo: bool = False) -> None:
        self.url = make_url(url)
        self._echo = echo
        self._engine: AsyncEngine | None = None
        self._reads: AsyncEngine | None = None
        self._prepared: dict[int, tuple[Prepared, Select[Any]]] = {}
        self._writer_engine: sqlalchemy.Engine | None = None
        self._writer: GroupWriter | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise StorageError("database is not started (use 'async with Database(...)')")
        return self._engine

    @property
    def reads(self) -> AsyncEngine:
        """The engine for one-statement reads on the hot path (a reply's history).

        On PostgreSQL its connections run in autocommit: no BEGIN before the
        SELECT and no ROLLBACK when it goes back to the pool, two round trips
        fewer per read. On SQLite it is ``engine`` (switching a pooled aiosqlite
        connection's mode costs a thread hop each way, more than it saves).
        """
        return self._reads or self.engine

    async def read(
        self, statement: Select[Any], params: Mapping[str, Any]
    ) -> list[tuple[Any, ...]]:
        """The rows of one prepared SELECT, as tuples, on the ``reads`` engine.

        On SQLite the statement runs as ONE call of the aiosqlite driver
        (``execute_fetchall``): through SQLAlchemy's adapter a query is four
        thread hops (cursor, execute, fetch, close), each a wake-up of the
        event loop. It is compiled by SQLAlchemy once, and each column's
        result type converts the raw values as SQLAlchemy would have
        (``persistence.sql.writer.prepare``).
        Raises ``SQLAlchemyError`` or, on SQLite, ``sqlite3.Error``.
        """
        async with self.reads.connect() as connection:
            if self.dialect != "sqlite":
                return [tuple(row) for row in await connection.execute(statement, params)]
            prepared = self._prepared.get(id(statement))
            if prepared is None:
                # Keep the statement alive with its SQL: the key is its id().
                prepared = self._prepared[id(statement)] = (
                    prepare(statement, connection.dialect), statement)
            driver = (await connection.get_raw_connection()).driver_connection
            assert driver is not None  # a checked-out connection always has one
            rows = await driver.execute_fetchall(prepared[0].sql, prepared[0].args(params))
        return prepared[0].rows(rows)

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        """Session factory; ``expire_on_commit=False`` so rows stay readable after commit."""
        if self._sessions is None:
            raise StorageError("database is not started (use 'async with Database(...)')")
        return self._sessions

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    async def migrate(self) -> None:
        """Apply every pending migration (idempotent)."""
        try:
            # A thread with its own loop: Alembic's sync API calls into the
            # async driver through SQLAlchemy's greenlet bridge there.
            await asyncio.to_thread(asyncio.run, _migrate(self.url))
        except (SQLAlchemyError, OSError) as exc:
            raise StorageError(
                f"database {_safe(self.url)}: migration failed: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc

    async def revision(self) -> str | None:
        """The revision the database is at (None before the first migration)."""
        async with self.engine.connect() as connection:
            return await connection.run_sync(_current)

    async def ping(self) -> bool:
        """``SELECT 1`` on a pooled connection: the readiness check of ``/readyz``."""
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return True

    @property
    def writer(self) -> GroupWriter:
        if self._writer is None:
            raise StorageError("database is not started (use 'async with Database(...)')")
        return self._writer

    async def execute(self, statement: Executable, params: Mapping[str, Any], *,
                      key: Hashable | None = None) -> tuple[Any, ...] | None:
        """One prepared statement in the next group transaction (``GroupWriter.execute``)."""
        return await self.writer.execute(statement, params, key=key)

    async def start(self) -> None:
        await self.migrate()
        if self.dialect == "sqlite":
            self._engine = create_engine(self.url, echo=self._echo,
                                         poolclass=pool.AsyncAdaptedQueuePool,
                                         pool_size=SQLITE_READERS, max_overflow=0,
                                         pool_reset_on_return=None)
            event.listen(self._engine.sync_engine, "reset", _rollback_if_open)
            # The writer's one connection is the stdlib driver's, used by the
            # writer's own thread only: a batch runs there whole (one wake-up
            # of the loop; see persistence.sql.writer).
            self._writer_engine = sqlalchemy.create_engine(
                self.url.set(drivername="sqlite"), echo=self._echo, poolclass=pool.QueuePool,
                pool_size=1, max_overflow=0)
            event.listen(self._writer_engine, "connect", _sqlite_pragmas)
            # The writer says BEGIN IMMEDIATE itself: the lock is taken up front,
            # and the driver's own transaction handling would start it deferred.
            event.listen(self._writer_engine, "connect", _sqlite_driver_autocommit)
        else:
            self._engine = create_engine(self.url, echo=self._echo, pool_size=POSTGRES_POOL,
                                         max_overflow=0)
            # A view of the same pool: the mode is set on checkout, reset on return.
            self._reads = self._engine.execution_options(isolation_level="AUTOCOMMIT")
        self._writer = GroupWriter(self._writer_engine or self._engine)
        self._writer.start()
        self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)
        log.info("database ready: %s at revision %s", _safe(self.url), await self.revision())

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()
        self._writer = None
        self._writer_engine = None  # the writer disposed of it on its thread
        if self._engine is not None:
            await self._engine.dispose()
        self._engine = None
        self._reads = None
        self._sessions = None

    async def __aenter__(self) -> Database:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
