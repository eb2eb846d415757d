"""Bad bytes lose no message: decoded with replacement, what the database cannot
store stripped (and said so in the log), then answered and stored.

- invalid UTF-8 piped into ``boternity chat`` (the process, as a user runs it);
- a NUL byte on PostgreSQL (and SQLite), through the real pipeline;
- a lone surrogate in a Slack event (the real slack-bolt against the fake);
- a correctly signed Slack HTTP body that is not JSON: a 400, not a 500.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import aiohttp
import pytest
from pydantic import SecretStr

from engine.conversation import Conversation
from engine.providers.fallback import Breakers, FallbackChain
from engine.providers.openai_compat import OpenAICompatProvider
from engine.types import Capabilities, IncomingMessage, Reply
from persistence.sql.conversations import SqlConversationStore
from persistence.sql.database import Database
from tests.conftest import BotPipeline
from tests.fakes.openai_server import FakeOpenAI, Text
from tests.fakes.slack_server import FakeSlack
from tests.test_cli import write_config
from tests.test_slack import adapter as slack_adapter
from tests.test_slack import message_event, signed, slack_fake  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent


async def test_invalid_utf8_piped_into_chat_is_answered_line_by_line(
    openai_fake: FakeOpenAI, tmp_path: Path
) -> None:
    openai_fake.default = Text(("Got it.",))
    config = write_config(tmp_path, openai_fake.base_url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "adapters.cli", "--config", str(config), "--env-file", "",
        "chat", cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT),
                                    "FAKE_PRIMARY_KEY": "sk-test", "PYTHONIOENCODING": ""},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    stdin = b"caf\xe9 latin-1 line\n\xff\xfe broken start\nplain last line\n"
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode == 0, err.decode(errors="replace")
    assert "Traceback" not in err.decode(errors="replace")
    assert out.decode().split("\n\n")[:3] == ["Got it."] * 3  # nothing dropped
    asked = [r.messages[-1]["content"] for r in openai_fake.requests]
    assert asked == ["caf\ufffd latin-1 line", "\ufffd\ufffd broken start", "plain last line"]


async def test_nul_byte_is_stripped_answered_and_stored(
    database_url: str, openai_fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    openai_fake.default = Text(("Answered.",))
    async with Database(database_url) as db, OpenAICompatProvider(
            name="primary", model="primary-model", base_url=openai_fake.base_url,
            api_key=SecretStr("sk-test"), capabilities=Capabilities(context_window=32_768),
    ) as provider:
        store = SqlConversationStore(db)
        conversation = Conversation(bot="demo", persona="p", store=store,
                                    chain=FallbackChain([provider], Breakers()))
        message = IncomingMessage(platform="telegram", bot="demo", chat="42",
                                  user="telegram:42", user_name="A\x00da",
                                  text="before\x00after \ud800 end")
        replies = [item async for item in conversation.reply(message)]
        history = await store.history("demo", "42")
    final = replies[-1]
    assert isinstance(final, Reply) and final.error is None, final
    assert final.text == "Answered."
    assert [(m.role, m.content) for m in history] == [
        ("user", "beforeafter \ufffd end"), ("assistant", "Answered.")]
    assert any("could not store" in r.getMessage() and "NUL" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


async def test_lone_surrogate_from_slack_is_answered_and_stored(
    slack_fake: FakeSlack, bot_pipeline: BotPipeline  # noqa: F811
) -> None:
    bot_pipeline.fake.script(Text(("Fine.",)))
    async with slack_adapter(slack_fake, bot_pipeline):
        await slack_fake.push("events_api", message_event(
            "D1", "emoji half \ud83d here", im=True))
        await asyncio.wait_for(bot_pipeline.replied.wait(), 30)
        await slack_fake.wait_for(lambda: bool(slack_fake.in_channel("D1"))
                                  and "▌" not in slack_fake.in_channel("D1")[0].text)
    [shown] = slack_fake.in_channel("D1")
    assert shown.text.startswith("Fine.") and "interrupted" not in shown.text
    reply = bot_pipeline.replies[0]
    assert isinstance(reply, Reply) and reply.error is None
    store = bot_pipeline.conversation.store
    history = await store.history("demo", "D1")
    assert [m.content for m in history][:1] == ["emoji half \ufffd here"]
    assert bot_pipeline.fake.requests[0].messages[-1]["content"] == "emoji half \ufffd here"


@pytest.mark.parametrize("body", ["{not json", '{"type": "event_callback", "event": [1, 2',
                                  "\xff\xfe", '"just a string"', "[1, 2]"])
async def test_a_signed_slack_body_that_is_not_json_is_a_400(
    slack_fake: FakeSlack, bot_pipeline: BotPipeline, body: str  # noqa: F811
) -> None:
    slack = slack_adapter(slack_fake, bot_pipeline, mode="http", http_port=0, app_token=None)
    async with slack, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{slack.http_port}/slack/events"
        async with http.post(url, data=body.encode("utf-8", "surrogatepass"),
                             headers=signed(body)) as r:
            assert r.status == 400, await r.text()
        # the server still serves the next, good event
        good = '{"type": "url_verification", "challenge": "c-1"}'
        async with http.post(url, data=good, headers=signed(good)) as r:
            assert r.status == 200 and "c-1" in await r.text()
    assert bot_pipeline.fake.count == 0
