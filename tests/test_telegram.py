"""The Telegram adapter end to end: the REAL python-telegram-bot against a fake Bot API.

The fake (tests/fakes/telegram_server.py) enforces Telegram's limits (1/s
per DM, 3 s and 20/min per group, 30/s per bot, 4096 UTF-16 units) and
answers 429 with retry_after. The bot's pipeline is real too
(``bot_pipeline``: SQLite, the real ``openai`` SDK against ``openai_fake``,
the real fallback chain, real file storage).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from pydantic import SecretStr

from adapters.chat.commands import Commands
from adapters.chat.gate import GateConfig
from adapters.chat.outbound import TELEGRAM, Limits, MessageSender
from adapters.chat.render import to_telegram
from adapters.ops.metrics import MeteredSender, Metrics
from adapters.platforms.telegram import TelegramAdapter, TelegramConfig
from engine.admin.bot import FileAdmin
from engine.errors import ConfigError
from engine.types import Reply
from tests.conftest import BotPipeline
from tests.fakes.openai_server import Hang, Text
from tests.fakes.telegram_server import FakeTelegram, SentMessage, start_telegram_fake

ADMIN = 42
ROOT = Path(__file__).resolve().parent.parent
ANSWER = ("Paris", " is", " the", " capital", " of", " **France**", ",", " since", " long", ".")
GROUP = -1001


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with start_telegram_fake() as fake:
        yield fake


def adapter(fake: FakeTelegram, pipeline: BotPipeline, *, concurrency: int = 8,
            gate: GateConfig | None = None, limits: Limits = TELEGRAM,
            request_timeout_s: float = 10.0,
            wrap_sender: Callable[[MessageSender], MessageSender] | None = None,
            ) -> TelegramAdapter:
    commands = Commands(bot="demo", admins=(str(ADMIN),), providers=pipeline.provider_admin,
                        persona=pipeline.persona_admin,
                        files=FileAdmin(pipeline.files) if pipeline.files else None)
    config = TelegramConfig(bot="demo", token=SecretStr(fake.token), admins=(str(ADMIN),),
                            api_base_url=fake.url, gate=gate or GateConfig(), poll_timeout_s=2,
                            limits=limits, request_timeout_s=request_timeout_s)
    return TelegramAdapter(config, replier=pipeline.conversation, commands=commands,
                           files=pipeline.files, semaphore=asyncio.Semaphore(concurrency),
                           wrap_sender=wrap_sender)


def shown(reply: Reply) -> str:
    return to_telegram(reply.full_text)[0]


def last_text(fake: FakeTelegram, chat: int) -> str | None:
    messages = fake.in_chat(chat)
    return messages[-1].text if messages else None


async def test_group_mention_is_streamed_by_edits_to_full_answer_plus_footer(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    bot_pipeline.fake.script(Text(ANSWER, gap_s=0.45))
    async with adapter(tg, bot_pipeline):
        assert [c["command"] for c in tg.commands or []][:2] == ["memory", "provider"]
        asked = tg.push_message(GROUP, "what is the capital of France?", chat_type="supergroup",
                                mention=True)
        await asyncio.wait_for(bot_pipeline.replied.wait(), 20)
        reply = bot_pipeline.replies[0]
        assert isinstance(reply, Reply)
        await tg.wait_for(lambda: last_text(tg, GROUP) == shown(reply))
    [message] = tg.in_chat(GROUP)
    assert reply.text == "".join(ANSWER) and reply.footer  # footer = "always" in groups too
    assert message.text == shown(reply)
    assert {"type": "bold", "offset": message.text.index("France"), "length": 6} in \
        message.entities  # Markdown became Telegram entities
    assert message.reply_to == asked
    assert message.edits >= 1  # a first message, then edits
    for earlier in message.history[:-1]:  # every intermediate view is a prefix (+ cursor)
        assert message.text.startswith(earlier.removesuffix(" ▌").rstrip())
    assert tg.count_429 == 0
    # the model saw the question without the mention
    assert bot_pipeline.fake.requests[0].messages[-1]["content"].endswith(
        "what is the capital of France?")
    assert "@demo_bot" not in bot_pipeline.fake.requests[0].messages[-1]["content"]


async def test_timed_out_edit_that_landed_makes_no_second_copy(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    """Every edit is applied but answered after the client gave up (TimedOut):
    the scheduler retries it as an edit ("message is not modified" = done)."""
    bot_pipeline.fake.script(Text(("One", " two", " three", " four."), gap_s=0.4))
    tg.lose_edit_answers, tg.lost_answer_delay_s = 1, 2.0
    async with adapter(tg, bot_pipeline, request_timeout_s=1.0):
        tg.push_message(7, "count for me")
        await asyncio.wait_for(bot_pipeline.replied.wait(), 20)
        reply = bot_pipeline.replies[0]
        await tg.wait_for(lambda: last_text(tg, 7) == shown(reply))  # type: ignore[arg-type]
        await tg.wait_for(lambda: tg.lose_edit_answers == 0)
    assert len(tg.in_chat(7)) == 1
    assert [name for name, _ in tg.calls].count("sendMessage") == 1


async def test_not_addressed_and_bots_ignored_dm_answered(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    async with adapter(tg, bot_pipeline):
        tg.push_message(GROUP, "just chatting among humans", chat_type="group")
        tg.push_message(GROUP, "hi bot", chat_type="group", user_id=555, is_bot=True,
                        mention=True)
        tg.push_message(GROUP, "", chat_type="group", mention=False)  # empty (a sticker)
        tg.push_message(7, "", chat_type="private")  # empty DM: nothing to answer
        tg.push_message(7, "hello in private")
        await tg.wait_for(lambda: bool(tg.in_chat(7)) and bot_pipeline.replied.is_set())
        await tg.wait_for(lambda: last_text(tg, 7) == shown(bot_pipeline.replies[0]))
    assert tg.in_chat(GROUP) == []
    assert bot_pipeline.fake.count == 1
    assert bot_pipeline.fake.requests[0].messages[-1]["content"].endswith("hello in private")


async def test_reply_to_the_bot_in_a_group_is_answered(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    async with adapter(tg, bot_pipeline):
        tg.push_message(GROUP, "and what about Spain?", chat_type="group", reply_to_bot=True)
        await asyncio.wait_for(bot_pipeline.replied.wait(), 10)
        await tg.wait_for(lambda: last_text(tg, GROUP) == shown(bot_pipeline.replies[0]))


async def test_posts_as_a_chat_are_keyed_on_the_chat_not_the_shared_placeholder(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    """Issue 13 item 15: channel posts, anonymous admins and automatic forwards all come
    from one placeholder user; each must be its own sender (memory, budget, history)."""
    channel_a = {"id": -100111, "type": "channel", "title": "News A"}
    channel_b = {"id": -100222, "type": "channel", "title": "News B"}
    anonymous = {"id": GROUP, "type": "supergroup", "title": "The group"}
    posts = [(channel_a, 136817688, False), (channel_b, 136817688, False),
             (anonymous, 1087968824, True), (channel_a, 777000, False)]
    async with adapter(tg, bot_pipeline):
        for i, (sender, placeholder, is_bot) in enumerate(posts):
            tg.push_message(GROUP, f"question {i}", chat_type="supergroup", mention=True,
                            user_id=placeholder, is_bot=is_bot, sender_chat=sender)
            await tg.wait_for(lambda n=i: len(bot_pipeline.replies) > n)  # type: ignore[misc]
    history = await bot_pipeline.conversation.store.history("demo", str(GROUP),
                                                            platform="telegram")
    speakers = [(m.user, m.user_name) for m in history if m.role == "user"]
    assert speakers == [("telegram:-100111", "News A"), ("telegram:-100222", "News B"),
                        (f"telegram:{GROUP}", "The group"), ("telegram:-100111", "News A")]


async def test_attachment_is_stored_with_metadata_and_read(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    assert bot_pipeline.files is not None
    data = b"name,city\nAda,London\nGrace,Arlington\n"
    tg.add_file("F1", data, "documents/people.csv")
    async with adapter(tg, bot_pipeline):
        tg.push_message(7, caption="who lives in London?", document={
            "file_id": "F1", "file_unique_id": "uF1", "file_name": "people.csv",
            "mime_type": "text/csv", "file_size": len(data)})
        await asyncio.wait_for(bot_pipeline.replied.wait(), 10)
    [stored] = await bot_pipeline.files.recent("demo")
    assert (stored.name, stored.mime_type, stored.size, stored.platform, stored.chat,
            stored.uploader) == ("people.csv", "text/csv", len(data), "telegram", "7",
                                 "telegram:7")
    assert bot_pipeline.files.path(stored).read_bytes() == data
    prompt = bot_pipeline.fake.requests[0].messages[-1]["content"]
    assert "Ada,London" in prompt and "who lives in London?" in prompt


async def test_hostile_name_and_oversized_file(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    assert bot_pipeline.files is not None
    tg.add_file("EVIL", b"not a password file", "documents/evil")
    async with adapter(tg, bot_pipeline):
        tg.push_message(7, caption="read this", document={
            "file_id": "EVIL", "file_unique_id": "uE", "file_name": "../../etc/passwd\u202e.txt",
            "mime_type": "text/plain", "file_size": 19})
        await tg.wait_for(lambda: len(bot_pipeline.replies) == 1)
        tg.push_message(7, caption="and this big one", document={
            "file_id": "BIG", "file_unique_id": "uB", "file_name": "huge.bin",
            "mime_type": "application/octet-stream", "file_size": 50_000_000})
        await tg.wait_for(lambda: len(bot_pipeline.replies) == 2)
        await tg.wait_for(lambda: any("too large" in m.text for m in tg.in_chat(7)))
    [stored] = await bot_pipeline.files.recent("demo")
    assert stored.name == "passwd.txt"
    assert not (bot_pipeline.tmp_path / "etc").exists()
    # the big file was refused before any download; the caption was still answered
    assert not tg.calls_of("getFile") or all(c["file_id"] != "BIG" for c in tg.calls_of("getFile"))
    assert "and this big one" in bot_pipeline.fake.requests[1].messages[-1]["content"]


async def test_admin_command_works_non_admin_refused_unknown_explained(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    async def command(text: str, user: int, chat: int = 7, kind: str = "private") -> str:
        before = len(tg.in_chat(chat))
        tg.push_message(chat, text, user_id=user, chat_type=kind)
        await tg.wait_for(lambda: len(tg.in_chat(chat)) > before)
        return tg.in_chat(chat)[-1].text

    async with adapter(tg, bot_pipeline):
        status = await command("/provider status", ADMIN, chat=ADMIN)
        assert "primary" in status and "No reply served" in status
        refused = await command("/provider status", 7)
        assert refused == "Sorry, only this bot's admins can use /provider."
        unknown = await command("/frobnicate now", ADMIN, chat=ADMIN)
        assert unknown.startswith("Unknown command /frobnicate") and "/memory" in unknown
        # in a group the answer goes to the admin's private chat, the group gets a note
        before = len(tg.in_chat(ADMIN))
        note = await command("/bot@demo_bot persona", ADMIN, chat=GROUP, kind="group")
        assert note == "I sent you the answer to /bot in our private chat."
        await tg.wait_for(lambda: len(tg.in_chat(ADMIN)) > before)
        assert "You are terse." in tg.in_chat(ADMIN)[-1].text
        files = await command("/files list", ADMIN, chat=ADMIN)
        assert files == "No stored files."
        # a command addressed to another bot is left alone
        tg.push_message(GROUP, "/memory@other_bot list", chat_type="group", user_id=ADMIN)
        await command("/help", 7)  # processed after it: updates are handled in order
    assert len(tg.in_chat(GROUP)) == 1 and "terse" not in tg.in_chat(GROUP)[0].text
    assert bot_pipeline.fake.count == 0  # commands never reach the model


async def test_admin_answer_never_goes_to_the_group_even_without_a_private_chat(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    """Issue 12: ``/memory list telegram:42`` typed in a group posted that person's
    memories for the group to read. Now the answer goes to the caller's DM; a
    caller who never opened one is asked to, and nothing of the answer is shown."""
    async with adapter(tg, bot_pipeline):
        tg.push_message(GROUP, "/provider status", chat_type="group", user_id=ADMIN)
        await tg.wait_for(lambda: len(tg.in_chat(GROUP)) == 1)
    [note] = tg.in_chat(GROUP)
    assert "only in private" in note.text and "@demo_bot" in note.text
    assert "primary" not in note.text  # the answer itself went nowhere
    assert tg.in_chat(ADMIN) == []


async def test_100kb_message_and_long_answer_split_at_4096(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    code = "\n".join(f"    value_{i} = compute({i})  # step {i}" for i in range(260))
    long_answer = ["Here is the script:\n\n```python\n", code, "\n```\n\nThat is all."]
    bot_pipeline.fake.script(Text(long_answer))
    async with adapter(tg, bot_pipeline):
        tg.push_message(7, "x" * 100_000)
        await asyncio.wait_for(bot_pipeline.replied.wait(), 20)
        reply = bot_pipeline.replies[0]
        assert isinstance(reply, Reply) and reply.error is None
        await tg.wait_for(lambda: sum(len(m.text) for m in tg.in_chat(7)) >= len(code))
        await tg.wait_for(lambda: "That is all." in (last_text(tg, 7) or ""))
    parts = tg.in_chat(7)
    assert len(parts) >= 3 and all(len(m.text) <= 4096 for m in parts)
    assert all(any(e["type"] == "pre" for e in m.entities) for m in parts[:-1])  # fence reopened
    joined = "\n".join(m.text for m in parts)
    for i in (0, 130, 259):
        assert f"value_{i} = compute({i})" in joined
    assert tg.count_429 == 0


async def test_burst_of_50_concurrent_replies(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    """50 chats (25 groups, 25 DMs) ask at once; every final text must be complete."""
    words = tuple(f" word{i}" for i in range(12))
    bot_pipeline.fake.default = Text(words, gap_s=0.08)  # ~1 s of streaming per reply
    chats = [-(2000 + i) for i in range(25)] + [3000 + i for i in range(25)]
    async with adapter(tg, bot_pipeline, concurrency=50):
        started = time.monotonic()
        for chat in chats:
            group = chat < 0
            tg.push_message(chat, f"question from {chat}", user_id=abs(chat),
                            chat_type="group" if group else "private", mention=group)

        def done() -> bool:
            if len(bot_pipeline.replies) < 50:
                return False
            expected = shown(bot_pipeline.replies[0])  # type: ignore[arg-type]  # all alike
            return all((msgs := tg.in_chat(c)) and msgs[-1].text == expected for c in chats)

        await tg.wait_for(done, limit_s=90)
        elapsed = time.monotonic() - started
    messages: list[SentMessage] = [tg.in_chat(c)[0] for c in chats]
    assert all(len(tg.in_chat(c)) == 1 for c in chats)  # no duplicates
    first_visible = [m.sent_at - tg.pushed_at[(m.chat_id, m.reply_to or 0)] for m in messages]
    edits = [m.edits for m in messages]
    print(f"\nburst of 50: 429s={tg.count_429} edits/reply mean={statistics.mean(edits):.2f} "
          f"max={max(edits)} first visible text: median={statistics.median(first_visible):.2f}s "
          f"p90={sorted(first_visible)[44]:.2f}s max={max(first_visible):.2f}s "
          f"all final after {elapsed:.1f}s; limits hit: {dict(tg.limit_hits)}")
    # Measured 0 on a quiet machine and under load; a loop stalled for longer
    # than the pacing margin (0.1 s) can still cost a 429, which is then
    # waited out: every final text above is complete and there is no copy.
    assert tg.count_429 <= len(chats) // 10



# --- `boternity run`: two bots, each with its own Telegram token, in one process ---

async def test_boternity_run_serves_two_telegram_bots(
    bot_pipeline: BotPipeline, tmp_path: Path
) -> None:
    openai_fake = bot_pipeline.fake
    openai_fake.default = Text(("Hello", " from", " the run."))
    async with start_telegram_fake(token="111:FIRST", bot_username="first_bot") as one, \
            start_telegram_fake(token="222:SECOND", bot_username="second_bot") as two:
        config = tmp_path / "boternity.toml"
        config.write_text(f"""
