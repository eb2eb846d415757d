"""The Bedrock provider: the real aioboto3 client against a fake Bedrock runtime.

Covers streaming and non-streaming replies, message mapping (system prompt,
merged turns, images), every error class before and during the stream, our
own timeouts, and the event-stream framing of the fake itself.
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from botocore.eventstream import EventStreamBuffer
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import (
    AuthFailed,
    ConfigError,
    ContextTooLong,
    InvalidRequest,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    Unavailable,
)
from engine.providers.bedrock import BedrockProvider, build_bedrock, converse_messages
from engine.providers.fallback import Breakers, ChainRun, FallbackChain
from engine.providers.openai_compat import OpenAICompatProvider
from engine.types import (
    Attachment,
    Capabilities,
    Chunk,
    CompletionRequest,
    Message,
    Role,
    Usage,
)
from tests.fakes.bedrock_server import Behaviour, FakeBedrock, event_frame, exception_frame
from tests.fakes.openai_server import Drop, FakeOpenAI, Status

MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
ARN = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-x"


def ask(text: str = "Hi", *, system: str = "Be brief.") -> CompletionRequest:
    return CompletionRequest(messages=(Message("system", system), Message("user", text)))


@pytest.fixture
async def bedrock(bedrock_fake: FakeBedrock) -> AsyncIterator[BedrockProvider]:
    provider = BedrockProvider(
        name="bedrock", model=MODEL, capabilities=Capabilities(vision=True),
        endpoint_url=bedrock_fake.url, timeout_s=10, first_token_timeout_s=10,
        idle_timeout_s=10,  # generous: a loaded CI machine must not turn errors into timeouts
    )
    async with provider:
        yield provider


async def collect(provider: BedrockProvider, request: CompletionRequest) -> list[Chunk]:
    return [chunk async for chunk in provider.stream(request)]


def test_fake_frames_decode_with_botocore() -> None:
    buffer = EventStreamBuffer()
    buffer.add_data(event_frame("contentBlockDelta", {"delta": {"text": "hé"}}))
    buffer.add_data(exception_frame("ThrottlingException", "slow down"))
    first, second = list(buffer)
    assert first.headers[":event-type"] == "contentBlockDelta"
    assert json.loads(first.payload) == {"delta": {"text": "hé"}}
    assert second.headers[":message-type"] == "exception"
    assert second.headers[":exception-type"] == "throttlingException"


async def test_stream_yields_deltas_then_usage(
    bedrock: BedrockProvider, bedrock_fake: FakeBedrock
) -> None:
    chunks = await collect(bedrock, ask())
    assert [c.text for c in chunks if c.text] == ["Hello", " from", " Bedrock"]
    assert chunks[-1].usage == Usage(prompt_tokens=11, completion_tokens=3)
    sent = bedrock_fake.requests[0]
    assert (sent.model, sent.op) == (MODEL, "converse-stream")
    assert sent.body["system"] == [{"text": "Be brief."}]
    assert sent.body["messages"] == [{"role": "user", "content": [{"text": "Hi"}]}]
    assert sent.body["inferenceConfig"]["maxTokens"] == 1024
    # Signed by the standard credential chain (here: the environment).
    assert "AKIDTEST" in sent.headers["Authorization"]


async def test_client_is_reused_across_requests(
    bedrock: BedrockProvider, bedrock_fake: FakeBedrock
) -> None:
    await collect(bedrock, ask())
    client = bedrock._client
    await collect(bedrock, ask("again"))
    assert bedrock._client is client
    assert bedrock_fake.count == 2
    # A finished stream hands its connection back to the pool.
    assert bedrock_fake.requests[0].peer == bedrock_fake.requests[1].peer != 0


async def test_non_streaming_uses_converse(bedrock_fake: FakeBedrock) -> None:
    provider = BedrockProvider(
        name="bedrock", model=ARN, capabilities=Capabilities(streaming=False),
        endpoint_url=bedrock_fake.url, temperature=0.2,
    )
    async with provider:
        chunks = await collect(provider, ask())
    assert [c.text for c in chunks if c.text] == ["Hello from Bedrock"]
    assert chunks[-1].usage == Usage(prompt_tokens=11, completion_tokens=3)
    sent = bedrock_fake.requests[0]
    # An ARN (with slashes) survives the URL encoding of the model id.
    assert (sent.model, sent.op) == (ARN, "converse")
    assert sent.body["inferenceConfig"]["temperature"] == 0.2


async def test_no_usage_reported_means_no_usage_chunk(
    bedrock: BedrockProvider, bedrock_fake: FakeBedrock
) -> None:
    bedrock_fake.push(Behaviour(usage=False))
    chunks = await collect(bedrock, ask())
    assert all(c.usage is None for c in chunks)


async def test_turns_are_merged_and_images_sent_with_vision(
    bedrock: BedrockProvider, bedrock_fake: FakeBedrock
) -> None:
    png = b"\x89PNG\r\n\x1a\nfake"
    image = Attachment(name="cat.png", mime_type="image/png", size=len(png), data=png)
    request = CompletionRequest(messages=(
        Message("system", "Persona."),
        Message("assistant", "(cut history)"),
        Message("user", "first"),
        Message("user", "what is this?", images=(image,)),
        Message("assistant", "a cat"),
        Message("user", "sure?"),
    ), max_tokens=50, json_mode=True)
    await collect(bedrock, request)
    body = bedrock_fake.requests[0].body
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    first = body["messages"][0]["content"]
    assert first[0] == {"text": "first"}
    assert first[1]["image"]["format"] == "png"
    assert base64.b64decode(first[1]["image"]["source"]["bytes"]) == png
    assert body["inferenceConfig"]["maxTokens"] == 50
    assert "JSON" in body["system"][-1]["text"]


async def test_images_become_a_note_without_vision(bedrock_fake: FakeBedrock) -> None:
    image = Attachment(name="cat.png", mime_type="image/png", size=3, data=b"abc")
    provider = BedrockProvider(name="b", model=MODEL, capabilities=Capabilities(vision=False),
                               endpoint_url=bedrock_fake.url)
    async with provider:
        await collect(provider, CompletionRequest(
            messages=(Message("user", "look", images=(image,)),)))
    content = bedrock_fake.requests[0].body["messages"][0]["content"]
    assert content == [{"text": "[image cat.png not shown to this model]"}, {"text": "look"}]


ERRORS = [
    ("ThrottlingException", "Too many requests", RateLimited),
    ("ServiceUnavailableException", "Service unavailable", Unavailable),
    ("InternalServerException", "oops", Unavailable),
    ("ModelTimeoutException", "Model timed out", ProviderTimeout),
    ("AccessDeniedException", "You don't have access to the model", AuthFailed),
    ("ValidationException", "Malformed input request", InvalidRequest),
    ("ValidationException", "Input is too long for requested model.", ContextTooLong),
    # how other model families word it
    ("ValidationException", "This model's maximum context length is 8192 tokens. However, "
     "your messages resulted in 9000 tokens.", ContextTooLong),
    ("ValidationException", "Prompt contains 40000 tokens and 0 draft tokens, too large for "
     "model with 32768 maximum context length", ContextTooLong),
    ("ValidationException", "Input Tokens Exceeded: Number of input tokens exceeds maximum "
     "length.", ContextTooLong),
    ("ValidationException", "input length and `max_tokens` exceed context limit: "
     "190000 + 20000 > 200000", ContextTooLong),
    ("ValidationException", "max_tokens: 9000 > 8192, the maximum allowed", InvalidRequest),
    # the provider's setup, not the user's request: failed over
    ("ValidationException", "Invocation of model ID anthropic.claude-3-5-sonnet-20241022-v2:0 "
     "with on-demand throughput isn't supported. Retry your request with the ID or ARN of an "
     "inference profile that contains this model.", Unavailable),
    ("ValidationException", "This model doesn't support system messages.", Unavailable),
]


@pytest.mark.parametrize(("code", "message", "expected"), ERRORS)
async def test_errors_before_the_stream(
    bedrock: BedrockProvider, bedrock_fake: FakeBedrock,
    code: str, message: str, expected: type[ProviderError],
) -> None:
    bedrock_fake.push(Behaviour(mode="error", error=code, message=message))
    with pytest.raises(expected) as caught:
        await collect(bedrock, ask())
    assert type(caught.value) is expected
    assert caught.value.provider == "bedrock"
    assert caught.value.failover is (expected is not InvalidRequest)
    assert bedrock_fake.count == 1  # SDK retries are off


# The exceptions ConverseStream can send inside the stream (botocore's model).
STREAM_ERRORS = [
    ("ThrottlingException", "Too many requests", RateLimited),
    ("ServiceUnavailableException", "Service unavailable", Unavailable),
    ("InternalServerException", "oops", Unavailable),
    ("ModelStreamErrorException", "The model stopped", Unavailable),
    ("ValidationException", "Malformed input request", InvalidRequest),
    ("ValidationException", "prompt is too long: 210000 tokens > 200000 maximum",
     ContextTooLong),
]


@pytest.mark.parametrize(("code", "message", "expected"), STREAM_ERRORS)
async def test_errors_during_the_stream(
    bedrock: BedrockProvider, bedrock_fake: FakeBedrock,
    code: str, message: str, expected: type[ProviderError],
) -> None:
    bedrock_fake.push(Behaviour(mode="stream_error", after=2, error=code, message=message))
    got: list[str] = []
    with pytest.raises(expected):
        async for chunk in bedrock.stream(ask()):
            got.append(chunk.text)
    assert got == ["Hello", " from"]  # the partial answer arrived before the error


async def test_errors_in_non_streaming_mode(bedrock_fake: FakeBedrock) -> None:
    provider = BedrockProvider(name="b", model=MODEL, capabilities=Capabilities(streaming=False),
                               endpoint_url=bedrock_fake.url)
    bedrock_fake.push(Behaviour(mode="error", error="ThrottlingException"))
    async with provider:
        with pytest.raises(RateLimited):
            await collect(provider, ask())


async def test_dropped_connection_mid_stream_is_unavailable(
    bedrock: BedrockProvider, bedrock_fake: FakeBedrock
) -> None:
    bedrock_fake.push(Behaviour(mode="drop", after=1))
    got: list[str] = []
    with pytest.raises(Unavailable, match="dropped"):
        async for chunk in bedrock.stream(ask()):
            got.append(chunk.text)
    assert got == ["Hello"]
    # The provider (and its pooled client) still serves the next request.
    assert "".join(c.text for c in await collect(bedrock, ask())) == "Hello from Bedrock"


async def test_first_token_timeout(bedrock: BedrockProvider, bedrock_fake: FakeBedrock) -> None:
    bedrock.first_token_timeout_s = 0.3
    bedrock_fake.push(Behaviour(mode="hang", after=0))
    with pytest.raises(ProviderTimeout):
        await collect(bedrock, ask())


async def test_idle_timeout_mid_stream(
    bedrock: BedrockProvider, bedrock_fake: FakeBedrock
) -> None:
    bedrock.idle_timeout_s = 0.3
    bedrock_fake.push(Behaviour(mode="hang", after=1))
    got: list[str] = []
    with pytest.raises(ProviderTimeout):
        async for chunk in bedrock.stream(ask()):
            got.append(chunk.text)
    assert got == ["Hello"]


async def test_refused_connection_is_unavailable(bedrock_fake: FakeBedrock) -> None:
    url = bedrock_fake.url
    await bedrock_fake.__aexit__(None, None, None)  # nothing listens there any more
    provider = BedrockProvider(name="b", model=MODEL, capabilities=Capabilities(),
                               endpoint_url=url, timeout_s=2)
    async with provider:
        with pytest.raises(Unavailable):
            await collect(provider, ask())


async def test_missing_credentials_is_auth_failed(
    bedrock_fake: FakeBedrock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    provider = BedrockProvider(name="b", model=MODEL, capabilities=Capabilities(),
                               endpoint_url=bedrock_fake.url)
    async with provider:
        with pytest.raises(AuthFailed, match="credentials"):
            await collect(provider, ask())
    assert bedrock_fake.count == 0


async def test_missing_region_fails_at_startup(
    bedrock_fake: FakeBedrock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    provider = BedrockProvider(name="b", model=MODEL, capabilities=Capabilities())
    with pytest.raises(ConfigError, match="region"):
        async with provider:
            pass


async def test_region_and_profile_from_config(
    bedrock_fake: FakeBedrock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "config"
    config.write_text("[profile team]\nregion = eu-west-3\n"
                      "aws_access_key_id = AKIDPROFILE\naws_secret_access_key = s\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_DEFAULT_REGION")  # the environment would win over the profile
    provider = BedrockProvider(name="b", model=MODEL, capabilities=Capabilities(),
                               profile="team", endpoint_url=bedrock_fake.url)
    async with provider:
        await collect(provider, ask())
    auth = bedrock_fake.requests[0].headers["Authorization"]
    assert "AKIDPROFILE" in auth and "/eu-west-3/bedrock/" in auth


async def test_region_from_config_wins(bedrock_fake: FakeBedrock) -> None:
    provider = BedrockProvider(name="b", model=MODEL, capabilities=Capabilities(),
                               region="ap-northeast-1", endpoint_url=bedrock_fake.url)
    async with provider:
        await collect(provider, ask())
    assert "/ap-northeast-1/bedrock/" in bedrock_fake.requests[0].headers["Authorization"]


# --- failover through the real FallbackChain, Bedrock <-> an OpenAI-compatible provider ---

@pytest.fixture
async def openai_backup(openai_fake: FakeOpenAI) -> AsyncIterator[OpenAICompatProvider]:
    provider = OpenAICompatProvider(
        name="backup", model="gpt-test", base_url=openai_fake.base_url,
        capabilities=Capabilities(context_window=32_000), timeout_s=10,
        first_token_timeout_s=10, idle_timeout_s=10,
    )
    async with provider:
        yield provider


async def drain(run: ChainRun) -> str:
    return "".join([chunk.text async for chunk in run])


async def test_failover_from_bedrock_before_the_stream(
    bedrock: BedrockProvider, openai_backup: OpenAICompatProvider,
    bedrock_fake: FakeBedrock, openai_fake: FakeOpenAI,
) -> None:
    chain = FallbackChain([bedrock, openai_backup], Breakers())
    bedrock_fake.push(Behaviour(mode="error", error="ServiceUnavailableException"))
    run = chain.run(ask())
    assert await drain(run) == "Hello from the fake."
    assert run.served_by == "backup"
    assert [(f.provider, f.kind) for f in run.failures] == [("bedrock", "unavailable")]


async def test_failover_from_bedrock_mid_stream_continues_the_answer(
    bedrock: BedrockProvider, openai_backup: OpenAICompatProvider,
    bedrock_fake: FakeBedrock, openai_fake: FakeOpenAI,
) -> None:
    chain = FallbackChain([bedrock, openai_backup], Breakers())
    bedrock_fake.push(Behaviour(mode="drop", after=2))
    run = chain.run(ask())
    assert await drain(run) == "Hello from" + "Hello from the fake."
    assert run.served_by == "backup"
    assert run.failures[0].provider == "bedrock"
    # The backup saw the partial answer and was asked to continue it.
    sent = openai_fake.requests[0].messages
    assert sent[-2] == {"role": "assistant", "content": "Hello from"}


async def test_failover_from_bedrock_in_stream_exception(
    bedrock: BedrockProvider, openai_backup: OpenAICompatProvider,
    bedrock_fake: FakeBedrock, openai_fake: FakeOpenAI,
) -> None:
    chain = FallbackChain([bedrock, openai_backup], Breakers())
    bedrock_fake.push(Behaviour(mode="stream_error", after=1, error="ThrottlingException"))
    run = chain.run(ask())
    await drain(run)
    assert run.served_by == "backup"
    assert [(f.provider, f.kind) for f in run.failures] == [("bedrock", "rate_limited")]


async def test_failover_back_to_bedrock(
    bedrock: BedrockProvider, openai_backup: OpenAICompatProvider,
    bedrock_fake: FakeBedrock, openai_fake: FakeOpenAI,
) -> None:
    chain = FallbackChain([openai_backup, bedrock], Breakers())
    openai_fake.script(Status(500), Drop(after=1))
    first = chain.run(ask())
    assert await drain(first) == "Hello from Bedrock"
    assert first.served_by == "bedrock"
    assert first.usage == Usage(prompt_tokens=11, completion_tokens=3)
    second = chain.run(ask())
    assert await drain(second) == "The answer" + "Hello from Bedrock"
    assert second.served_by == "bedrock"
    # Bedrock got the partial answer as an assistant turn, then the instruction.
    turns = bedrock_fake.requests[1].body["messages"]
    assert turns[-2] == {"role": "assistant", "content": [{"text": "The answer"}]}
    assert turns[-1]["role"] == "user"


async def test_invalid_request_is_not_failed_over(
    bedrock: BedrockProvider, openai_backup: OpenAICompatProvider,
    bedrock_fake: FakeBedrock, openai_fake: FakeOpenAI,
) -> None:
    chain = FallbackChain([bedrock, openai_backup], Breakers())
    bedrock_fake.push(Behaviour(mode="error", error="ValidationException",
                                message="messages: text content blocks must be non-empty"))
    with pytest.raises(InvalidRequest):
        await drain(chain.run(ask()))
    assert openai_fake.count == 0


async def test_context_too_long_fails_over(
    bedrock: BedrockProvider, openai_backup: OpenAICompatProvider,
    bedrock_fake: FakeBedrock, openai_fake: FakeOpenAI,
) -> None:
    chain = FallbackChain([bedrock, openai_backup], Breakers())
    bedrock_fake.push(Behaviour(mode="error", error="ValidationException",
                                message="Input is too long for requested model."))
    run = chain.run(ask())
    await drain(run)
    assert run.served_by == "backup"
    assert run.failures[0].kind == "context_too_long"


def test_build_bedrock_with_defaults_and_overrides() -> None:
    from engine.providers.registry import ProviderConfig

    claude = build_bedrock(ProviderConfig(name="aws", kind="bedrock", model=MODEL,
                                          region="eu-west-1", timeout_s=7))
    assert (claude.region, claude.timeout_s) == ("eu-west-1", 7)
    assert claude.capabilities.vision and claude.capabilities.context_window == 200_000
    llama = build_bedrock(ProviderConfig(name="l", kind="bedrock",
                                         model="meta.llama3-1-8b-instruct-v1:0",
                                         context_window=128_000, vision=False))
    assert llama.capabilities.context_window == 128_000
    assert not llama.capabilities.vision
    with pytest.raises(ConfigError, match="model"):
        build_bedrock(ProviderConfig(name="x", kind="bedrock"))


async def test_keys_and_region_from_dotenv_reach_bedrock(
    bedrock_fake: FakeBedrock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # .env is Boternity's, not the process environment: botocore cannot see it,
    # so the composition root hands the keys over explicitly.
    from adapters.wiring.build import build_app
    from adapters.wiring.settings import load_settings

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    (tmp_path / ".env").write_text("AWS_ACCESS_KEY_ID=AKIDDOTENV\n"
                                   "AWS_SECRET_ACCESS_KEY=dotenv-secret\n"
                                   "AWS_REGION=eu-north-1\n")
    (tmp_path / "b.toml").write_text(f"""
