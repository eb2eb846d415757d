"""The memory policy (engine/memory.py) on the real stack.

Real all-MiniLM-L6-v2 embeddings, real LanceDB in a tmp dir (own and shared
tables), the real SQL recall log, and for extraction the real ``openai`` SDK
through the real fallback chain against the fake OpenAI server, scripted to
answer with JSON facts.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine.background import Background
from engine.extraction import parse_facts, parse_judgement
from engine.memory import BotMemory, MemoryConfig, recall_scope, user_key
from engine.types import Fact, IncomingMessage
from persistence.database import Database
from persistence.recall_log import RecallRow, SqlRecallLog
from persistence.shared_memory import SharedMemory
from persistence.vectors import LanceMemoryStore

ALICE = "telegram:alice"
BOB = "telegram:bob"


def msg(text: str, user: str = "alice", *, chat: str = "group-1", platform: str = "telegram",
        group: bool = True, message_id: str = "m1") -> IncomingMessage:
    return IncomingMessage(platform=platform, bot="helper", chat=chat, user=user, text=text,  # type: ignore[arg-type]
                           user_name=user.title(), is_group=group, message_id=message_id)


@dataclass
class Stack:
    store: LanceMemoryStore
    shared: SharedMemory
    log: SqlRecallLog
    embedder: Any
    jobs: Background

    def memory(self, **config: Any) -> BotMemory:
        chain = config.pop("chain", None)
        return BotMemory(
            MemoryConfig(bot=config.pop("bot", "helper"), **config),
            store=self.store, embedder=self.embedder, jobs=self.jobs, shared=self.shared,
            chain=chain, recall_log=self.log,
        )


@pytest.fixture
async def stack(tmp_path: Path, embedder: Any) -> AsyncIterator[Stack]:
    uri = str(tmp_path / "lancedb")
    async with (
        Database(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}") as database,
        await LanceMemoryStore.open(uri, embedder) as store,
        await SharedMemory.open(uri, embedder) as shared,
        Background(name="test-memory") as jobs,
    ):
        if not await _has_recall_table(database):  # TEMP until 0004_recall_log can land
            async with database.engine.begin() as connection:
                await connection.run_sync(RecallRow.__table__.create)  # type: ignore[attr-defined]
        yield Stack(store, shared, SqlRecallLog(database), embedder, jobs)


async def _has_recall_table(database: Database) -> bool:
    from sqlalchemy import inspect

    async with database.engine.connect() as connection:
        return await connection.run_sync(lambda c: inspect(c).has_table("recall_log"))


async def add(stack: Stack, text: str, user: str = "", bot: str = "helper") -> Fact:
    return await stack.store.add(Fact(id="", text=text, bot=bot, user=user))


# --- recall -------------------------------------------------------------------


async def test_recall_in_a_group_gives_speaker_and_general_facts_never_another_users(
    stack: Stack,
) -> None:
    peanuts = await add(stack, "Alice is allergic to peanuts", ALICE)
    shellfish = await add(stack, "Bob is allergic to shellfish", BOB)
    lunch = await add(stack, "The team lunch is served at noon in the cafeteria")
    memory = stack.memory(min_score=0.1)

    alice = await memory.recall(msg("What food allergies do I have? When is lunch?"))
    ids = {f.id for f in alice}
    assert peanuts.id in ids and lunch.id in ids
    assert shellfish.id not in ids

    bob = await memory.recall(msg("What food allergies do I have? When is lunch?", "bob"))
    assert {f.id for f in bob} >= {shellfish.id, lunch.id}
    assert peanuts.id not in {f.id for f in bob}

    # A stranger, or a speaker we cannot identify, gets general facts only.
    carol = await memory.recall(msg("Who here is allergic to what?", "carol"))
    anonymous = await memory.recall(msg("Who here is allergic to what?", ""))
    for recalled in (carol, anonymous):
        assert {f.user for f in recalled} <= {""}


async def test_same_user_id_on_another_platform_is_another_person(stack: Stack) -> None:
    await add(stack, "Alice is allergic to peanuts", ALICE)
    memory = stack.memory(min_score=0.0)
    recalled = await memory.recall(msg("what am I allergic to?", platform="discord"))
    assert recalled == []
    assert recall_scope(msg("x", platform="discord")) == ["discord:alice", ""]
    assert user_key(msg("x", "")) == ""


async def test_recall_includes_visible_shared_facts_with_provenance(stack: Stack) -> None:
    await stack.shared.publish(
        Fact(id="", text="The office wifi password changes every Monday", bot="scout"),
        "public", author_name="Scout")
    await stack.shared.publish(
        Fact(id="", text="The office wifi is down for maintenance on Friday", bot="scout"),
        "trusted", "ops", author_name="Scout")
    await stack.shared.publish(
        Fact(id="", text="The office wifi router is in the basement", bot="scout"),
        "private", author_name="Scout")
    await stack.shared.publish(
        Fact(id="", text="Bob cannot connect to the office wifi", bot="scout", user=BOB),
        "public", author_name="Scout")

    outsider = await stack.memory(min_score=0.1).recall(msg("anything about the office wifi?"))
    assert [f.text for f in outsider] == ["The office wifi password changes every Monday"]
    shared = outsider[0]
    assert shared.trust_level == "public" and shared.author_bot == "scout"
    assert shared.author_name == "Scout" and shared.created_at is not None

    insider = await stack.memory(min_score=0.1, trust_groups=("ops",)).recall(
        msg("anything about the office wifi?"))
    texts = {f.text for f in insider}
    assert "The office wifi is down for maintenance on Friday" in texts
    assert "The office wifi router is in the basement" not in texts  # scout's private
    assert "Bob cannot connect to the office wifi" not in texts  # about another user


async def test_recall_keeps_to_the_floor_and_top_k(stack: Stack) -> None:
    for i in range(8):
        await add(stack, f"Alice's project number {i} is written in Rust", ALICE)
    await add(stack, "Alice's cat is called Miso", ALICE)
    memory = stack.memory(top_k=3, min_score=0.35)
    recalled = await memory.recall(msg("Which language are my projects written in?"))
    assert len(recalled) == 3
    assert all("Rust" in f.text and f.score >= 0.35 for f in recalled)
    assert [f.score for f in recalled] == sorted((f.score for f in recalled), reverse=True)
    assert await memory.recall(msg("How tall is Mount Everest?")) == []


async def test_recall_is_logged_for_why_with_scores(stack: Stack) -> None:
    peanuts = await add(stack, "Alice is allergic to peanuts", ALICE)
    memory = stack.memory(min_score=0.2)
    recalled = await memory.recall(msg("am I allergic to anything?", message_id="m42"))
    record = await stack.log.last("helper", "group-1")
    assert record is not None and record.message_id == "m42"
    assert [(f.id, f.source) for f in record.facts] == [(peanuts.id, "own")]
    assert record.facts[0].score == pytest.approx(recalled[0].score, abs=1e-3)
    assert record.query == "am I allergic to anything?"

    # The next reply in the chat replaces it; other chats keep theirs.
    await memory.recall(msg("How tall is Mount Everest?", message_id="m43"))
    record = await stack.log.last("helper", "group-1")
    assert record is not None and record.message_id == "m43" and record.facts == ()
    assert await stack.log.last("helper", "group-2") is None


async def test_superseded_facts_are_not_recalled(stack: Stack) -> None:
    paris = await add(stack, "Alice lives in Paris", ALICE)
    berlin = await add(stack, "Alice lives in Berlin", ALICE)
    await stack.store.supersede("helper", paris.id, berlin.id)
    recalled = await stack.memory(min_score=0.1).recall(msg("Where do I live?"))
    assert [f.id for f in recalled] == [berlin.id]


# --- parsing the model's answers (pure) ------------------------------------------


def test_parse_facts_is_defensive() -> None:
    fenced = '```json\n{"facts": [{"text": "Alice likes tea", "importance": "0.9"}]}\n```'
    [fact] = parse_facts(fenced) or []
    assert fact.text == "Alice likes tea" and fact.importance == 0.9 and fact.about == "speaker"

    mixed = json.dumps({"facts": [
        {"text": "  Alice   has a dog  ", "category": "Personal", "importance": 7,
         "about": "speaker"},
        {"text": ""}, {"category": "x"}, 42, None, "Alice plays chess",
        {"text": "Bob is rich", "about": "bob"},
        {"text": "Odd", "importance": float("nan")},
    ]})
    facts = parse_facts("Sure! Here you go: " + mixed + " Hope that helps.") or []
    assert [(f.text, f.category, f.importance, f.about) for f in facts] == [
        ("Alice has a dog", "personal", 1.0, "speaker"),
        ("Alice plays chess", "general", 0.5, "speaker"),
        ("Bob is rich", "general", 0.5, "other"),
        ("Odd", "general", 0.5, "speaker"),
    ]
    for broken in ("", "no json here", "{not json", "[1, 2]", '{"facts": "none"}',
                   '{"other": []}'):
        assert parse_facts(broken) is None
    assert parse_facts('{"facts": []}') == []


def test_parse_judgement() -> None:
    update = parse_judgement('{"action": "update", "target": 2}', candidates=3)
    assert update is not None and update.action == "update" and update.target == 1
    skip = parse_judgement('{"action": "skip", "target": null}', 3)
    assert skip is not None and skip.action == "skip"
    assert parse_judgement('{"action": "update", "target": 9}', 3) is None  # out of range
    assert parse_judgement('{"action": "merge"}', 3) is None
    assert parse_judgement("maybe", 3) is None


# --- background jobs ---------------------------------------------------------------


async def test_background_sheds_when_full_logs_failures_and_drains(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()
    ran: list[str] = []

    async def slow() -> None:
        await release.wait()
        ran.append("slow")

    async def boom() -> None:
        raise RuntimeError("kaput")

    async def quick() -> None:
        ran.append("quick")

    jobs = Background(max_pending=2, workers=1, name="t")
    assert jobs.submit("slow", slow)
    await asyncio.sleep(0)  # let the worker take it off the queue
    assert jobs.submit("boom", boom) and jobs.submit("quick", quick)
    with caplog.at_level(logging.WARNING):
        assert not jobs.submit("extra", quick)  # queue full: shed, never block
    assert jobs.dropped == 1 and jobs.pending == 3
    release.set()
    with caplog.at_level(logging.ERROR):
        assert await jobs.drain(5)
    assert ran == ["slow", "quick"] and jobs.failed == 1
    assert "job boom failed" in caplog.text
    await jobs.aclose()
    assert not jobs.submit("late", quick)
