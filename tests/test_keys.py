"""User keys and conversation keys (issue 12: the user key; issue 13 item 16).

- A conversation is (bot, platform, chat): a Telegram chat and a Discord
  channel with the same id never share a transcript (real Conversation, real
  SQL store on SQLite and PostgreSQL, the real ``openai`` SDK against the fake).
- Migration ``0007_keys`` rewrites what was stored before, on both databases.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from alembic import command
from pydantic import SecretStr
from sqlalchemy import pool, text
from sqlalchemy.ext.asyncio import create_async_engine

from engine.conversation import Conversation
from engine.errors import AdminError
from engine.memory.scope import learned_place, normalize_key, parse_user, recall_scope, user_key
from engine.providers.fallback import Breakers, FallbackChain
from engine.providers.openai_compat import OpenAICompatProvider
from engine.types import Capabilities, Fact, IncomingMessage, Reply
from persistence.sql.conversations import SqlConversationStore
from persistence.sql.database import Database, alembic_config, head_revision
from tests.fakes.openai_server import FakeOpenAI, Text


def test_the_user_key_is_platform_colon_id_and_bare_ids_need_a_platform() -> None:
    assert user_key("telegram", 7) == "telegram:7"
    assert user_key("slack", "U024BE7LH") == "slack:U024BE7LH"
    assert user_key("terminal", "local") == "terminal:local"
    assert user_key("discord", "") == ""
    assert parse_user("telegram:7") == "telegram:7"
    assert parse_user("  telegram:7 ") == "telegram:7"
    assert parse_user("telegram:telegram:7") == "telegram:7"  # an export made before the fix
    assert parse_user("7", "telegram") == "telegram:7"  # `/memory list 7` typed on Telegram
    assert parse_user("") == ""
    for bad in ("7", "alice", "telegram:", "irc:7"):
        with pytest.raises(AdminError, match=r"platform|no id"):
            parse_user(bad)
    assert normalize_key("discord:discord:discord:9") == "discord:9"
    assert normalize_key("terminal:telegram:7") == "terminal:telegram:7"  # a name, kept


def test_a_slack_thread_learns_and_recalls_as_its_channel() -> None:
    """What is said in a thread is said in its channel (all of it can read it)."""
    def slack(chat: str, user: str = "UALICE", group: bool = True) -> IncomingMessage:
        return IncomingMessage(platform="slack", bot="b", chat=chat, user=user_key("slack", user),
                               text="x", is_group=group)

    assert learned_place(slack("C1/1764064000.000100"), about_speaker=False) == ("", "C1")
    assert learned_place(slack("C1"), about_speaker=True) == ("slack:UALICE", "C1")
    assert learned_place(slack("D9/17.1", group=False), about_speaker=False) == (
        "slack:UALICE", "D9")
    lunch = Fact(id="f", text="Lunch at noon", bot="b", chat="C1")
    dm_fact = Fact(id="g", text="Door code", bot="b", user="slack:UALICE", chat="D9")
    assert recall_scope(slack("C1/1764069999.000200", "UBOB")).allows(lunch)
    assert not recall_scope(slack("C2", "UBOB")).allows(lunch)
    assert not recall_scope(slack("C1")).allows(dm_fact)
    assert recall_scope(slack("D9", group=False)).allows(dm_fact)
    assert not recall_scope(slack("D8", "UBOB", group=False)).allows(dm_fact)


async def test_the_same_chat_id_on_two_platforms_is_two_conversations(
    database_url: str, openai_fake: FakeOpenAI,
) -> None:
    async with Database(database_url) as db, OpenAICompatProvider(
        name="primary", model="m", base_url=openai_fake.base_url, api_key=SecretStr("sk-test"),
        capabilities=Capabilities(context_window=32_768), timeout_s=10,
    ) as provider:
        store = SqlConversationStore(db)
        conversation = Conversation(bot="demo", persona="Be brief.", store=store,
                                    chain=FallbackChain([provider], Breakers()))

        async def ask(platform: str, text_: str) -> None:
            message = IncomingMessage(platform=platform, bot="demo", chat="100",  # type: ignore[arg-type]
                                      user=user_key(platform, 5), text=text_)
            *_, reply = [item async for item in conversation.reply(message)]
            assert isinstance(reply, Reply) and reply.error is None

        openai_fake.default = Text(["ok"])
        await ask("telegram", "the vault code is 0451")
        await ask("discord", "what did I tell you?")
        discord_prompt = json.dumps(openai_fake.requests[-1].messages)
        assert "0451" not in discord_prompt
        await ask("telegram", "and what did I say before?")
        assert "0451" in json.dumps(openai_fake.requests[-1].messages)
        assert await store.count("demo", "100", platform="telegram") == 4
        assert await store.count("demo", "100", platform="discord") == 2


async def _migrate_to(url: str, revision: str) -> None:
    engine = create_async_engine(url, poolclass=pool.NullPool)

    def upgrade(connection: object) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    async with engine.begin() as connection:
        await connection.run_sync(upgrade)
    await engine.dispose()


async def test_migration_0007_rewrites_stored_keys(database_url: str) -> None:
    await _migrate_to(database_url, "0006_usage_kind")
    now = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    engine = create_async_engine(database_url, poolclass=pool.NullPool)
    recalled = [{"id": "f1", "score": 0.8, "text": "Ada likes tea", "source": "own",
                 "user": "telegram:telegram:7", "author_bot": ""},
                {"id": "f2", "score": 0.5, "text": "Lunch is at noon", "source": "own",
                 "user": "", "author_bot": ""}]
    async with engine.begin() as conn:
        insert = text('INSERT INTO messages (bot, chat, role, content, "user", platform, '
                      "user_name, created_at) VALUES (:bot, :chat, 'user', :content, :user, "
                      ":platform, '', :at)")
        await conn.execute(insert, [
            {"bot": "demo", "chat": "terminal", "content": "hi", "user": "local",
             "platform": "terminal", "at": now},
            {"bot": "demo", "chat": "100", "content": "old row", "user": "telegram:7",
             "platform": "", "at": now},
            {"bot": "demo", "chat": "100", "content": "from discord", "user": "discord:7",
             "platform": "discord", "at": now},
        ])
        await conn.execute(text(
            "INSERT INTO recall_log (bot, chat, message_id, query, facts, created_at) "
            "VALUES ('demo', '100', 'm1', 'q', :facts, :at)"),
            {"facts": json.dumps(recalled), "at": now})
    await engine.dispose()

    async with Database(database_url) as db:
        assert await db.revision() == head_revision()
        store = SqlConversationStore(db)
        [terminal] = await store.history("demo", "terminal", platform="terminal")
        assert terminal.user == "terminal:local"
        assert [m.content for m in await store.history("demo", "100", platform="telegram")] \
            == ["old row"]
        assert [m.content for m in await store.history("demo", "100", platform="discord")] \
            == ["from discord"]
        async with db.engine.connect() as conn:
            facts = json.loads((await conn.execute(text(
                "SELECT facts FROM recall_log WHERE bot = 'demo'"))).scalar_one())
        assert [f["user"] for f in facts] == ["telegram:7", ""]
    async with Database(database_url) as db:  # idempotent: a second start changes nothing
        [terminal] = await SqlConversationStore(db).history("demo", "terminal")
        assert terminal.user == "terminal:local"
