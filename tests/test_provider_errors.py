"""What a provider's error says stays with the operator.

A provider answering 400/422 with a body full of secrets (an AWS key id, a
GitHub token, an ``api_key=`` value, an account number, an internal URL)
reaches the group as one fixed, kind sentence; the details go to the log,
redacted, and to admins through ``/provider status``, redacted too. When every
provider fails, the text names no provider, whatever the footer mode. Run
through the real python-telegram-bot against the fake Bot API, the real
``openai`` SDK against the fake OpenAI server.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from adapters.ops.logs import MASK, Redactor
from engine.errors import InvalidRequest, scrub
from engine.providers.bedrock import BedrockProvider
from engine.types import Reply
from tests.conftest import BotPipeline
from tests.fakes.bedrock_server import Behaviour, FakeBedrock
from tests.fakes.openai_server import Status
from tests.fakes.telegram_server import FakeTelegram, start_telegram_fake
from tests.test_bedrock import ask, bedrock, collect  # noqa: F401  (fixture)
from tests.test_telegram import ADMIN, GROUP
from tests.test_telegram import adapter as telegram_adapter

SECRETS = {
    "aws key id": "AKIAIOSFODNN7EXAMPLE",
    "aws session key id": "ASIAY34FZKBOKMUTVV7A",
    "github token": "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",
    "api_key value": "hunter2-internal-value",
    "account number": "123456789012",
    "internal url": "http://billing.corp.internal:8080/v1/accounts",
    "private ip url": "http://10.12.0.7/admin",
    "openai key": "sk-proj-abcdefghijklmnop1234",
}
BODY = ("Invalid 'messages[0]': request from account 123456789012 denied by "
        "http://billing.corp.internal:8080/v1/accounts (see http://10.12.0.7/admin); "
        "credentials AKIAIOSFODNN7EXAMPLE / ASIAY34FZKBOKMUTVV7A, "
        "token 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, api_key=hunter2-internal-value, "
        "sk-proj-abcdefghijklmnop1234")


@pytest.fixture
async def tg() -> object:
    async with start_telegram_fake() as fake:
        yield fake


def _group_text(tg: FakeTelegram) -> str:
    return "\n".join(m.text for m in tg.in_chat(GROUP))


async def _ask_in_group(tg: FakeTelegram, pipeline: BotPipeline) -> Reply:
    tg.push_message(GROUP, "please do it", chat_type="supergroup", mention=True)
    await asyncio.wait_for(pipeline.replied.wait(), 20)
    reply = pipeline.replies[-1]
    assert isinstance(reply, Reply)
    await tg.wait_for(lambda: bool(tg.in_chat(GROUP)) and "▌" not in _group_text(tg))
    return reply


async def _command(tg: FakeTelegram, text: str) -> str:
    before = len(tg.in_chat(ADMIN))
    tg.push_message(ADMIN, text, user_id=ADMIN)
    await tg.wait_for(lambda: len(tg.in_chat(ADMIN)) > before)
    return tg.in_chat(ADMIN)[-1].text


@pytest.mark.parametrize("status", [400, 422])
async def test_a_refused_request_gets_a_kind_sentence_details_go_to_admins_and_log(
    tg: FakeTelegram, bot_pipeline: BotPipeline, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    caplog.set_level(logging.INFO)
    bot_pipeline.fake.script(Status(status, BODY))
    async with telegram_adapter(tg, bot_pipeline):
        reply = await _ask_in_group(tg, bot_pipeline)
        assert reply.error == "invalid_request"
        shown = _group_text(tg)
        status_text = await _command(tg, "/provider status")
    assert "can't answer" in shown  # a fixed sentence...
    assert "Invalid 'messages[0]'" not in shown and "denied" not in shown  # ...not the body
    for what, secret in SECRETS.items():
        assert secret not in shown, what
        assert secret not in status_text, what
    # the admin sees what the provider said, with the secrets masked
    assert "Invalid 'messages[0]'" in status_text and "denied by" in status_text
    logged = "\n".join(Redactor()(r.getMessage()) for r in caplog.records)
    assert "Invalid 'messages[0]'" in logged
    for what, secret in SECRETS.items():
        assert secret not in logged, what


@pytest.mark.parametrize("footer", ["never", "on_failover", "always"])
async def test_the_all_failed_text_names_no_provider_nor_error(
    tg: FakeTelegram, bot_pipeline: BotPipeline, footer: str
) -> None:
    bot_pipeline.conversation.footer = footer  # type: ignore[assignment]
    bot_pipeline.fake.script(Status(503, BODY))
    async with telegram_adapter(tg, bot_pipeline):
        reply = await _ask_in_group(tg, bot_pipeline)
    assert reply.error == "all_failed"
    shown = _group_text(tg)
    assert "try again" in shown
    assert "primary" not in shown and "503" not in shown and "server error" not in shown
    for what, secret in SECRETS.items():
        assert secret not in shown, what


def test_log_redaction_knows_more_than_sk_key_xox() -> None:
    redact = Redactor()
    for what, secret in [("aws", "AKIAIOSFODNN7EXAMPLE"), ("aws temp", "ASIAY34FZKBOKMUTVV7A"),
                         ("github", "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"),
                         ("github pat", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrst"),
                         ("google", "AIzaSyA1234567890abcdefghijklmnopqrstuv"),
                         ("jwt", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3")]:
        assert secret not in redact(f"error: {secret} here"), what
    for line in ('api_key=hunter2-value', '"api_key": "hunter2-value"', "password: hunter2-value",
                 "X-Api-Key: hunter2-value", "secret=hunter2-value&next=1"):
        redacted = redact(line)
        assert "hunter2-value" not in redacted and MASK in redacted, line
    # ordinary operations lines stay readable
    assert redact("ops endpoint on http://127.0.0.1:9108") == \
        "ops endpoint on http://127.0.0.1:9108"
    # text from a provider loses internal addresses and account numbers too
    peer = scrub(BODY)
    for what, secret in SECRETS.items():
        assert secret not in peer, what
    assert peer.startswith("Invalid 'messages[0]': request from account")


async def test_bedrock_validation_message_is_a_scrubbed_detail_not_the_reason(
    bedrock: BedrockProvider, bedrock_fake: FakeBedrock  # noqa: F811
) -> None:
    bedrock_fake.push(Behaviour(mode="error", error="ValidationException", message=BODY))
    with pytest.raises(InvalidRequest) as caught:
        await collect(bedrock, ask())
    assert caught.value.reason == "invalid request"  # what a footer or a user could see
    assert caught.value.detail.startswith("Invalid 'messages[0]'")  # for the log and admins
    for what, secret in SECRETS.items():
        assert secret not in caught.value.reason and secret not in caught.value.detail, what