[storage]
data_dir = "{tmp_path / 'run-data'}"

[providers.primary]
kind = "openai_compatible"
model = "primary-model"
base_url = "{openai_fake.base_url}"
api_key_env = "TEST_OPENAI_KEY"

[bots.first]
chain = ["primary"]
footer = "always"
memory = {{ enabled = false }}

[bots.first.telegram]
token_env = "TEST_TG_FIRST"
api_base_url = "{one.url}"
admins = ["{ADMIN}"]

[bots.second]
chain = ["primary"]
memory = {{ enabled = false }}

[bots.second.telegram]
token_env = "TEST_TG_SECOND"
api_base_url = "{two.url}"
""", encoding="utf-8")
        env = {**os.environ, "TEST_OPENAI_KEY": "sk-test", "TEST_TG_FIRST": one.token,
               "TEST_TG_SECOND": two.token}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "adapters.cli", "--config", str(config), "--env-file", "",
            "run", env=env, cwd=str(ROOT),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            await one.wait_for(lambda: one.commands is not None, limit_s=60)
            await two.wait_for(lambda: two.commands is not None, limit_s=60)
            one.push_message(7, "hi first")
            two.push_message(8, "hi second")
            await one.wait_for(lambda: any(
                m.text.startswith("Hello from the run.") and "primary" in m.text
                for m in one.in_chat(7)), limit_s=30)
            await two.wait_for(lambda: any(
                m.text == "Hello from the run." for m in two.in_chat(8)), limit_s=30)
            status_before = len(one.in_chat(ADMIN))
            one.push_message(ADMIN, "/provider status", user_id=ADMIN)
            await one.wait_for(lambda: len(one.in_chat(ADMIN)) > status_before, limit_s=30)
            assert "served by primary" in one.in_chat(ADMIN)[-1].text
        finally:
            one.close()
            two.close()
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    text = stderr.decode(errors="replace")
    assert "first/telegram" in text and "second/telegram" in text
    assert proc.returncode in (0, 130), text[-2000:]
    assert one.token not in text and two.token not in text  # no secret in logs


async def test_loop_guard_and_channel_modes(bot_pipeline: BotPipeline) -> None:
    """Other bots are answered only with reply_to_bots, at most max_bot_turns in a row
    (a human message resets the count); a channel can be "always" or "never".

    The rules, not the pacing, are under test: the bot uses faster limits than
    Telegram's so four replies take no 25 s, and the fake enforces half of them
    (a busy machine may delay one send by a good part of an interval; a 0.1 s
    margin was seen to produce a 429 under load).
    """
    fast = Limits(max_len=4096, dm_interval_s=0.2, group_interval_s=0.6, utf16=True)
    gate = GateConfig(reply_to_bots=True, max_bot_turns=2,
                      channels={str(GROUP): "always", "-77": "never"})
    async with start_telegram_fake(dm_gap_s=fast.dm_interval_s / 2,
                                   group_gap_s=fast.group_interval_s / 2) as tg, \
            adapter(tg, bot_pipeline, gate=gate, limits=fast):
        for i in range(3):
            tg.push_message(GROUP, f"bot says {i}", chat_type="group", user_id=555, is_bot=True)
        tg.push_message(-77, "muted channel", chat_type="group", mention=True)
        tg.push_message(GROUP, "a human, no mention", chat_type="group")  # "always" channel
        tg.push_message(GROUP, "bot again", chat_type="group", user_id=555, is_bot=True)
        await tg.wait_for(lambda: len(bot_pipeline.replies) == 4)
        expected = shown(bot_pipeline.replies[0])  # type: ignore[arg-type]
        await tg.wait_for(lambda: [m.text for m in tg.in_chat(GROUP)] == [expected] * 4)
    asked = sorted(r.messages[-1]["content"].rsplit("\n", 1)[-1]
                   for r in bot_pipeline.fake.requests)
    # Group turns name their speaker (the fake's users are all "alice").
    assert asked == [f"alice: {text}" for text in
                     ("a human, no mention", "bot again", "bot says 0", "bot says 1")]
    assert tg.in_chat(-77) == [] and tg.count_429 == 0, tg.limit_hits


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_webhook_mode_checks_the_secret_and_answers_a_redelivery_once(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    port = _free_port()
    commands = Commands(bot="demo", admins=(str(ADMIN),))
    config = TelegramConfig(
        bot="demo", token=SecretStr(tg.token), api_base_url=tg.url, mode="webhook",
        webhook_url=f"http://127.0.0.1:{port}/hooks/telegram", webhook_secret=SecretStr("s3cret"),
        webhook_listen="127.0.0.1", webhook_port=port)
    # The worker listens on the URL's own path, whatever the bot is called
    # (a reverse proxy passes it through; anything else is a silent 404).
    url = f"http://127.0.0.1:{port}/hooks/telegram"
    async with TelegramAdapter(config, replier=bot_pipeline.conversation, commands=commands), \
            aiohttp.ClientSession() as http:
        assert tg.webhook == {"url": url, "secret_token": "s3cret"}
        update = tg.make_update(7, "hello by webhook")
        forged = await http.post(url, json=update,
                                 headers={"X-Telegram-Bot-Api-Secret-Token": "wrong"})
        assert forged.status == 403
        bare = await http.post(url, json=tg.make_update(555, "forged, no secret at all"))
        assert bare.status == 403
        for _ in range(2):  # Telegram redelivers when it thinks we did not answer
            ok = await http.post(url, json=update,
                                 headers={"X-Telegram-Bot-Api-Secret-Token": "s3cret"})
            assert ok.status == 200
        await asyncio.wait_for(bot_pipeline.replied.wait(), 10)
        await tg.wait_for(lambda: last_text(tg, 7) == shown(bot_pipeline.replies[0]))  # type: ignore[arg-type]
    assert bot_pipeline.fake.count == 1 and len(tg.in_chat(7)) == 1


async def test_webhook_mode_without_a_secret_refuses_to_start(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    """Issue 13: a webhook without a secret took forged updates from anyone."""
    port = _free_port()
    config = TelegramConfig(
        bot="demo", token=SecretStr(tg.token), api_base_url=tg.url, mode="webhook",
        webhook_url=f"http://127.0.0.1:{port}/demo", webhook_listen="127.0.0.1",
        webhook_port=port)
    with pytest.raises(ConfigError, match=r"bots\.demo\.telegram\.webhook_secret_env"):
        async with TelegramAdapter(config, replier=bot_pipeline.conversation,
                                   commands=Commands(bot="demo")):
            pass
    assert tg.webhook is None  # nothing registered with Telegram
    async with aiohttp.ClientSession() as http:  # and nothing listens
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.post(f"http://127.0.0.1:{port}/demo", json=tg.make_update(555, "hi"))
    assert bot_pipeline.fake.count == 0


WEBHOOK_CONFIG = """
[providers.primary]
kind = "openai_compatible"
model = "primary-model"
base_url = "{base_url}"
api_key_env = "TEST_OPENAI_KEY"

