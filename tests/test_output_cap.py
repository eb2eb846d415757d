"""Every request carries an output cap, and an answer that loops is stopped.

The real ``openai`` SDK against the fake OpenAI server (each preset kind built
by ``build_provider``, as the configuration does), the real fallback chain,
real SQLite; the local kind with the real demo model (one 8-token answer).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from pydantic import SecretStr

from engine.conversation import LOOP_NOTICE, Conversation
from engine.providers.fallback import Breakers, FallbackChain
from engine.providers.local import LocalProvider
from engine.providers.registry import ProviderConfig, build_provider
from engine.providers.repetition import (
    MAX_PERIOD,
    MIN_REPEATS,
    MIN_SPAN,
    RepetitionGuard,
    cut_loop,
    loop_period,
)
from engine.types import Capabilities, CompletionRequest, IncomingMessage, Message, Reply
from persistence.sql.conversations import SqlConversationStore
from persistence.sql.database import Database
from tests.fakes.openai_server import FakeOpenAI, Text

REQUEST = CompletionRequest((Message("system", "Be brief."), Message("user", "Hi")))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlConversationStore]:
    async with Database(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}") as db:
        yield SqlConversationStore(db)


async def _drain(provider: object, request: CompletionRequest) -> str:
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(provider)  # type: ignore[arg-type]
        run = FallbackChain([provider], Breakers()).run(request)  # type: ignore[list-item]
        return "".join([chunk.text async for chunk in run])


@pytest.mark.parametrize(("kind", "override", "field", "cap"), [
    ("openai", None, "max_completion_tokens", 16_384),
    ("gemini", None, "max_tokens", 8_192),
    ("anthropic", None, "max_tokens", 8_192),
    ("mistral", None, "max_tokens", 8_192),
    ("openai_compatible", None, "max_tokens", 1_024),
    ("openai_compatible", 300, "max_tokens", 300),  # [providers.x] max_output_tokens = 300
])
async def test_every_kind_sends_its_output_cap_unasked(
    openai_fake: FakeOpenAI, kind: str, override: int | None, field: str, cap: int
) -> None:
    provider = build_provider(ProviderConfig(
        name="p", kind=kind, model="m", base_url=openai_fake.base_url,
        api_key=SecretStr("sk-test"), max_output_tokens=override))
    assert REQUEST.max_tokens is None  # the reply pipeline's request when no bot cap is set
    assert await _drain(provider, REQUEST)
    body = openai_fake.requests[0].body
    assert body[field] == cap
    if field != "max_tokens":
        assert "max_tokens" not in body


def _conversation(fake: FakeOpenAI, store: SqlConversationStore, stack: AsyncExitStack,
                  *, provider_cap: int, bot_cap: int | None) -> Conversation:
    provider = build_provider(ProviderConfig(
        name="primary", kind="openai_compatible", model="primary-model",
        base_url=fake.base_url, max_output_tokens=provider_cap))
    stack.push_async_callback(provider.aclose)  # type: ignore[attr-defined]
    chain = FallbackChain([provider], Breakers())
    return Conversation(bot="demo", persona="You are terse.", chain=chain, store=store,
                        max_output_tokens=bot_cap)


def msg(text: str) -> IncomingMessage:
    return IncomingMessage(platform="terminal", bot="demo", chat="c1", user="alice", text=text)


async def _reply(conversation: Conversation, text: str) -> tuple[list[str], Reply]:
    deltas: list[str] = []
    final: Reply | None = None
    async for item in conversation.reply(msg(text)):
        if isinstance(item, Reply):
            final = item
        else:
            deltas.append(item)
    assert final is not None
    return deltas, final


@pytest.mark.parametrize(("provider_cap", "bot_cap", "sent"), [
    (512, None, 512),   # no bot cap: the provider's own
    (512, 100, 100),    # [bots.demo] max_output_tokens = 100
    (512, 4000, 512),   # a bot cap never lifts a provider's
])
async def test_bot_cap_reaches_the_request(
    openai_fake: FakeOpenAI, store: SqlConversationStore,
    provider_cap: int, bot_cap: int | None, sent: int,
) -> None:
    async with AsyncExitStack() as stack:
        conversation = _conversation(openai_fake, store, stack,
                                     provider_cap=provider_cap, bot_cap=bot_cap)
        _, reply = await _reply(conversation, "hello")
    assert reply.error is None
    assert openai_fake.requests[0].body["max_tokens"] == sent


LOOP = "I am a small model and I like to help. "


async def test_a_looping_answer_is_stopped_and_never_fed_back(
    openai_fake: FakeOpenAI, store: SqlConversationStore
) -> None:
    # 300 turns of one sentence (12,000 characters), in 3-character deltas.
    looping = "Sure! " + LOOP * 300
    chunks = [looping[i:i + 3] for i in range(0, len(looping), 3)]
    openai_fake.script(Text(chunks), Text(["Fine."]))
    async with AsyncExitStack() as stack:
        conversation = _conversation(openai_fake, store, stack, provider_cap=512, bot_cap=None)
        deltas, reply = await _reply(conversation, "tell me about you")
        _, second = await _reply(conversation, "and now?")

    streamed = "".join(deltas)
    assert len(streamed) < 1_000 < len(looping)  # stopped early, not at the end
    assert reply.error is None and reply.served_by == "primary"
    assert reply.text.startswith("Sure! ") and reply.text.count("I like to help") == 1
    assert LOOP_NOTICE in reply.footer
    history = await store.history("demo", "c1")
    assert [m.content for m in history if m.role == "assistant"] == [reply.text, "Fine."]
    # The next prompt carries the first turn of the loop only.
    sent = [m["content"] for m in openai_fake.requests[1].messages]
    assert sent[1:] == ["tell me about you", reply.text, "and now?"]
    assert second.text == "Fine."


@pytest.mark.parametrize("text", [
    "A normal answer. " + " ".join(f"Sentence number {i} says something new." for i in range(80)),
    "| a | b |\n|---|---|\n" + "".join(f"| {i} | {i * i} |\n" for i in range(60)),
    "\n".join(f"{i}. Buy item {i} at the shop" for i in range(1, 60)),
    "Wait" + "." * 150,  # a short run is not a loop
    "Filler: " + "lorem ipsum " * 40,  # 480 characters of repetition asked for
    "def f():\n    return [\n" + "        0,\n" * 15 + "    ]\n",
])
def test_ordinary_text_is_not_a_loop(text: str) -> None:
    guard = RepetitionGuard()
    assert not any(guard.feed(text[i:i + 5]) for i in range(0, len(text), 5))
    assert guard.text == text and not guard.looped


def test_a_loop_is_cut_back_to_its_first_turn() -> None:
    text = "Intro. " + "the same line again\n" * 40
    period = loop_period(text)
    assert period == len("the same line again\n")
    assert cut_loop(text, period) == "Intro. the same line again\n"
    word = "Hi " + "the " * 200
    assert cut_loop(word, loop_period(word) or 0) == "Hi the"


def _shortest_loop(text: str) -> int | None:
    """The definition, tried period by period: the reference for ``loop_period``."""
    tail = text[-(MAX_PERIOD * MIN_REPEATS):]
    for period in range(1, MAX_PERIOD + 1):
        span = max(MIN_SPAN, (MIN_REPEATS - 1) * period)
        if span + period <= len(tail) and tail[-span:] == tail[-span - period:-period]:
            return period
    return None


def test_loop_period_finds_exactly_the_shortest_loop() -> None:
    # Small alphabets make near-loops and false starts common; every length of
    # unit, repeat count and ragged end, against the definition.
    rng = random.Random(10)
    found = 0
    for _ in range(3000):
        alphabet = rng.choice(["ab", "abc", "abcdefgh ", "the quick brown fox ."])
        unit = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 520)))
        noise = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 900)))
        text = noise + unit * rng.randint(0, 12) + unit[:rng.randint(0, len(unit))]
        text = text[:len(text) - rng.randint(0, 3)]
        assert loop_period(text) == _shortest_loop(text)
        found += loop_period(text) is not None
    assert 500 < found < 2500  # both kinds were tried


async def test_the_local_model_sends_its_cap() -> None:
    # An answer that would run long (counting to 200), capped at 8 tokens by the
    # provider's max_output_tokens alone: the request sets no max_tokens.
    provider = LocalProvider(
        name="demo", temperature=0.0,
        capabilities=Capabilities(context_window=1024, max_output_tokens=8))
    request = CompletionRequest((Message("user", "Count from 1 to 200, one number a line."),))
    async with provider:
        run = FallbackChain([provider], Breakers()).run(request)
        text = "".join([chunk.text async for chunk in run])
    assert text.strip()
    assert not run.usage.estimated and 0 < run.usage.completion_tokens <= 8
