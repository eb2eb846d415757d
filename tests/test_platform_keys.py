"""The user key on every platform: the REAL python-telegram-bot, slack-bolt and
discord.py against their fakes (tests/fakes/), with the real memory pipeline
(real embeddings, LanceDB in a tmp dir, extraction through the real chain).

A fact an admin adds for the documented form (``telegram:42``) reaches that
person's prompt and no one else's; what the bot learns from them is stored
under exactly that key; ``forget --user`` in that form deletes it all. Before
the fix the policy prefixed the adapters' key again (``telegram:telegram:42``)
and every one of these missed the real user.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine.admin.memory import BotInfo, MemoryAdmin
from engine.background import Background
from engine.conversation import Conversation
from engine.memory.policy import BotMemory, MemoryConfig
from tests.conftest import BotPipeline
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.openai_server import Text
from tests.fakes.slack_server import FakeSlack
from tests.fakes.telegram_server import start_telegram_fake
from tests.test_discord import adapter as discord_adapter
from tests.test_slack import adapter as slack_adapter
from tests.test_slack import message_event
from tests.test_telegram import adapter as telegram_adapter

LOCKER = "Ada's locker number is 314"
LEARNED = {"facts": [{"text": "Ada keeps a bonsai called Kiko", "about": "speaker",
                      "category": "personal", "importance": 0.9}]}


@dataclass
class Memory:
    admin: MemoryAdmin
    jobs: Background


@pytest.fixture
async def memory(bot_pipeline: BotPipeline, embedder: Any, tmp_path: Path
                 ) -> AsyncIterator[Memory]:
    from persistence.vectors.memory import LanceMemoryStore

    async with await LanceMemoryStore.open(str(tmp_path / "lancedb"), embedder) as store, \
            Background(name="keys") as jobs:
        policy = BotMemory(MemoryConfig(bot="demo", min_score=0.2), store=store,
                           embedder=embedder, jobs=jobs, chain=bot_pipeline.chain)
        old = bot_pipeline.conversation
        bot_pipeline.conversation = Conversation(
            bot="demo", persona="You are terse.", chain=old.chain, store=old.store,
            memory=policy, observers=[bot_pipeline])
        yield Memory(MemoryAdmin(store, bots={"demo": BotInfo("demo")}), jobs)


Ask = Callable[[str, str], Awaitable[None]]  # (platform user id, text) -> answered


async def check_keys(pipeline: BotPipeline, memory: Memory, ask: Ask, *, platform: str,
                     owner: str, other: str, owner_chat: str) -> None:
    """``owner`` and ``other`` are platform ids; keys are ``platform:id`` as documented."""
    owner_key, other_key = f"{platform}:{owner}", f"{platform}:{other}"
    await memory.admin.add("demo", LOCKER, user=owner_key)
    fake = pipeline.fake
    fake.script(Text(["Noted."]), Text([json.dumps(LEARNED)]))
    await ask(owner, "what is my locker number? I keep a bonsai called Kiko")
    assert await memory.jobs.drain(30)
    assert "314" in json.dumps(fake.requests[0].messages)  # recalled for its person
    seen = len(fake.requests)
    fake.script(Text(["No idea."]), Text(['{"facts": []}']))
    await ask(other, "what is my locker number? what plant do I keep?")
    assert await memory.jobs.drain(30)
    for request in fake.requests[seen:]:  # nobody else's prompt
        assert "314" not in json.dumps(request.messages)
        assert "Kiko" not in json.dumps(request.messages)

    facts = await memory.admin.list_facts("demo", user=owner_key)
    assert {f.text for f in facts} == {LOCKER, "Ada keeps a bonsai called Kiko"}
    assert {f.user for f in await memory.admin.list_facts("demo")} == {owner_key}
    history = await pipeline.conversation.store.history("demo", owner_chat, platform=platform)
    assert {m.user for m in history if m.role == "user"} == {owner_key}
    assert await memory.admin.forget_user("demo", owner_key) == 2
    assert await memory.admin.list_facts("demo") == []
    assert other_key not in {f.user for f in facts}


async def test_telegram_user_key(bot_pipeline: BotPipeline, memory: Memory) -> None:
    async with start_telegram_fake() as tg:
        async with telegram_adapter(tg, bot_pipeline):
            async def ask(user: str, text: str) -> None:
                before = len(bot_pipeline.replies)
                tg.push_message(int(user), text, user_id=int(user))
                await tg.wait_for(lambda: len(bot_pipeline.replies) > before)

            await check_keys(bot_pipeline, memory, ask, platform="telegram", owner="42",
                             other="7", owner_chat="42")


async def test_slack_user_key(bot_pipeline: BotPipeline, memory: Memory) -> None:
    async with FakeSlack() as slack:
        async with slack_adapter(slack, bot_pipeline):
            async def ask(user: str, text: str) -> None:
                before = len(bot_pipeline.replies)
                await slack.push("events_api", message_event(f"D{user}", text, user=user,
                                                             im=True))
                await slack.wait_for(lambda: len(bot_pipeline.replies) > before)

            await check_keys(bot_pipeline, memory, ask, platform="slack", owner="U024BE7LH",
                             other="U0BOB0007", owner_chat="DU024BE7LH")


async def test_discord_user_key(bot_pipeline: BotPipeline, memory: Memory) -> None:
    owner, other = 510000000000000042, 510000000000000007
    async with FakeDiscord(channels=()) as discord:
        async with discord_adapter(discord, bot_pipeline):
            async def ask(user: str, text: str) -> None:
                before = len(bot_pipeline.replies)
                await discord.message_create(channel_id=int(user) + 1, content=text,
                                             author_id=int(user), guild=False)
                await asyncio.wait_for(discord.wait_for(
                    lambda: len(bot_pipeline.replies) > before), 30)

            await check_keys(bot_pipeline, memory, ask, platform="discord", owner=str(owner),
                             other=str(other), owner_chat=str(owner + 1))


async def test_a_command_names_users_in_the_documented_form(
    bot_pipeline: BotPipeline, memory: Memory,
) -> None:
    """``/memory list telegram:42`` and ``/memory list 42`` (typed on Telegram) find them.

    The adapter's admins are ``42`` (tests/test_telegram.py ``ADMIN``)."""
    await memory.admin.add("demo", LOCKER, user="telegram:42")
    async with start_telegram_fake() as tg:
        tg_adapter = telegram_adapter(tg, bot_pipeline)
        tg_adapter.commands.memory = memory.admin  # the memory admin the wiring would give
        async with tg_adapter:
            for typed in ("telegram:42", "42"):
                before = len(tg.in_chat(42))
                tg.push_message(42, f"/memory list {typed}", user_id=42)
                await tg.wait_for(lambda n=before: len(tg.in_chat(42)) > n)  # type: ignore[misc]
                assert "locker number is 314" in tg.in_chat(42)[-1].text
            tg.push_message(42, "/memory list discord:42", user_id=42)
            await tg.wait_for(lambda: len(tg.in_chat(42)) > before + 1)
            assert "none" in tg.in_chat(42)[-1].text