[bots.demo]
chain = ["primary"]
memory = {{ enabled = false }}

[bots.demo.telegram]
token_env = "TEST_TG_TOKEN"
api_base_url = "{tg_url}"
mode = "webhook"
webhook_url = "http://127.0.0.1:{port}/demo"
webhook_listen = "127.0.0.1"
webhook_port = {port}
{secret_line}
"""


@pytest.mark.parametrize("secret_line, secret_value", [
    ("", None),  # no webhook_secret_env at all
    ('webhook_secret_env = "TEST_TG_WEBHOOK_SECRET"', None),  # names an unset variable
    ('webhook_secret_env = "TEST_TG_WEBHOOK_SECRET"', ""),  # names an empty one
], ids=["key-missing", "variable-unset", "variable-empty"])
async def test_boternity_run_in_webhook_mode_without_a_secret_exits_2_naming_the_key(
    tg: FakeTelegram, bot_pipeline: BotPipeline, tmp_path: Path, secret_line: str,
    secret_value: str | None,
) -> None:
    port = _free_port()
    config = tmp_path / "boternity.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n' + WEBHOOK_CONFIG.format(
        base_url=bot_pipeline.fake.base_url, tg_url=tg.url, port=port, secret_line=secret_line),
        encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "TEST_TG_WEBHOOK_SECRET"}
    env.update({"TEST_OPENAI_KEY": "sk-test", "TEST_TG_TOKEN": tg.token})
    if secret_value is not None:
        env["TEST_TG_WEBHOOK_SECRET"] = secret_value
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "adapters.cli", "--config", str(config), "--env-file", "",
        "run", env=env, cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:  # before the fix: it served, open to anyone
            proc.kill()
            await proc.wait()
    text = stderr.decode(errors="replace").strip()
    assert proc.returncode == 2, text[-2000:]
    last = text.splitlines()[-1]  # one line naming the key (log lines may come before)
    assert last.startswith("boternity: ") and "bots.demo.telegram.webhook_secret_env" in last
    assert "Traceback" not in text
    assert tg.webhook is None and bot_pipeline.fake.count == 0


async def test_a_refused_token_is_a_config_error_naming_the_key(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    config = TelegramConfig(bot="demo", token=SecretStr("999:WRONG"), api_base_url=tg.url)
    with pytest.raises(ConfigError, match=r"bots\.demo\.telegram: the bot token was refused") \
            as caught:
        async with TelegramAdapter(config, replier=bot_pipeline.conversation,
                                   commands=Commands(bot="demo")):
            pass
    assert "999:WRONG" not in str(caught.value)


async def test_photo_largest_size_is_stored_and_named_in_the_prompt(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    assert bot_pipeline.files is not None
    small, large = b"\xff\xd8\xff small jpeg", b"\xff\xd8\xff" + b"L" * 5000
    tg.add_file("P-small", small, "photos/s.jpg")
    tg.add_file("P-large", large, "photos/l.jpg")
    async with adapter(tg, bot_pipeline):
        tg.push_message(7, caption="what is in this picture?", photo=[
            {"file_id": "P-small", "file_unique_id": "us", "width": 90, "height": 60,
             "file_size": len(small)},
            {"file_id": "P-large", "file_unique_id": "ul", "width": 1280, "height": 960,
             "file_size": len(large)}])
        await asyncio.wait_for(bot_pipeline.replied.wait(), 10)
    [stored] = await bot_pipeline.files.recent("demo")
    assert (stored.name, stored.mime_type, stored.size) == ("photo_ul.jpg", "image/jpeg",
                                                            len(large))
    prompt = bot_pipeline.fake.requests[0].messages[-1]["content"]
    # this provider has no vision: the model is told an image came, not fed bytes
    assert "photo_ul.jpg" in str(prompt) and "what is in this picture?" in str(prompt)


async def test_silent_provider_shows_typing_then_a_clear_failure(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    """The model never answers: the chat shows "typing" meanwhile, then one
    message that says what happened (no half answer, no second copy)."""
    bot_pipeline.fake.script(Hang(headers=True, after=0))
    async with adapter(tg, bot_pipeline):
        tg.push_message(7, "anyone there?")
        await asyncio.wait_for(bot_pipeline.replied.wait(), 30)
        reply = bot_pipeline.replies[0]
        assert isinstance(reply, Reply) and reply.error is not None
        await tg.wait_for(lambda: last_text(tg, 7) == shown(reply))
    assert [c["action"] for c in tg.calls_of("sendChatAction")][:1] == ["typing"]
    assert len(tg.in_chat(7)) == 1 and "try again" in tg.in_chat(7)[0].text
    assert "primary" not in tg.in_chat(7)[0].text  # who failed: the log and admins


async def test_metered_sender_still_shows_typing(
    tg: FakeTelegram, bot_pipeline: BotPipeline
) -> None:
    """With metrics on, the sender is wrapped: typing must still reach Telegram."""
    metrics = Metrics()
    bot_pipeline.fake.script(Hang(headers=True, after=0))
    wrap = adapter(tg, bot_pipeline,
                   wrap_sender=lambda sender: MeteredSender(sender, metrics, "telegram"))
    async with wrap:
        tg.push_message(7, "anyone there?")
        await asyncio.wait_for(bot_pipeline.replied.wait(), 30)
        await tg.wait_for(lambda: len(tg.in_chat(7)) == 1)
    assert [c["action"] for c in tg.calls_of("sendChatAction")][:1] == ["typing"]
    assert "boternity_platform_sends_total{platform=\"telegram\"} 1.0" in (
        metrics.render().decode())
