"""Admin commands over the real admin operations and stores.

Memory: the real LanceDB store with the real embedding model; files: the real
SQLite + directory file store; providers: a real FallbackChain against the
fake OpenAI server, with the real ``LastReplies`` observer fed by a real
``Conversation``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from adapters.chat.commands import COMMANDS, Caller, Commands, is_command, parse
from engine.admin.bot import FileAdmin, LastReplies, PersonaAdmin, ProviderAdmin
from engine.admin.memory import BotInfo, MemoryAdmin
from engine.conversation import Conversation
from engine.providers.fallback import Breakers, FallbackChain
from engine.providers.openai_compat import OpenAICompatProvider
from engine.types import IncomingMessage, RecalledFact, RecallRecord, Reply
from persistence.sql.conversations import SqlConversationStore
from persistence.sql.database import Database
from persistence.sql.files import SqlFileStore
from persistence.sql.recall_log import SqlRecallLog
from persistence.vectors.memory import LanceMemoryStore
from tests.fakes.openai_server import FakeOpenAI, Text

ADMIN = Caller(platform="telegram", chat="100", user="42")
STRANGER = Caller(platform="telegram", chat="100", user="7")


@dataclass
class Rig:
    commands: Commands
    files: SqlFileStore
    memory: MemoryAdmin
    recall_log: SqlRecallLog
    conversation: Conversation


@pytest.fixture
async def rig(tmp_path: Path, embedder: Any, openai_fake: FakeOpenAI) -> AsyncIterator[Rig]:
    async with (
        Database(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}") as db,
        await LanceMemoryStore.open(str(tmp_path / "lancedb"), embedder) as store,
        OpenAICompatProvider(name="primary", model="primary-model",
                             base_url=openai_fake.base_url,
                             api_key=SecretStr("sk-test")) as provider,
    ):
        chain = FallbackChain([provider], Breakers())
        last = LastReplies()
        conversation = Conversation(bot="demo", persona="You are terse.", chain=chain,
                                    store=SqlConversationStore(db), observers=[last])
        files = SqlFileStore(db, tmp_path / "data", max_file_bytes=10_000, max_bot_bytes=50_000)
        recall_log = SqlRecallLog(db)
        memory = MemoryAdmin(store, {"demo": BotInfo("demo")}, recall_log=recall_log)
        commands = Commands(
            bot="demo", admins=["42", "slack:U1"], memory=memory,
            providers=ProviderAdmin({"demo": chain}, last), files=FileAdmin(files),
            persona=PersonaAdmin({"demo": conversation}),
        )
        yield Rig(commands, files, memory, recall_log, conversation)


def test_parse() -> None:
    assert parse("/memory@Demo_Bot search  cats and dogs ") == ("memory", "search  cats and dogs")
    assert parse("/PROVIDER") == ("provider", "")
    assert parse("hello") is None and parse("/") is None and parse("") is None
    assert is_command("/files list") and not is_command("/frobnicate")
    assert all(len(spec.description) <= 100 for spec in COMMANDS)


async def test_non_admin_is_refused_politely_and_help_is_open(rig: Rig) -> None:
    for name in ("memory", "provider", "files", "usage", "bot"):
        answer = await rig.commands.run(STRANGER, name, "list")
        assert answer == f"Sorry, only this bot's admins can use /{name}."
    assert "/memory" in await rig.commands.run(STRANGER, "help", "")
    # a platform admin (where the adapter trusts the platform) and a namespaced id pass
    assert rig.commands.is_admin(Caller("discord", "c", "9", is_platform_admin=True))
    assert rig.commands.is_admin(Caller("slack", "c", "U1"))
    assert not rig.commands.is_admin(Caller("discord", "c", "U1"))


async def test_unknown_command_and_bad_arguments(rig: Rig) -> None:
    unknown = await rig.commands.run(ADMIN, "frobnicate", "now")
    assert unknown.startswith("Unknown command /frobnicate.") and "/files" in unknown
    long_name = await rig.commands.run(ADMIN, "x" * 5000, "")
    assert len(long_name) < 200
    assert (await rig.commands.run(ADMIN, "memory", "")).startswith("Usage: `/memory")
    assert (await rig.commands.run(ADMIN, "files", "delete abc")).startswith("A file id")
    assert (await rig.commands.run(ADMIN, "memory", 'search "unbalanced')).startswith(
        "Memories matching")  # unbalanced quotes fall back to plain words
    assert await rig.commands.run(ADMIN, "usage", "") == "Usage accounting is not available yet."


async def test_memory_list_search_forget_why(rig: Rig) -> None:
    vegetarian = await rig.memory.add("demo", "Alice is vegetarian", user="telegram:7")
    await rig.memory.add("demo", "The office is in Lyon")
    listed = await rig.commands.run(ADMIN, "memory", "list")
    assert "Alice is vegetarian" in listed and "The office is in Lyon" in listed
    assert f"`{vegetarian.id}`" in listed
    found = await rig.commands.run(ADMIN, "memory", "search what does Alice eat")
    assert found.index("Alice is vegetarian") < found.index("The office is in Lyon")
    await rig.recall_log.record(RecallRecord(
        bot="demo", chat="100", message_id="5", query="lunch?",
        facts=(RecalledFact(id=vegetarian.id, score=0.71, text="Alice is vegetarian"),)))
    why = await rig.commands.run(ADMIN, "memory", "why")
    assert "recalled 1 memories" in why and "0.71" in why and vegetarian.id in why
    assert await rig.commands.run(ADMIN, "memory", f"forget {vegetarian.id}") == \
        f"Forgot memory `{vegetarian.id}`."
    assert "Alice" not in await rig.commands.run(ADMIN, "memory", "list")
    assert await rig.commands.run(ADMIN, "memory", "forget nope") == "No memory `nope`."


async def test_files_list_and_delete(rig: Rig) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"some,data\n"

    stored = await rig.files.save(bot="demo", platform="telegram", chat="100",
                                  uploader="telegram:7", name="../report.csv",
                                  mime_type="text/csv", chunks=chunks())
    listed = await rig.commands.run(ADMIN, "files", "list")
    assert f"`{stored.id}` report.csv (text/csv, 10 B, from telegram:7)" in listed
    assert await rig.commands.run(ADMIN, "files", f"delete {stored.id}") == \
        f"Deleted file `{stored.id}`."
    assert await rig.commands.run(ADMIN, "files", "list") == "No stored files."


async def test_provider_status_names_who_served(rig: Rig, openai_fake: FakeOpenAI) -> None:
    before = await rig.commands.run(ADMIN, "provider", "status")
    assert "**primary**" in before and "closed" in before
    assert "No reply served since the bot started." in before
    openai_fake.script(Text(["Hi."]))
    items = [item async for item in rig.conversation.reply(IncomingMessage(
        platform="telegram", bot="demo", chat="100", user="telegram:7", text="hello"))]
    assert isinstance(items[-1], Reply)
    after = await rig.commands.run(ADMIN, "provider", "")
    assert "served by primary (primary-model)" in after


async def test_bot_persona_show_and_change(rig: Rig) -> None:
    assert "You are terse." in await rig.commands.run(ADMIN, "bot", "persona")
    changed = await rig.commands.run(ADMIN, "bot", "persona You speak like a pirate.")
    assert changed.startswith("Persona changed")
    assert rig.conversation.persona == "You speak like a pirate."
    too_long = await rig.commands.run(ADMIN, "bot", "persona " + "x" * 5000)
    assert "1 to 4000 characters" in too_long
    assert rig.conversation.persona == "You speak like a pirate."


async def test_forget_me_confirmation_expires_and_is_about_the_caller_only(
    tmp_path: Path, embedder: Any
) -> None:
    from engine.admin.people import ForgetRequests, PeopleAdmin
    from persistence.sql.erasure import SqlErasure

    now = [1000.0]
    async with (
        Database(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}") as db,
        await LanceMemoryStore.open(str(tmp_path / "lancedb"), embedder) as store,
    ):
        history = SqlConversationStore(db)
        people = PeopleAdmin(bots=["demo"], records=SqlErasure(db), memory=store)
        commands = Commands(bot="demo", people=people, history=history,
                            forget_requests=ForgetRequests(clock=lambda: now[0]))
        alice = Caller(platform="telegram", chat="7", user="7", is_group=False)
        await history.add(bot="demo", chat="7", role="user", user="telegram:7", content="hi")
        await history.add(bot="demo", chat="100", role="user", user="telegram:8",
                          content="someone else")
        assert "1 message" in await commands.run(alice, "forget", "me")
        now[0] += 301  # more than five minutes later
        assert "first" in await commands.run(alice, "forget", "me confirm")
        assert len(await history.history("demo", "7")) == 1  # nothing deleted
        await commands.run(alice, "forget", "me")
        now[0] += 299
        assert (await commands.run(alice, "forget", "me confirm")).startswith("Done")
        assert await history.history("demo", "7") == []
        assert len(await history.history("demo", "100")) == 1  # nobody else's
        assert "Usage: `/forget me [confirm]`" in await commands.run(alice, "forget", "telegram:8")
        # /reset: anyone in a DM, admins only in a group (is_group defaults to the stricter)
        assert "reset" in await commands.run(alice, "reset", "")
        refused = await commands.run(Caller(platform="telegram", chat="100", user="8"), "reset", "")
        assert "only this bot's admins" in refused
