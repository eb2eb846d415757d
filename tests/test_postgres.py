"""The relational layer on SQLite AND the real PostgreSQL (127.0.0.1:5432).

Same SQLAlchemy code, same Alembic migrations: every test here takes the
``database_url`` fixture (tests/conftest.py), which runs it once per backend,
PostgreSQL in a fresh database per test.
"""

from __future__ import annotations

import asyncio

from alembic import command
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from persistence.sql.conversations import SqlConversationStore
from persistence.sql.database import Database, alembic_config, head_revision


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


def _downgrade_base(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.downgrade(config, "base")


async def test_migrations_reach_head_and_go_back(database_url: str) -> None:
    async with Database(database_url) as db:
        assert await db.revision() == head_revision()
        async with db.engine.connect() as connection:
            tables = await connection.run_sync(_tables)
        assert "messages" in tables
        # Every revision's downgrade works on this backend too.
        async with db.engine.begin() as connection:
            await connection.run_sync(_downgrade_base)
        async with db.engine.connect() as connection:
            assert "messages" not in await connection.run_sync(_tables)
        await db.migrate()  # and up again, idempotently
        await db.migrate()
        assert await db.revision() == head_revision()


async def test_history_round_trip(database_url: str) -> None:
    async with Database(database_url) as db:
        store = SqlConversationStore(db)
        first = await store.add(bot="b", chat="c", role="user", content="héllo 👋", user="u1",
                                platform="telegram")
        second = await store.add(bot="b", chat="c", role="assistant", content="hi",
                                 served_by="primary")
        await store.add(bot="b", chat="other", role="user", content="elsewhere")
        assert second > first
        history = await store.history("b", "c")
        assert [(m.role, m.content, m.served_by) for m in history] == [
            ("user", "héllo 👋", None), ("assistant", "hi", "primary"),
        ]
        assert history[0].created_at is not None
        assert history[0].created_at.tzinfo is not None
        assert [m.content for m in await store.history("b", "c", limit=1)] == ["hi"]


async def test_two_workers_write_one_database_nothing_lost(database_url: str) -> None:
    # Two Database objects = two workers' engines (and, on SQLite, two pools
    # contending for the file lock).
    async with Database(database_url) as one, Database(database_url) as two:
        stores = [SqlConversationStore(one), SqlConversationStore(two)]

        async def write(worker: int) -> list[int]:
            return [
                await stores[worker].add(bot="b", chat="busy", role="user",
                                         content=f"w{worker}-{i}")
                for i in range(25)
            ]

        ids = await asyncio.gather(write(0), write(1))
        assert len(set(ids[0]) | set(ids[1])) == 50
        contents = [m.content for m in await stores[0].history("b", "busy", limit=100)]
        assert sorted(contents) == sorted(f"w{w}-{i}" for w in (0, 1) for i in range(25))
        # Ids are the commit order each worker saw.
        assert ids[0] == sorted(ids[0]) and ids[1] == sorted(ids[1])
