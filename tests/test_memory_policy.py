"""The memory policy (engine/memory/policy.py) on the real stack.

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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lancedb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from engine.background import Background
from engine.conversation import Conversation
from engine.memory.extraction import parse_facts, parse_judgement
from engine.memory.policy import BotMemory, MemoryConfig, personalize
from engine.memory.scope import recall_scope, user_key
from engine.providers.fallback import Breakers, FallbackChain
from engine.providers.openai_compat import OpenAICompatProvider
from engine.types import Fact, IncomingMessage, RecalledFact, RecallRecord, Reply
from engine.usage import Price, UsageAccounting
from persistence.sql.conversations import SqlConversationStore
from persistence.sql.database import Database
from persistence.sql.recall_log import SqlRecallLog
from persistence.sql.usage import SqlUsageStore
from persistence.vectors.memory import LanceMemoryStore
from persistence.vectors.shared import SharedMemory
from tests.fakes.openai_server import FakeOpenAI, Hang, Malformed, Text

ALICE = "telegram:alice"
BOB = "telegram:bob"


def msg(text: str, user: str = "alice", *, chat: str = "group-1", platform: str = "telegram",
        group: bool = True, message_id: str = "m1") -> IncomingMessage:
    """A message as the adapters make it: ``user`` is the key ``platform:id``."""
    return IncomingMessage(platform=platform, bot="helper", chat=chat,  # type: ignore[arg-type]
                           user=user_key(platform, user), text=text,
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
        yield Stack(store, shared, SqlRecallLog(database), embedder, jobs)


async def add(stack: Stack, text: str, user: str = "", bot: str = "helper",
              chat: str = "") -> Fact:
    """A fact as an admin adds it (bot-wide), or as learned in ``chat``."""
    return await stack.store.add(Fact(id="", text=text, bot=bot, user=user, chat=chat))


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
    assert recall_scope(msg("x", platform="discord")).users == ["discord:alice", ""]
    assert msg("x", "").user == ""


async def test_a_backslash_in_the_display_name_keeps_recall_working(stack: Stack) -> None:
    """Issue 13 item 4: the name was used as a regex replacement ("\\d" broke recall)."""
    for name in ("Dr\\Who", "C:\\Users\\al", "back\\1slash", "\\g<0>"):
        assert personalize("where do I live?", name) == f"where do {name} live?"
    peanuts = await add(stack, "Alice is allergic to peanuts", ALICE)
    message = IncomingMessage(platform="telegram", bot="helper", chat="dm-alice", user=ALICE,
                              user_name="Alice\\d", text="am I allergic to anything?")
    recalled = await stack.memory(min_score=0.1).recall(message)
    assert [f.id for f in recalled] == [peanuts.id]


async def test_learned_facts_are_recalled_where_they_were_said(stack: Stack) -> None:
    """A group's general fact stays in that group; a DM's facts stay in DMs; admins'
    facts (chat "") are everywhere; ``recall_across_chats`` widens groups only."""
    lunch = await add(stack, "The team lunch is at noon on Fridays", chat="group-1")
    diabetes = await add(stack, "Alice has type 1 diabetes", ALICE, chat="dm-alice")
    cello = await add(stack, "Alice plays the cello in the team band", ALICE, chat="group-1")
    office = await add(stack, "The office closes at six on Fridays")  # an admin's

    async def ids(text: str, user: str, chat: str, group: bool, **config: Any) -> set[str]:
        memory = stack.memory(min_score=-1.0, top_k=10, **config)
        return {f.id for f in await memory.recall(msg(text, user, chat=chat, group=group))}

    question = "Fridays? health? music?"
    assert await ids(question, "alice", "group-1", True) == {lunch.id, cello.id, office.id}
    assert await ids(question, "alice", "group-2", True) == {office.id}
    assert await ids(question, "bob", "group-1", True) == {lunch.id, office.id}
    assert await ids(question, "alice", "dm-alice", False) == {diabetes.id, cello.id, office.id}
    assert await ids(question, "bob", "dm-bob", False) == {office.id}
    widened = await ids(question, "alice", "group-2", True, recall_across_chats=True)
    assert widened == {lunch.id, diabetes.id, cello.id, office.id}
    assert await ids(question, "bob", "group-2", True, recall_across_chats=True) == {
        lunch.id, office.id}  # never another person's facts


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
    await memory.flush()  # the log is written beside the reply, not before it
    record = await stack.log.last("helper", "group-1")
    assert record is not None and record.message_id == "m42"
    assert [(f.id, f.source) for f in record.facts] == [(peanuts.id, "own")]
    assert record.facts[0].score == pytest.approx(recalled[0].score, abs=1e-3)
    assert record.query == "am I allergic to anything?"

    # The next reply in the chat replaces it; other chats keep theirs.
    await memory.recall(msg("How tall is Mount Everest?", message_id="m43"))
    await memory.flush()
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


# --- extraction and reconciliation, through the real chain and SDK ------------------


@pytest.fixture
async def chain(openai_fake: FakeOpenAI) -> AsyncIterator[FallbackChain]:
    async with OpenAICompatProvider(
        name="primary", model="fake-model", base_url=openai_fake.base_url,
        api_key=SecretStr("sk-test"),
    ) as provider:
        yield FallbackChain([provider], Breakers())


def facts_answer(*facts: dict[str, Any]) -> Text:
    raw = json.dumps({"facts": list(facts)})
    return Text([raw[:10], raw[10:]])  # streamed in pieces, as a model would


def judge_answer(action: str, target: int | None = None) -> Text:
    return Text([json.dumps({"action": action, "target": target})])


def about_alice(text: str, **extra: Any) -> dict[str, Any]:
    return {"text": text, "category": "personal", "importance": 0.8, "about": "speaker",
            **extra}


REPLY = Reply(text="Noted!", served_by="primary")


async def test_extraction_adds_supersedes_and_skips_duplicates(
    stack: Stack, chain: FallbackChain, openai_fake: FakeOpenAI,
) -> None:
    memory = stack.memory(chain=chain, min_score=0.2)
    openai_fake.script(facts_answer(
        about_alice("Alice lives in Paris"),
        {"text": "Bob plays the drums", "about": "other"},  # a third person: never stored
        {"text": "The book club meets on Thursdays", "about": "general", "importance": 0.6},
    ))
    first = await memory.learn_now(
        msg("I live in Paris. Bob plays drums. Book club is on Thursdays."), REPLY)
    assert {(f.text, f.user) for f in first.added} == {
        ("Alice lives in Paris", ALICE), ("The book club meets on Thursdays", "")}
    request = openai_fake.requests[0].body
    assert request["response_format"] == {"type": "json_object"}
    assert "I live in Paris" in json.dumps(request["messages"])
    paris = next(f for f in first.added if "Paris" in f.text)

    # A contradiction lands in the ambiguous band: the judge says "update".
    openai_fake.script(facts_answer(about_alice("Alice lives in Berlin")),
                       judge_answer("update", 1))
    second = await memory.learn_now(msg("I moved to Berlin last month"), REPLY)
    [berlin] = second.added
    assert second.superseded == (paris.id,)
    judge = json.dumps(openai_fake.requests[-1].body["messages"])
    assert "EXISTING" in judge and "Alice lives in Paris" in judge
    history = await stack.store.list_facts("helper", user=ALICE, history=True)
    assert {(f.text, f.superseded_by) for f in history} == {
        ("Alice lives in Paris", berlin.id), ("Alice lives in Berlin", None)}
    recalled = await memory.recall(msg("Where do I live?"))
    assert [f.text for f in recalled if f.user == ALICE] == ["Alice lives in Berlin"]

    # The same fact again is a clear duplicate: skipped without asking the judge.
    before = openai_fake.count
    openai_fake.script(facts_answer(about_alice("Alice lives in Berlin")))
    third = await memory.learn_now(msg("As I said, I live in Berlin"), REPLY)
    assert third.skipped == ("Alice lives in Berlin",) and third.added == ()
    assert openai_fake.count == before + 1

    # A paraphrase the judge calls a duplicate is skipped; a compatible fact is added.
    openai_fake.script(facts_answer(about_alice("Alice's home is in Berlin")),
                       judge_answer("skip"))
    fourth = await memory.learn_now(msg("Yes, Berlin is home now"), REPLY)
    assert fourth.added == () and len(fourth.skipped) == 1
    assert openai_fake.count == before + 3  # this time the judge was asked
    assert await stack.store.count("helper") == 3  # Paris (history), Berlin, book club


async def test_unusable_judge_answer_adds_the_fact(
    stack: Stack, chain: FallbackChain, openai_fake: FakeOpenAI,
) -> None:
    memory = stack.memory(chain=chain)
    old = await add(stack, "Alice's favorite color is blue", ALICE)
    openai_fake.script(facts_answer(about_alice("Alice's favorite color is green")),
                       Text(["I think they are different?"]))
    result = await memory.learn_now(msg("Green is my favorite color"), REPLY)
    assert [f.text for f in result.added] == ["Alice's favorite color is green"]
    assert result.superseded == ()
    assert (await stack.store.get("helper", old.id)) == old  # untouched, not superseded


async def test_malformed_model_output_loses_nothing(
    stack: Stack, chain: FallbackChain, openai_fake: FakeOpenAI, caplog: pytest.LogCaptureFixture,
) -> None:
    memory = stack.memory(chain=chain)
    kept = await add(stack, "Alice is allergic to peanuts", ALICE)
    openai_fake.script(Text(['{"facts": [{"text": "Alice likes', " jazz"]))  # cut off
    with caplog.at_level(logging.WARNING):
        result = await memory.learn_now(msg("I like jazz"), REPLY)
    assert result.dropped == "invalid JSON from the model" and result.added == ()
    assert "not valid JSON" in caplog.text
    # A broken stream is a provider failure: nothing stored, nothing raised.
    openai_fake.script(Malformed(after=1, chunks=('{"facts": [',)))
    result = await memory.learn_now(msg("I like jazz"), REPLY)
    assert result.dropped.startswith("extraction failed")
    assert [f.id for f in await stack.store.list_facts("helper")] == [kept.id]
    # One bad item among good ones only costs that item; the policy keeps working.
    openai_fake.script(facts_answer({"text": 42}, about_alice("Alice likes jazz")))
    result = await memory.learn_now(msg("I like jazz"), REPLY)
    assert [f.text for f in result.added] == ["Alice likes jazz"]


async def test_local_demo_model_facts_are_not_stored_unless_configured(
    stack: Stack, openai_fake: FakeOpenAI,
) -> None:
    async with OpenAICompatProvider(name="local", model="smollm2",
                                    base_url=openai_fake.base_url) as local:
        chain = FallbackChain([local], Breakers())
        strict = stack.memory(chain=chain, local_providers=frozenset({"local"}))
        result = await strict.learn_now(msg("I own a boat"), Reply("Cool", served_by="local"))
        assert "local demo model does not write memories" in result.dropped
        assert openai_fake.count == 0  # not even asked
        assert await stack.store.count("helper") == 0
        strict.learn(msg("I own a boat"), Reply("Cool", served_by="local"))
        assert stack.jobs.pending == 0  # a chain of only local models: no job at all

        trusting = stack.memory(chain=chain, local_providers=frozenset({"local"}),
                                extract_with_local=True)
        openai_fake.script(facts_answer(about_alice("Alice owns a boat")))
        result = await trusting.learn_now(msg("I own a boat"), Reply("Cool", served_by="local"))
        assert [f.text for f in result.added] == ["Alice owns a boat"]


async def test_reply_does_not_wait_for_extraction(
    stack: Stack, chain: FallbackChain, openai_fake: FakeOpenAI, tmp_path: Path,
) -> None:
    memory = stack.memory(chain=chain)
    async with Database(f"sqlite+aiosqlite:///{tmp_path / 'conv.sqlite'}") as database:
        conversation = Conversation(bot="helper", persona="You are helpful.", chain=chain,
                                    store=SqlConversationStore(database), memory=memory)
        # The reply streams normally; the extraction request then hangs forever.
        openai_fake.script(Text(["Hello", " Alice"]), Hang(after=0))
        items = [item async for item in conversation.reply(msg("I live in Paris"))]
        final = items[-1]
        assert isinstance(final, Reply) and final.text == "Hello Alice" and final.error is None
        # The reply is complete, and only now does the extraction request arrive and hang.
        await asyncio.wait_for(openai_fake.wait_for_requests(2), 10)
        assert stack.jobs.pending == 1
        assert openai_fake.requests[1].body["response_format"] == {"type": "json_object"}
        assert await stack.store.count("helper") == 0
    # Shutdown does not wait forever for a hung job: it is cancelled after the grace time.
    await stack.jobs.aclose(within_s=0.2)
    assert stack.jobs.pending == 0


async def test_learn_runs_in_the_background_and_drains(
    stack: Stack, chain: FallbackChain, openai_fake: FakeOpenAI,
) -> None:
    memory = stack.memory(chain=chain)
    openai_fake.script(facts_answer(about_alice("Alice has two cats")))
    memory.learn(msg("I have two cats"), REPLY)
    memory.learn(msg("hello there"), Reply(text="", served_by=None, error="all_failed"))
    memory.learn(msg("thanks!"), REPLY)  # one word: not worth a model call
    assert await stack.jobs.drain(30)
    assert [f.text for f in await stack.store.list_facts("helper")] == ["Alice has two cats"]
    assert openai_fake.count == 1


async def test_recall_log_upserts_per_chat_on_sqlite_and_postgres(database_url: str) -> None:
    async with Database(database_url) as database:
        log = SqlRecallLog(database)
        fact = RecalledFact(id="f1", score=0.81, text="Alice likes tea", user=ALICE)
        for i, chat in enumerate(["c1", "c2", "c1"]):
            await log.record(RecallRecord(
                bot="helper", chat=chat, message_id=f"m{i}", query="tea?", facts=(fact,),
                created_at=datetime(2026, 1, 1, 12, i, tzinfo=UTC)))
        last = await log.last("helper", "c1")
        assert last is not None and last.message_id == "m2" and last.facts == (fact,)
        assert last.created_at == datetime(2026, 1, 1, 12, 2, tzinfo=UTC)
        assert [r.chat for r in await log.chats("helper")] == ["c1", "c2"]
        assert await log.last("other-bot", "c1") is None
        # A forgotten fact disappears from every record of the bot.
        assert await log.scrub("helper", ["f1"]) == 2
        assert [r.facts for r in await log.chats("helper")] == [(), ()]


# --- property: recall never shows what the bot or the speaker may not see -------------

PLATFORMS = ("telegram", "discord", "slack")
PEOPLE = ("ana", "ben", "chen", "dora", "emil")
GROUPS = ("ops", "sales", "dev")
READERS = ("helper", "scout", "critic")
TOPICS = ("coffee", "the office", "holidays", "a dog", "chess", "the deadline", "music")


@dataclass
class World:
    loop: asyncio.AbstractEventLoop
    stack: Stack
    close: Any


@pytest.fixture
def world(tmp_path: Path, embedder: Any) -> Any:
    """Own and shared memories about many users, levels and groups (one loop for all examples)."""
    import random

    loop = asyncio.new_event_loop()
    rng = random.Random(7)

    async def build() -> World:
        uri = str(tmp_path / "lancedb")
        store = await LanceMemoryStore.open(uri, embedder)
        shared = await SharedMemory.open(uri, embedder)
        await shared.__aenter__()
        database = Database(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
        await database.start()
        users = ["", *(f"{p}:{u}" for p in PLATFORMS for u in PEOPLE)]
        for bot in READERS:
            await store.add_many([
                Fact(id="", text=f"{(u or 'everyone').split(':')[-1]} talks about {t}",
                     bot=bot, user=u)
                for u in users for t in rng.sample(TOPICS, 2)
            ])
        for _ in range(40):
            level = rng.choice(("public", "trusted", "private"))
            await shared.publish(
                Fact(id="", text=f"shared note on {rng.choice(TOPICS)}",
                     bot=rng.choice(READERS), user=rng.choice(users)),
                level, rng.choice(GROUPS) if level == "trusted" else "")

        async def close() -> None:
            await shared.__aexit__(None, None, None)
            await store.__aexit__(None, None, None)
            await database.close()

        stack = Stack(store, shared, SqlRecallLog(database), embedder, Background())
        return World(loop, stack, close)

    built = loop.run_until_complete(build())
    yield built
    loop.run_until_complete(built.close())
    loop.close()


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    reader=st.sampled_from(READERS),
    groups=st.lists(st.sampled_from(GROUPS), max_size=2, unique=True),
    platform=st.sampled_from(PLATFORMS),
    speaker=st.sampled_from([*PEOPLE, "", "stranger", "o'brien \"x\""]),
    is_group=st.booleans(),
    topic=st.sampled_from(TOPICS),
    top_k=st.integers(min_value=1, max_value=20),
)
def test_recall_never_returns_what_the_bot_or_speaker_may_not_see(
    world: World, reader: str, groups: list[str], platform: str, speaker: str,
    is_group: bool, topic: str, top_k: int,
) -> None:
    memory = world.stack.memory(bot=reader, trust_groups=tuple(groups), top_k=top_k,
                                min_score=-1.0)
    message = IncomingMessage(platform=platform, bot=reader, chat="c",  # type: ignore[arg-type]
                              user=user_key(platform, speaker),
                              text=f"what do I know about {topic}?", is_group=is_group)
    recalled = world.loop.run_until_complete(memory.recall(message))
    allowed = {f"{platform}:{speaker}", ""} if speaker else {""}
    assert recalled, "general facts always match something"
    assert len(recalled) <= top_k
    for fact in recalled:
        assert fact.user in allowed
        if fact.trust_level is None:
            assert fact.bot == reader  # own memories of this bot only
        else:
            assert (fact.trust_level == "public"
                    or (fact.trust_level == "trusted" and fact.trust_group in groups)
                    or (fact.trust_level == "private" and fact.author_bot == reader))


async def test_a_broken_shared_table_still_recalls_own_facts(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    peanuts = await add(stack, "Alice is allergic to peanuts", ALICE)
    await stack.shared.publish(Fact(id="", text="Peanut oil is used in the canteen", bot="x"),
                               "public")
    db = await lancedb.connect_async(str(tmp_path / "lancedb"))
    await db.drop_table("shared_memories")  # gone under the running store's feet
    with caplog.at_level(logging.WARNING):
        recalled = await stack.memory(min_score=0.1).recall(msg("am I allergic to peanuts?"))
    assert [f.id for f in recalled] == [peanuts.id]
    assert "shared memory search failed" in caplog.text


async def test_extraction_and_judging_tokens_are_recorded_and_count_for_budgets(
    stack: Stack, chain: FallbackChain, openai_fake: FakeOpenAI, tmp_path: Path,
) -> None:
    async with Database(f"sqlite+aiosqlite:///{tmp_path / 'usage.sqlite'}") as database:
        usage = UsageAccounting(SqlUsageStore(database),
                                prices={"primary": Price(1_000_000.0, 0.0)})  # $1 per token
        memory = BotMemory(MemoryConfig(bot="helper"), store=stack.store,
                           embedder=stack.embedder, jobs=stack.jobs, chain=chain,
                           usage=usage.extraction)  # as the composition root wires it
        await add(stack, "Alice lives in Paris", ALICE, chat="group-1")
        raw = json.dumps({"facts": [about_alice("Alice lives in Berlin")]})
        openai_fake.script(Text([raw], usage=(300, 20)),
                           Text([json.dumps({"action": "update", "target": 1})], usage=(100, 5)))
        result = await memory.learn_now(msg("I moved to Berlin"), REPLY)
        assert len(result.superseded) == 1
        [line] = await usage.store.summary(since=datetime(2000, 1, 1, tzinfo=UTC), bot="helper")
        assert (line.provider, line.kind, line.replies, line.prompt_tokens,
                line.completion_tokens) == ("primary", "extraction", 2, 400, 25)
        assert (await usage.spent_today("helper"))[ALICE] == pytest.approx(400.0)