[storage]
data_dir = "{tmp_path / 'data'}"
[providers.aws]
kind = "bedrock"
model = "{MODEL}"
endpoint_url = "{bedrock_fake.url}"
[bots.demo]
chain = ["aws"]
[bots.demo.memory]
enabled = false
""")
    settings = load_settings(tmp_path / "b.toml", environ={}, dotenv=tmp_path / ".env")
    async with build_app(settings) as app:
        provider = app.providers["aws"]
        assert "dotenv-secret" not in repr(provider)
        assert isinstance(provider, BedrockProvider)
        await collect(provider, ask())
    auth = bedrock_fake.requests[0].headers["Authorization"]
    assert "AKIDDOTENV/" in auth and "/eu-north-1/bedrock/" in auth


@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]),
                          st.text(max_size=5)), max_size=12))
def test_converse_turns_always_alternate_starting_with_the_user(
    turns: list[tuple[Role, str]],
) -> None:
    messages = tuple(Message(role, text) for role, text in turns)
    system, converse = converse_messages(messages, vision=False)
    roles = [m["role"] for m in converse]
    assert all(a != b for a, b in itertools.pairwise(roles))
    assert not roles or roles[0] == "user"
    # Converse refuses empty turns and blank text blocks.
    assert all(m["content"] and all(block["text"].strip() for block in m["content"])
               for m in converse)
    # No user text is lost; system text goes to `system`.
    sent = [block["text"] for m in converse if m["role"] == "user" for block in m["content"]]
    assert sent == [text for role, text in turns if role == "user" and text.strip()]
    assert [b["text"] for b in system] == [t for r, t in turns if r == "system" and t.strip()]
