"""People's data end to end on Telegram: ``/forget me``, ``/reset``, documents in history.

The REAL python-telegram-bot against the fake Bot API, the whole app built
from a config shaped like the shipped example (``build_app``: SQLite, LanceDB,
the real embedding model, file storage), the real ``openai`` SDK against the
fake OpenAI server. After ``/forget me`` + ``/forget me confirm`` every SQL
table, every LanceDB table and every stored file is scanned for the person.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import lancedb
import pytest
from pydantic import SecretStr

from adapters.chat.commands import Commands
from adapters.platforms.telegram import TelegramAdapter, TelegramConfig
from adapters.wiring.app import App
from adapters.wiring.build import build_app
from adapters.wiring.people import files
from adapters.wiring.platforms import commands_for
from adapters.wiring.settings import load_settings
from engine.types import IncomingMessage, Reply
from tests.conftest import BotPipeline
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.telegram_server import FakeTelegram, start_telegram_fake

ALICE, BOB, ADMIN, GROUP = 42, 7, 1, -1001

CONFIG = """
[storage]
data_dir = "{data}"

[providers.primary]
kind = "openai_compatible"
base_url = "{base_url}"
model = "fake-model"

[bots.demo]
chain = ["primary"]
[bots.demo.memory]
extract = false
min_score = -1.0

