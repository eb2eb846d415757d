"""Memories stored before the user-key fix and before facts had a chat are upgraded
at start-up (persistence/vectors/rekey.py with persistence/sql/provenance.py).

Real LanceDB tables written in the old shape, the real embedding model, a real
SQLite history saying where each fact was learned; recall afterwards through
the real policy.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import lancedb
import pyarrow as pa

from engine.background import Background
from engine.memory.policy import BotMemory, MemoryConfig
from engine.types import Fact, IncomingMessage
from persistence.sql.conversations import SqlConversationStore
from persistence.sql.database import Database
from persistence.sql.provenance import UNKNOWN, learned_in
from persistence.sql.tables import MessageRow
from persistence.vectors.memory import FIELDS, LanceMemoryStore, table_name
from persistence.vectors.rekey import RECHAINED_KEY, upgrade_memory
from persistence.vectors.shared import TABLE, SharedMemory
from persistence.vectors.tables import with_model

ALICE, BOB = "telegram:7", "telegram:8"
DM, GROUP = "7", "-100"
T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


async def _old_bot_table(uri: str, embedder: Any, facts: list[tuple[str, str, datetime]]) -> None:
    """A per-bot table as the old code wrote it: no chat column, twice-prefixed users."""
    old_fields = [f for f in FIELDS if f.name != "chat"]
    schema = with_model(old_fields, embedder.model_name, embedder.dimension, "helper")
    vectors = await embedder.embed([text for text, _, _ in facts])
    rows = [{"id": f"f{i}", "text": text, "user": user, "category": "personal",
             "importance": 0.8, "created_at": at, "superseded_by": "", "metadata": "",
             "vector": vector} for i, ((text, user, at), vector) in enumerate(
                 zip(facts, vectors, strict=True))]
    db = await lancedb.connect_async(uri)
    await db.create_table(table_name("helper"), pa.Table.from_pylist(rows, schema=schema))


async def _said(store: SqlConversationStore, database: Database, chat: str, user: str,
                at: datetime) -> None:
    row_id = await store.add(bot="helper", chat=chat, role="user", content="...", user=user,
                             platform="telegram")
    async with database.sessions.begin() as session:
        row = await session.get(MessageRow, row_id)
        assert row is not None
        row.created_at = at


def _msg(text: str, user: str, chat: str, group: bool) -> IncomingMessage:
    return IncomingMessage(platform="telegram", bot="helper", chat=chat, user=user, text=text,
                           user_name="Alice" if user == ALICE else "Bob", is_group=group)


async def test_old_keys_and_unscoped_facts_are_upgraded_once(
    tmp_path: Path, embedder: Any,
) -> None:
    uri = str(tmp_path / "lancedb")
    minute = timedelta(minutes=1)
    await _old_bot_table(uri, embedder, [
        ("Alice is allergic to peanuts", "telegram:telegram:7", T0 + minute),  # her DM
        ("The door code is 4711", "", T0 + 11 * minute),  # general, said in her DM
        ("Lunch is served at noon", "", T0 + 21 * minute),  # general, said in the group
        ("The office closes at six", "", T0 + 60 * minute),  # no conversation: an admin's
        ("Alice plays the cello", "telegram:telegram:7", T0 + 90 * minute),  # two chats
    ])
    async with await SharedMemory.open(uri, embedder) as shared:
        await shared.publish(Fact(id="", text="Public holiday on Monday", bot="scout"), "public")
        await shared.publish(Fact(id="", text="Alice is vegetarian", bot="scout",
                                  user="telegram:telegram:7"), "public")
        await shared.publish(Fact(id="", text="Bob likes chess", bot="scout", user=BOB),
                             "public")

    async with Database(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}") as database:
        history = SqlConversationStore(database)
        await _said(history, database, DM, ALICE, T0 + minute - timedelta(seconds=5))
        await _said(history, database, DM, ALICE, T0 + 11 * minute - timedelta(seconds=5))
        await _said(history, database, GROUP, ALICE, T0 + 21 * minute - timedelta(seconds=9))
        await _said(history, database, GROUP, BOB, T0 + 20 * minute)
        await _said(history, database, DM, ALICE, T0 + 88 * minute)
        await _said(history, database, GROUP, ALICE, T0 + 89 * minute)

        async def place(bot: str, user: str, at: datetime) -> tuple[str, str]:
            return await learned_in(database, bot, user, at)

        db = await lancedb.connect_async(uri)
        done = await upgrade_memory(db, place)
        assert done == {"rekeyed": 2, "placed": 5, "shared_rekeyed": 1}
        again = await upgrade_memory(db, place)  # idempotent
        assert not any(again.values())

    async with await LanceMemoryStore.open(uri, embedder) as store, \
            await SharedMemory.open(uri, embedder) as shared, Background(name="t") as jobs:
        placed = {f.text: (f.user, f.chat) for f in await store.list_facts("helper")}
        assert placed == {
            "Alice is allergic to peanuts": (ALICE, DM),
            "The door code is 4711": (ALICE, DM),  # a DM's general fact is hers
            "Lunch is served at noon": ("", GROUP),
            "The office closes at six": ("", ""),
            "Alice plays the cello": (ALICE, UNKNOWN),  # cannot tell: her DMs only
        }
        report = await shared.verify()
        assert report.ok and report.checked == 3
        assert [f.text for f in await shared.list_facts("helper", (), users=[ALICE])] == [
            "Alice is vegetarian"]
        table = await lancedb.connect_async(uri)
        record = json.loads((await (await table.open_table(TABLE)).schema()).metadata[
            RECHAINED_KEY])
        assert record["rows_rekeyed"] == 1 and record["head_before"]

        memory = BotMemory(MemoryConfig(bot="helper", min_score=0.0, top_k=10), store=store,
                           embedder=embedder, jobs=jobs, shared=shared)

        async def recalled(text: str, user: str, chat: str, group: bool) -> set[str]:
            return {f.text for f in await memory.recall(_msg(text, user, chat, group))}

        in_her_dm = await recalled("what is the door code, and what am I allergic to?",
                                   ALICE, DM, False)
        assert {"Alice is allergic to peanuts", "The door code is 4711",
                "Alice plays the cello", "Alice is vegetarian"} <= in_her_dm
        for user in (ALICE, BOB):
            in_group = await recalled("door code? allergies? cello? lunch?", user, GROUP, True)
            assert "Lunch is served at noon" in in_group
            assert not in_group & {"The door code is 4711", "Alice is allergic to peanuts",
                                   "Alice plays the cello"}
        bob_dm = await recalled("what is the door code? when is lunch?", BOB, "8", False)
        assert "The door code is 4711" not in bob_dm and "Lunch is served at noon" not in bob_dm
        assert "The office closes at six" in bob_dm


async def test_the_upgrade_runs_when_memory_starts(
    tmp_path: Path, embedder: Any, caplog: Any,
) -> None:
    """``build_app`` (what ``boternity run`` and every memory command start) upgrades once."""
    import logging

    from adapters.wiring.build import build_app
    from adapters.wiring.settings import load_settings

    config = tmp_path / "boternity.toml"
    config.write_text(f"""
[storage]
data_dir = "{tmp_path / 'data'}"

[providers.primary]
kind = "openai_compatible"
base_url = "http://127.0.0.1:9/v1"
model = "fake-model"

[bots.helper]
chain = ["primary"]
""", encoding="utf-8")
    await _old_bot_table(str(tmp_path / "data" / "lancedb"), embedder, [
        ("Alice is allergic to peanuts", "telegram:telegram:7", T0)])
    settings = load_settings(config, environ={}, dotenv=None)
    with caplog.at_level(logging.INFO, logger="persistence.vectors.rekey"):
        async with build_app(settings) as app:
            assert app.memory_admin is not None
            [fact] = await app.memory_admin.list_facts("helper", user="telegram:7")
            # No history from that time: where it was learned cannot be told, so the
            # safe choice (recalled in her DMs only, until an admin promotes it).
            assert (fact.user, fact.chat) == (ALICE, UNKNOWN)
    assert "memory upgrade: 1 keys rewritten" in caplog.text
    caplog.clear()
    async with build_app(settings):
        pass
    assert "memory upgrade" not in caplog.text  # once
