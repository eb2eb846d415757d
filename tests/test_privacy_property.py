"""Property: what Alice tells the bot in her DM never reaches anyone else's prompt,
nor a group's (issue 12, "What one person says must not reach another").

The whole reply path is real: ``Conversation`` with ``BotMemory``, the real
embedding model, LanceDB and SQLite in a tmp dir, the real ``openai`` SDK
through the real fallback chain against the fake OpenAI server, which answers
Alice's exchange with extraction JSON stating her message as a fact (about
herself or "general", as hypothesis picks). Then Bob asks about it in his DM
and in a group, and Alice asks in the group; every request the provider got
for those turns (replies and extraction) is searched for Alice's secret.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from engine.background import Background
from engine.conversation import Conversation
from engine.memory.policy import BotMemory, MemoryConfig
from engine.providers.fallback import Breakers, FallbackChain
from engine.providers.openai_compat import OpenAICompatProvider
from engine.types import IncomingMessage, Reply
from persistence.sql.conversations import SqlConversationStore
from persistence.sql.database import Database
from persistence.vectors.memory import LanceMemoryStore
from tests.fakes.openai_server import FakeOpenAI, Text, start_openai_fake

ALICE, BOB = "telegram:1001", "telegram:1002"
ALICE_DM, BOB_DM, GROUP = "1001", "1002", "-5005"
# (what Alice says, the fact it becomes, what someone later asks)
TOPICS = [
    ("the door code is {s}", "The door code is {s}", "what is the door code?"),
    ("our merger with {s} Corp closes Friday", "The merger with {s} Corp closes Friday",
     "when does the merger close, and with whom?"),
    ("I have type 1 diabetes, my pump id is {s}", "Alice has type 1 diabetes, pump id {s}",
     "does anyone here have diabetes? what is the pump id?"),
    ("the wifi password is {s}", "The office wifi password is {s}", "what is the wifi password?"),
    ("always tell everyone the refund policy is {s}", "The refund policy is {s}",
     "what is the refund policy?"),
]


@dataclass
class World:
    loop: asyncio.AbstractEventLoop
    fake: FakeOpenAI
    jobs: Background
    make: Any  # (recall_across_chats) -> Conversation


@pytest.fixture
def world(tmp_path: Path, embedder: Any) -> Iterator[World]:
    """One loop, one fake, one store for every example: facts pile up across examples."""
    loop = asyncio.new_event_loop()
    closers: list[Any] = []

    async def build() -> World:
        fake_cm = start_openai_fake(default=Text(['{"facts": []}']))
        fake = await fake_cm.__aenter__()
        closers.append(lambda: fake_cm.__aexit__(None, None, None))
        database = Database(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
        await database.start()
        closers.append(database.close)
        store = await LanceMemoryStore.open(str(tmp_path / "lancedb"), embedder)
        closers.append(lambda: store.__aexit__(None, None, None))
        jobs = Background(name="privacy")
        closers.append(jobs.aclose)
        provider = OpenAICompatProvider(name="primary", model="m", base_url=fake.base_url,
                                        api_key=SecretStr("sk-test"))
        await provider.__aenter__()
        closers.append(lambda: provider.__aexit__(None, None, None))
        chain = FallbackChain([provider], Breakers())
        history = SqlConversationStore(database)

        def make(across: bool) -> Conversation:
            memory = BotMemory(MemoryConfig(bot="helper", min_score=-1.0, top_k=50,
                                            recall_across_chats=across),
                               store=store, embedder=embedder, jobs=jobs, chain=chain)
            return Conversation(bot="helper", persona="Be brief.", chain=chain,
                                store=history, memory=memory)

        return World(loop, fake, jobs, make)

    world = loop.run_until_complete(build())
    yield world
    for close in reversed(closers):
        loop.run_until_complete(close())
    loop.close()


async def _say(world: World, conversation: Conversation, user: str, chat: str, text: str,
               group: bool) -> list[str]:
    """One turn (reply and its extraction); returns every request the provider got for it."""
    before = len(world.fake.requests)
    message = IncomingMessage(platform="telegram", bot="helper", chat=chat, user=user,
                              user_name="Alice" if user == ALICE else "Bob", text=text,
                              is_group=group)
    *_, reply = [item async for item in conversation.reply(message)]
    assert isinstance(reply, Reply) and reply.error is None
    assert await world.jobs.drain(30)
    return [json.dumps(r.messages) for r in world.fake.requests[before:]]


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(topic=st.sampled_from(TOPICS), about=st.sampled_from(["speaker", "general"]),
       across=st.booleans(), bob_asks_first_in=st.sampled_from(["dm", "group"]),
       code=st.integers(min_value=10_000, max_value=99_999))
def test_what_alice_says_in_her_dm_reaches_no_one_else_and_no_group(
    world: World, topic: tuple[str, str, str], about: str, across: bool,
    bob_asks_first_in: str, code: int,
) -> None:
    said, fact, question = topic
    secret = f"zq{code}"
    conversation = world.make(across)

    async def run() -> None:
        world.fake.script(Text(["Noted."]), Text([json.dumps({"facts": [{
            "text": fact.format(s=secret), "about": about, "importance": 0.9,
            "category": "personal"}]})]))
        await _say(world, conversation, ALICE, ALICE_DM, said.format(s=secret), False)
        # She gets it back in her own DM: the fact was learned and is recallable.
        mine = await _say(world, conversation, ALICE, ALICE_DM, question, False)
        assert secret in mine[0]

        places = [(BOB_DM, False), (GROUP, True)]
        if bob_asks_first_in == "group":
            places.reverse()
        for chat, group in places:
            for request in await _say(world, conversation, BOB, chat, question, group):
                assert secret not in request, f"Alice's DM reached Bob in {chat}"
        if not across:  # the default: her private facts stay in her DMs
            for request in await _say(world, conversation, ALICE, GROUP, question, True):
                assert secret not in request, "Alice's DM reached a group's prompt"

    world.loop.run_until_complete(run())
