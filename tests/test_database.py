"""Migrations build the schema from nothing; the store keeps history in order.

Real SQLite files in tmp dirs (tests/test_postgres.py runs the same on PostgreSQL).
"""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, NullPool, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from adapters.wiring.build import TABLE_MODULES
from engine.errors import StorageError
from persistence.sql.conversations import SqlConversationStore
from persistence.sql.database import Database, _upgrade, head_revision
from persistence.sql.migrations import HEAD, TABLES
from persistence.sql.recall_log import SqlRecallLog

ROOT = Path(__file__).resolve().parent.parent


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


async def test_migrations_create_schema_from_scratch(tmp_path: Path) -> None:
    db_file = tmp_path / "nested" / "dir" / "boternity.db"
    async with Database(sqlite_url(db_file)) as db:
        assert db_file.exists()
        assert await db.revision() == head_revision()
        async with db.engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            columns = await conn.run_sync(
                lambda c: {col["name"] for col in inspect(c).get_columns("messages")}
            )
            indexes = await conn.run_sync(
                lambda c: {ix["name"] for ix in inspect(c).get_indexes("messages")}
            )
    assert {"messages", "alembic_version"} <= tables
    assert {"id", "bot", "chat", "role", "content", "user", "platform",
            "served_by", "created_at"} <= columns
    assert "ix_messages_bot_platform_chat_id" in indexes


async def test_restart_is_idempotent_and_keeps_data(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "b.db")
    async with Database(url) as db:
        await SqlConversationStore(db).add(bot="b", chat="c", role="user", content="kept")
    async with Database(url) as db:
        history = await SqlConversationStore(db).history("b", "c")
        assert [m.content for m in history] == ["kept"]
        assert await db.revision() == head_revision()


def test_head_constant_is_alembics_head() -> None:
    # A new migration that forgets to move HEAD would be skipped on existing databases.
    assert HEAD == head_revision()


async def test_a_start_at_head_does_not_import_alembic(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "a.db")
    async with Database(url):
        pass  # the first start creates it
    assert await _start_in_a_new_process(url, "db.ping()") == ["True", "[]"]


async def _start_in_a_new_process(url: str, show: str, first: str = "") -> list[str]:
    """Start ``Database(url)`` in a fresh interpreter (after running ``first``);
    print ``await <show>``, then the Alembic modules it imported."""
    code = (
        f"import asyncio, sys\n{first}\n"
        "from persistence.sql.database import Database\n"
        "async def main():\n"
        f"    async with Database({url!r}) as db:\n"
        f"        print(await {show})\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))\n")
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code], cwd=ROOT,
                                   capture_output=True, text=True, check=True)
    return done.stdout.split("\n")[:2]


async def test_sqlite_runs_in_wal_mode_with_busy_timeout(tmp_path: Path) -> None:
    async with Database(sqlite_url(tmp_path / "w.db")) as db, db.engine.connect() as conn:
        assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
        assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar() == 15000


async def test_a_reader_given_back_in_a_transaction_is_rolled_back(tmp_path: Path) -> None:
    """The readers' pool rolls back only a connection with a transaction open (a
    hot read has none, and a rollback was a thread hop per read): one is still
    never pooled holding SQLite's write lock or its uncommitted rows."""
    async with Database(sqlite_url(tmp_path / "r.db")) as db:
        async with db.engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            await driver.execute("INSERT INTO recall_log (bot, chat, message_id, query, facts, "
                                 "created_at) VALUES ('b', 'c', '', '', '[]', '2024-01-01')")
            assert driver.in_transaction
        assert not driver.in_transaction
        assert await SqlRecallLog(db).last("b", "c") is None


async def test_history_is_per_chat_oldest_first_and_limited(tmp_path: Path) -> None:
    async with Database(sqlite_url(tmp_path / "h.db")) as db:
        store = SqlConversationStore(db)
        for i in range(5):
            await store.add(bot="b", chat="c1", role="user", content=f"m{i}", user="u")
        await store.add(bot="b", chat="c2", role="user", content="other chat")
        await store.add(bot="other", chat="c1", role="user", content="other bot")
        await store.add(bot="b", chat="c1", role="assistant", content="a", served_by="p")
        last3 = await store.history("b", "c1", limit=3)
        assert [m.content for m in last3] == ["m3", "m4", "a"]
        assert last3[-1].served_by == "p" and last3[-1].role == "assistant"
        assert last3[0].created_at is not None and last3[0].created_at.tzinfo is not None
        assert await store.count("b", "c1") == 6
        assert await store.history("b", "c1", limit=0) == []


