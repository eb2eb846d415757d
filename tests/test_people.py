"""Forgetting one person among many (a property), retention and bot deletion.

Real SQLite and PostgreSQL (``database_url``), real LanceDB in a tmp dir, the
real embedding model, real file storage. The property: after forgetting a
random person, no query and no table scan returns anything of theirs, and
everyone else's messages, files, memories and recall records are intact.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from engine.admin.people import PeopleAdmin
from engine.admin.retention import Retention, Rule
from engine.types import Fact, RecalledFact, RecallRecord
from persistence.sql.conversations import SqlConversationStore
from persistence.sql.database import Database
from persistence.sql.erasure import SqlErasure
from persistence.sql.files import FileRow, SqlFileStore
from persistence.sql.recall_log import RecallRow, SqlRecallLog
from persistence.sql.tables import MessageRow
from persistence.vectors.memory import LanceMemoryStore
from persistence.vectors.shared import SharedMemory

PLATFORMS = ("telegram", "slack", "discord")
COMMON = b"the same bytes, uploaded by everyone\n"


@dataclass
class Stores:
    db: Database
    messages: SqlConversationStore
    files: SqlFileStore
    recall: SqlRecallLog
    memory: LanceMemoryStore
    erasure: SqlErasure


async def open_stores(stack: AsyncExitStack, url: str, root: Path, embedder: Any) -> Stores:
    db = await stack.enter_async_context(Database(url))
    files = SqlFileStore(db, root / "data", max_file_bytes=1_000_000, max_bot_bytes=10_000_000)
    memory = await stack.enter_async_context(
        await LanceMemoryStore.open(str(root / "lancedb"), embedder))
    return Stores(db, SqlConversationStore(db), files, SqlRecallLog(db), memory,
                  SqlErasure(db, files))


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


@dataclass(frozen=True)
class Person:
    key: str
    mark: str  # in every text of theirs, and in nobody else's
    dms: int
    group_lines: tuple[int, ...]  # which group each group message goes to
    facts: int
    files: int


people_strategy = st.integers(min_value=2, max_value=6).flatmap(lambda n: st.tuples(
    st.lists(st.tuples(st.sampled_from(PLATFORMS), st.integers(1, 10**9),
                       st.integers(0, 3), st.lists(st.integers(0, 1), max_size=3),
                       st.integers(0, 3), st.integers(0, 2)),
             min_size=n, max_size=n, unique_by=lambda t: (t[0], t[1])),
    st.integers(0, n - 1)))


async def populate(s: Stores, bot: str, people: list[Person]) -> None:
    for p in people:
        dm = f"dm-{p.key}"
        for i in range(p.dms):
            await s.messages.add(bot=bot, chat=dm, role="user", user=p.key,
                                 content=f"{p.mark} says {i}")
            await s.messages.add(bot=bot, chat=dm, role="assistant",
                                 content=f"answer to {p.mark} {i}")
        for group in p.group_lines:
            await s.messages.add(bot=bot, chat=f"group-{group}", role="user", user=p.key,
                                 content=f"{p.mark} in group {group}")
            await s.messages.add(bot=bot, chat=f"group-{group}", role="assistant",
                                 content="a group answer")
        await s.messages.add(bot=bot, chat="group-all", role="user", user=p.key,
                             content=f"{p.mark} hello all")
        facts = await s.memory.add_many([
            Fact(id="", text=f"{p.mark} fact {i}", bot=bot, user=p.key) for i in range(p.facts)])
        for i in range(p.files):
            await s.files.save(bot=bot, platform=p.key.split(":")[0], chat=dm, uploader=p.key,
                               name=f"f{i}.txt", mime_type="text/plain",
                               chunks=chunks(f"{p.mark} file {i}".encode()))
        await s.files.save(bot=bot, platform="x", chat=dm, uploader=p.key, name="common.txt",
                           mime_type="text/plain", chunks=chunks(COMMON))
        if p.dms:
            await s.recall.record(RecallRecord(
                bot=bot, chat=dm, message_id="1", query=f"{p.mark} says {p.dms - 1}",
                facts=tuple(RecalledFact(id=f.id, score=0.5, text=f.text, user=p.key)
                            for f in facts)))
    # a group record recalled facts about several people
    everyone = [f async for f in s.memory.iterate(bot)]
    await s.recall.record(RecallRecord(
        bot=bot, chat="group-all", message_id="2", query="what do you know?",
        facts=tuple(RecalledFact(id=f.id, score=0.5, text=f.text, user=f.user)
                    for f in everyone)))


async def everything(s: Stores, bot: str) -> list[str]:
    """Every row of the bot, as text: messages, files, recall log, memories, bytes."""
    async with s.db.sessions() as session:
        rows: list[str] = [f"{m.user} {m.content}" for m in (await session.scalars(
            select(MessageRow).where(MessageRow.bot == bot))).all()]
        rows += [f"{f.uploader} {f.name}" for f in (await session.scalars(
            select(FileRow).where(FileRow.bot == bot))).all()]
        for r in (await session.scalars(select(RecallRow).where(RecallRow.bot == bot))).all():
            # one row per recalled fact: a record shared by several people is compared per item
            rows += [f"{r.chat} {r.query}"] + [f"recalled {item['user']} {item['text']}"
                                                for item in json.loads(r.facts)]
    rows += [f"{f.user} {f.text}" async for f in s.memory.iterate(bot)]
    folder = s.files.blob_path(bot, "00").parent.parent
    rows += [p.read_bytes().decode() for p in folder.rglob("*") if p.is_file()]
    return rows


def test_forgetting_a_random_person_leaves_nothing_of_theirs_and_all_of_the_rest(
    embedder: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("people")
    loop = asyncio.new_event_loop()
    stack = AsyncExitStack()
    stores = loop.run_until_complete(open_stores(
        stack, f"sqlite+aiosqlite:///{root / 'boternity.db'}", root, embedder))

    # No shrinking: each example writes real tables; the failing example is printed whole.
    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck),
              phases=(Phase.explicit, Phase.reuse, Phase.generate), database=None)
    @given(people_strategy)
    def check(drawn: tuple[list[tuple[Any, ...]], int]) -> None:
        raw, victim_index = drawn
        bot = f"b{uuid.uuid4().hex[:8]}"
        people = [Person(f"{platform}:{pid}", f"M{bot}{i}Z", dms, tuple(groups), facts, nfiles)
                  for i, (platform, pid, dms, groups, facts, nfiles) in enumerate(raw)]
        victim = people[victim_index]
        loop.run_until_complete(scenario(stores, bot, people, victim))

    try:
        check()
    finally:
        loop.run_until_complete(stack.aclose())
        loop.close()


async def scenario(s: Stores, bot: str, people: list[Person], victim: Person) -> None:
    await populate(s, bot, people)
    before = await everything(s, bot)
    admin = PeopleAdmin(bots=[bot], records=s.erasure, memory=s.memory)
    shown = await admin.show(victim.key)
    assert shown.memories == victim.facts and shown.files == victim.files + 1
    # a chat where nobody else spoke counts as their DM: the bot's answers there go too
    alone = [g for g in victim.group_lines
             if not any(g in p.group_lines for p in people if p is not victim)]
    assert shown.messages == 2 * victim.dms + len(victim.group_lines) + len(alone) + 1
    exported = await admin.export(victim.key)
    assert len(exported["memories"]) == victim.facts
    assert all(victim.mark in m["text"] for m in exported["messages"]
               if m["role"] == "user")  # only theirs (and the answers in their DMs)

    done = await admin.forget(victim.key, actor="test")
    assert done.memories == victim.facts

    after = await everything(s, bot)
    assert [row for row in after if victim.mark in row or victim.key in row] == []
    # queries, too
    assert await s.memory.search(bot, f"{victim.mark} fact 0", users=[victim.key]) == []
    assert await s.messages.history(bot, f"dm-{victim.key}") == []
    assert await s.recall.last(bot, f"dm-{victim.key}") is None
    # everyone else's is intact, row for row
    for other in people:
        if other is victim:
            continue
        theirs = sorted(row for row in before if other.mark in row)
        assert sorted(row for row in after if other.mark in row) == theirs
        assert len(await s.files.recent(bot, chat=f"dm-{other.key}")) == other.files + 1
    if len(people) > 1:
        assert COMMON.decode() in after  # shared bytes stay while someone still has them


async def test_forgetting_one_person_on_sqlite_and_postgresql(
    database_url: str, embedder: Any, tmp_path: Path
) -> None:
    """The same scenario as the property, fixed, on both databases."""
    people = [Person("telegram:42", "MpgAliceZ", 2, (0, 1), 2, 1),
              Person("slack:U0BOB", "MpgBobZ", 1, (0,), 1, 2),
              Person("discord:1234", "MpgCaroZ", 0, (1,), 0, 0)]
    async with AsyncExitStack() as stack:
        s = await open_stores(stack, database_url, tmp_path, embedder)
        await scenario(s, "demo", people, people[0])


# --- retention and bot deletion, on SQLite and PostgreSQL ---

async def test_retention_purges_old_history_files_and_memories(
    database_url: str, embedder: Any, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        s = await open_stores(stack, database_url, tmp_path, embedder)
        old = datetime.now(UTC) - timedelta(days=40)
        await s.messages.add(bot="keep", chat="c", role="user", user="telegram:1",
                             content="old but kept")
        await s.messages.add(bot="short", chat="c", role="user", user="telegram:1",
                             content="old message")
        await s.messages.add(bot="short", chat="c", role="user", user="telegram:1",
                             content="new message")
        await s.files.save(bot="short", platform="telegram", chat="c", uploader="telegram:1",
                           name="old.txt", mime_type="text/plain", chunks=chunks(b"old file"))
        await s.recall.record(RecallRecord(bot="short", chat="c", message_id="1", query="q",
                                           facts=(), created_at=old))
        await s.memory.add(Fact(id="", text="an old fact", bot="short", created_at=old))
        await s.memory.add(Fact(id="", text="a new fact", bot="short"))
        async with s.db.sessions.begin() as session:  # age two rows as if written long ago
            for row in (await session.scalars(select(MessageRow).where(
                    MessageRow.content.in_(["old but kept", "old message"])))).all():
                row.created_at = old
            for f in (await session.scalars(select(FileRow))).all():
                f.created_at = old
        keeper = Retention(rules={"keep": Rule(), "short": Rule(history_days=30, memory_days=30)},
                           records=s.erasure, memory=s.memory, recall_log=s.recall)

        planned = await keeper.purge(dry_run=True)
        assert planned == {"short": {"messages": 1, "files": 1, "recall_log": 1, "memories": 1}}
        assert len(await s.messages.history("short", "c")) == 2  # a dry run deletes nothing
        done = await keeper.purge()
        assert done == planned
        assert [m.content for m in await s.messages.history("short", "c")] == ["new message"]
        assert [m.content for m in await s.messages.history("keep", "c")] == ["old but kept"]
        assert await s.files.recent("short") == []
        assert not any(p.is_file() for p in (tmp_path / "data").rglob("*"))
        assert await s.recall.last("short", "c") is None
        assert [f.text async for f in s.memory.iterate("short")] == ["a new fact"]


async def test_deleting_a_bot_drops_its_table_orphans_shared_facts_and_deletes_records(
    database_url: str, embedder: Any, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        s = await open_stores(stack, database_url, tmp_path, embedder)
        shared = await stack.enter_async_context(
            await SharedMemory.open(str(tmp_path / "lancedb"), embedder))
        for bot in ("gone", "stays"):
            await s.messages.add(bot=bot, chat="c", role="user", user="slack:U1",
                                 content=f"hello {bot}")
            await s.files.save(bot=bot, platform="slack", chat="c", uploader="slack:U1",
                               name="a.txt", mime_type="text/plain", chunks=chunks(b"same"))
            await s.recall.record(RecallRecord(bot=bot, chat="c", message_id="1", query="q",
                                               facts=()))
            fact = await s.memory.add(Fact(id="", text=f"a fact of {bot}", bot=bot))
            await shared.publish(fact, "public")
        keeper = Retention(rules={"stays": Rule()}, records=s.erasure, memory=s.memory,
                           recall_log=s.recall, shared=shared)

        counts = await keeper.delete_bot("gone")
        assert counts == {"memories": 1, "shared_orphaned": 1, "messages": 1, "files": 1,
                          "recall_log": 1}
        assert "gone" not in await s.memory.bots() and "stays" in await s.memory.bots()
        assert await s.messages.history("gone", "c") == []
        assert await s.files.recent("gone") == [] and await s.recall.last("gone", "c") is None
        assert not s.files.blob_path("gone", "x").parent.parent.exists() or not any(
            p.is_file() for p in s.files.blob_path("gone", "x").parent.parent.rglob("*"))
        visible = await shared.list_facts("stays", (), users=None)
        orphaned = {f.text: f.orphaned for f in visible}
        assert orphaned == {"a fact of gone": True, "a fact of stays": False}
        assert len(await s.messages.history("stays", "c")) == 1
        [kept] = await s.files.recent("stays")
        assert s.files.path(kept).read_bytes() == b"same"