[bots.demo.telegram]
token_env = "TELEGRAM_TOKEN"
admins = ["telegram:{admin}"]
"""


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with start_telegram_fake() as fake:
        yield fake


class Replies:
    """A ``ReplyObserver``: counts finished replies."""

    def __init__(self) -> None:
        self.done: list[Reply] = []

    async def on_reply(self, message: IncomingMessage, reply: Reply) -> None:
        self.done.append(reply)


def telegram(app: App, tg: FakeTelegram, commands: Commands, bot: str = "demo") -> TelegramAdapter:
    config = TelegramConfig(bot=bot, token=SecretStr(tg.token), api_base_url=tg.url,
                            poll_timeout_s=2, admins=(f"telegram:{ADMIN}",))
    return TelegramAdapter(config, replier=app.conversations[bot], commands=commands,
                           files=files(app))


def sql_rows(data: Path) -> list[str]:
    """Every row of every table of the SQLite database, as text."""
    with sqlite3.connect(data / "boternity.db") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return [f"{table}: {row}" for table in tables
                for row in db.execute(f'SELECT * FROM "{table}"')]


def lance_rows(data: Path) -> list[str]:
    """Every row of every LanceDB table (bots' and shared), vectors left out."""
    db = lancedb.connect(str(data / "lancedb"))
    found = []
    for name in db.list_tables().tables:
        for row in db.open_table(name).to_arrow().to_pylist():
            found.append(f"{name}: {({k: v for k, v in row.items() if k != 'vector'})}")
    return found


def stored_bytes(data: Path) -> list[bytes]:
    return [p.read_bytes() for p in (data / "bots").rglob("*") if p.is_file()]


async def test_forget_me_then_confirm_leaves_nothing_of_that_person(
    tg: FakeTelegram, openai_fake: FakeOpenAI, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    path = tmp_path / "boternity.toml"
    path.write_text(CONFIG.format(data=data, base_url=openai_fake.base_url, admin=ADMIN))
    settings = load_settings(path, environ={"TELEGRAM_TOKEN": tg.token}, dotenv=None)
    replies = Replies()
    doc = b"Quokka file: the vault opens with 4711\n"
    tg.add_file("DOC", doc, "documents/vault.txt")
    async with build_app(settings) as app:
        app.observers.append(replies)
        assert app.memory_admin is not None
        await app.memory_admin.add("demo", "Quokka fact: Alice's door code is 4711",
                                   user=f"telegram:{ALICE}")
        await app.memory_admin.add("demo", "Bob plays chess on Sundays", user=f"telegram:{BOB}")

        async def wait_replies(n: int) -> None:
            await tg.wait_for(lambda: len(replies.done) >= n)

        async def said(chat: int, user: int, text: str) -> str:
            before = len(tg.in_chat(chat))
            tg.push_message(chat, text, user_id=user)
            await tg.wait_for(lambda: len(tg.in_chat(chat)) > before)
            return tg.in_chat(chat)[-1].text

        async with telegram(app, tg, commands_for(app, "demo", [f"telegram:{ADMIN}"])):
            tg.push_message(ALICE, "Quokka one: my dog is called Rex", user_id=ALICE)
            await wait_replies(1)
            tg.push_message(ALICE, caption="Quokka doc, keep it", user_id=ALICE, document={
                "file_id": "DOC", "file_unique_id": "uDOC", "file_name": "vault.txt",
                "mime_type": "text/plain", "file_size": len(doc)})
            await wait_replies(2)
            tg.push_message(GROUP, "Quokka in the group", chat_type="group", user_id=ALICE,
                            mention=True)
            await wait_replies(3)
            tg.push_message(GROUP, "Bob says hello to everyone", chat_type="group",
                            user_id=BOB, mention=True)
            await wait_replies(4)
            tg.push_message(BOB, "Bob in private", user_id=BOB)
            await wait_replies(5)
            await tg.wait_for(lambda: len(tg.in_chat(ALICE)) >= 2)
            assert any("Quokka" in row for row in sql_rows(data))  # the scans do see it
            assert any("Quokka" in row for row in lance_rows(data))
            assert doc in stored_bytes(data)

            asked = await said(ALICE, ALICE, "/forget me")
            assert "I keep about you: 1 memory, 5 messages, 1 file, 1 recall record" in asked
            assert "/forget me confirm" in asked
            nothing_yet = sql_rows(data)
            assert any("Quokka" in row for row in nothing_yet)  # asking deletes nothing
            done = await said(ALICE, ALICE, "/forget me confirm")
            assert done.startswith("Done: I deleted 1 memory, 5 messages, 1 file, "
                                   "1 recall record")
            again = await said(ALICE, ALICE, "/forget me confirm")
            assert "first" in again  # a confirmation is used once

    marks = ("Quokka", "4711", f"telegram:{ALICE}")
    leftovers = [row for row in sql_rows(data) + lance_rows(data)
                 if any(mark in row for mark in marks)]
    assert leftovers == []
    assert not any(b"Quokka" in blob for blob in stored_bytes(data))
    # everyone else's data is intact
    rows = sql_rows(data)
    assert sum(f"'telegram:{BOB}'" in row and row.startswith("messages") for row in rows) == 2
    assert any("Bob plays chess" in row for row in lance_rows(data))
    assert sum(row.startswith("messages") and "'assistant'" in row and str(GROUP) in row
               for row in rows) == 2  # the group keeps the bot's answers
    assert not any("I keep about you" in m.text for m in tg.in_chat(GROUP))


async def test_forget_me_in_a_group_is_answered_in_private(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    """``/forget me`` shows someone's data: in a group it goes to their DM."""
    from engine.admin.people import PeopleAdmin
    from persistence.sql.erasure import SqlErasure

    store = bot_pipeline.conversation.store
    db = store._db  # type: ignore[attr-defined]  # the pipeline's own database
    people = PeopleAdmin(bots=["demo"], records=SqlErasure(db, bot_pipeline.files))
    commands = Commands(bot="demo", people=people, history=store)
    config = TelegramConfig(bot="demo", token=SecretStr(tg.token), api_base_url=tg.url,
                            poll_timeout_s=2)
    async with TelegramAdapter(config, replier=bot_pipeline.conversation, commands=commands):
        tg.push_message(ALICE, "hello", user_id=ALICE)
        await tg.wait_for(lambda: len(tg.in_chat(ALICE)) == 1 and bool(bot_pipeline.replies))
        await tg.wait_for(lambda: "▌" not in tg.in_chat(ALICE)[-1].text)
        tg.push_message(GROUP, "/forget me", chat_type="group", user_id=ALICE)
        await tg.wait_for(lambda: len(tg.in_chat(ALICE)) == 2 and len(tg.in_chat(GROUP)) == 1)
    assert "I keep about you: 0 memories, 2 messages" in tg.in_chat(ALICE)[-1].text
    assert tg.in_chat(GROUP)[0].text == "I sent you the answer to /forget in our private chat."


async def test_reset_empties_the_history_sent_and_is_for_admins_in_groups(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    store = bot_pipeline.conversation.store
    commands = Commands(bot="demo", admins=(str(ADMIN),), history=store)
    config = TelegramConfig(bot="demo", token=SecretStr(tg.token), api_base_url=tg.url,
                            poll_timeout_s=2)
    fake = bot_pipeline.fake

    def user_turns(request: Any) -> list[str]:
        return [m["content"] for m in request.messages if m["role"] != "system"]

    async with TelegramAdapter(config, replier=bot_pipeline.conversation, commands=commands):
        tg.push_message(ALICE, "remember the word kiwi", user_id=ALICE)
        await tg.wait_for(lambda: fake.count == 1 and len(tg.in_chat(ALICE)) == 1)
        await tg.wait_for(lambda: bool(bot_pipeline.replies))
        tg.push_message(ALICE, "/reset", user_id=ALICE)
        await tg.wait_for(lambda: len(tg.in_chat(ALICE)) == 2)
        assert tg.in_chat(ALICE)[-1].text.startswith("Conversation reset")
        tg.push_message(ALICE, "which word?", user_id=ALICE)
        await tg.wait_for(lambda: fake.count == 2)
        # in a group, only admins
        tg.push_message(GROUP, "/reset", chat_type="group", user_id=BOB)
        await tg.wait_for(lambda: len(tg.in_chat(GROUP)) == 1)
        assert "only this bot's admins" in tg.in_chat(GROUP)[0].text
        tg.push_message(GROUP, "/reset", chat_type="group", user_id=ADMIN)
        await tg.wait_for(lambda: len(tg.in_chat(GROUP)) == 2)
        assert tg.in_chat(GROUP)[1].text.startswith("Conversation reset")  # no data: in the group
    assert user_turns(fake.requests[0]) == ["remember the word kiwi"]
    assert user_turns(fake.requests[1]) == ["which word?"]  # nothing before the reset


async def test_a_document_stays_in_the_conversation_for_follow_ups(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    data = b"name,city\nAda,London\nGrace,Paris\n"
    tg.add_file("F1", data, "documents/people.csv")
    config = TelegramConfig(bot="demo", token=SecretStr(tg.token), api_base_url=tg.url,
                            poll_timeout_s=2)
    fake = bot_pipeline.fake
    async with TelegramAdapter(config, replier=bot_pipeline.conversation,
                               commands=Commands(bot="demo"), files=bot_pipeline.files):
        tg.push_message(ALICE, caption="who lives in London?", user_id=ALICE, document={
            "file_id": "F1", "file_unique_id": "uF1", "file_name": "people.csv",
            "mime_type": "text/csv", "file_size": len(data)})
        await tg.wait_for(lambda: len(bot_pipeline.replies) == 1)
        tg.push_message(ALICE, "and who lives in Paris?", user_id=ALICE)
        await tg.wait_for(lambda: fake.count == 2)
    follow_up = fake.requests[1].messages
    earlier = [m["content"] for m in follow_up[1:-1] if m["role"] == "user"]
    assert len(earlier) == 1 and "Grace,Paris" in earlier[0]  # the document, from history
    assert "who lives in London?" in earlier[0]
    assert follow_up[-1]["content"] == "and who lives in Paris?"