async def test_concurrent_writers_do_not_fail(tmp_path: Path) -> None:
    async with Database(sqlite_url(tmp_path / "c.db")) as db:
        store = SqlConversationStore(db)
        await asyncio.gather(*(
            store.add(bot="b", chat="c", role="user", content=str(i)) for i in range(40)
        ))
        assert await store.count("b", "c") == 40


async def test_huge_message_is_stored_whole(tmp_path: Path) -> None:
    big = "x" * 200_000
    async with Database(sqlite_url(tmp_path / "big.db")) as db:
        store = SqlConversationStore(db)
        await store.add(bot="b", chat="c", role="user", content=big)
        assert (await store.history("b", "c"))[0].content == big


async def test_unusable_database_is_a_clear_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError) as err:
        async with Database(sqlite_url(blocker / "x.db")):
            pass
    assert "migration failed" in str(err.value) or "database" in str(err.value)


async def test_store_before_start_is_a_clear_error() -> None:
    with pytest.raises(StorageError, match="not started"):
        await SqlConversationStore(Database("sqlite+aiosqlite://")).history("b", "c")


async def test_workers_starting_together_migrate_once(database_url: str) -> None:
    """Several processes may start at once on one database (scale-out)."""
    databases = [Database(database_url) for _ in range(3)]
    await asyncio.gather(*(db.migrate() for db in databases))
    async with databases[0] as db:
        assert await db.revision() == head_revision()
        await SqlConversationStore(db).add(bot="b", chat="c", role="user", content="ok")


async def test_workers_racing_to_create_a_new_sqlite_file_all_start(tmp_path: Path) -> None:
    """Three workers opening the same new SQLite file at once all migrate.

    Their switches to WAL race; SQLite answered the loser "database is
    locked" at once, without waiting (4 of 60 such starts failed, and the
    test above failed in CI so). Forty fresh files make the race likely.
    """
    for round_ in range(40):
        url = sqlite_url(tmp_path / f"race-{round_}.db")
        databases = [Database(url) for _ in range(3)]
        await asyncio.gather(*(db.migrate() for db in databases))
        async with databases[0] as db:
            assert await db.revision() == head_revision()


def _schema(connection: Connection) -> dict[str, Any]:
    """Everything reflection sees of every table, and the stamped revision."""
    found = inspect(connection)
    schema: dict[str, Any] = {
        name: {
            "columns": [(c["name"], str(c["type"]), c["nullable"], c.get("default"))
                        for c in found.get_columns(name)],
            "primary key": found.get_pk_constraint(name),
            "indexes": sorted((i["name"] or "", tuple(i["column_names"]), bool(i["unique"]))
                              for i in found.get_indexes(name)),
            "unique": sorted((u["name"] or "", tuple(u["column_names"]))
                             for u in found.get_unique_constraints(name)),
            "foreign keys": found.get_foreign_keys(name),
            "checks": found.get_check_constraints(name),
        }
        for name in sorted(found.get_table_names())
    }
    schema["revision"] = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    return schema


def _drop_everything(connection: Connection) -> None:
    for name in inspect(connection).get_table_names():
        connection.execute(text(f'DROP TABLE "{name}"'))


async def test_a_new_database_gets_the_schema_the_migrations_build(database_url: str) -> None:
    """A new database is created at head from the models (no Alembic); that
    schema must be, column for column, what the migrations build one by one."""
    for module in TABLE_MODULES:  # every table declared, as the wiring starts it
        importlib.import_module(module)
    engine = create_async_engine(database_url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_upgrade)  # the migrations, as an old database gets them
            migrated = await connection.run_sync(_schema)
            await connection.run_sync(_drop_everything)
        async with Database(database_url) as db, db.engine.connect() as connection:
            created = await connection.run_sync(_schema)
    finally:
        await engine.dispose()
    assert migrated["revision"] == [(HEAD,)]
    assert set(migrated) - {"revision", "alembic_version"} == TABLES
    assert created == migrated


async def test_a_new_database_is_created_without_alembic(tmp_path: Path) -> None:
    """As the wiring starts it: the modules declaring the tables imported first."""
    first = f"import {', '.join(TABLE_MODULES)}"
    assert await _start_in_a_new_process(sqlite_url(tmp_path / "new.db"), "db.revision()",
                                         first) == [HEAD, "[]"]


async def test_a_bare_start_of_a_new_database_migrates_it_whole(tmp_path: Path) -> None:
    """Without every table declared, a new database is built by the migrations."""
    url = sqlite_url(tmp_path / "bare.db")
    revision, alembic = await _start_in_a_new_process(url, "db.revision()")
    assert revision == HEAD and "alembic" in alembic
    async with Database(url) as db, db.engine.connect() as connection:
        tables = await connection.run_sync(lambda c: set(inspect(c).get_table_names()))
    assert tables == TABLES | {"alembic_version"}
