"""OpenAICompatProvider and the registry, through the real ``openai`` SDK against the fake.

Each SDK failure must come out as the right member of our error tree with a
footer-ready reason, and no key may ever appear in an error or a log line.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

import pytest
from pydantic import SecretStr

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
from engine.providers.openai_compat import OpenAICompatProvider
from engine.providers.openai_plain import PlainOpenAICompatProvider
from engine.providers.registry import ProviderConfig, build_provider, capabilities
from engine.types import Attachment, Capabilities, Chunk, CompletionRequest, Message, Usage
from tests.fakes.openai_server import (
    Drop,
    FakeOpenAI,
    Hang,
    Malformed,
    RateLimit,
    Status,
    Text,
)

KEY = "sk-test-very-secret-0123456789"
REQUEST = CompletionRequest((Message("system", "Be brief."), Message("user", "What is 6*7?")))


def _provider(fake: FakeOpenAI, transport: type[OpenAICompatProvider] = OpenAICompatProvider,
              **overrides: object) -> OpenAICompatProvider:
    options: dict[str, object] = {
        "name": "primary", "model": "m", "base_url": fake.base_url,
        "api_key": SecretStr(KEY), "first_token_timeout_s": 2.0, "idle_timeout_s": 2.0,
        "timeout_s": 5.0,
    }
    options.update(overrides)
    return transport(**options)  # type: ignore[arg-type]


async def _drain(provider: OpenAICompatProvider, request: CompletionRequest = REQUEST
                 ) -> tuple[list[Chunk], ProviderError | None]:
    chunks: list[Chunk] = []
    try:
        async for chunk in provider.stream(request):
            chunks.append(chunk)
    except ProviderError as exc:
        return chunks, exc
    finally:
        await provider.aclose()
    return chunks, None


async def test_streams_text_and_usage_with_the_right_body(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(Text(["4", "2"], usage=(12, 2)))
    provider = _provider(openai_fake, temperature=0.3,
                         capabilities=Capabilities(max_output_tokens=100))
    chunks, error = await _drain(provider, CompletionRequest(REQUEST.messages, max_tokens=500))
    assert error is None
    assert [c.text for c in chunks if c.text] == ["4", "2"]
    assert [c.usage for c in chunks if c.usage] == [Usage(12, 2)]
    sent = openai_fake.requests[0]
    assert sent.body["stream"] is True
    assert sent.body["stream_options"] == {"include_usage": True}
    assert sent.body["temperature"] == 0.3
    assert sent.body["max_tokens"] == 100  # capped at the model's output limit
    assert sent.messages == [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "What is 6*7?"}]
    assert sent.headers["Authorization"] == f"Bearer {KEY}"


# Each scripted failure of the server, the error it must become and its reason
# (shared with tests/test_openai_plain.py: the SDK-free transport maps alike).
FAILURES: list[tuple[object, type[ProviderError], str]] = [
    (RateLimit(retry_after=3), RateLimited, "rate limited"),
    (Status(500), Unavailable, "server error 500"),
    (Status(503), Unavailable, "server error 503"),
    (Status(401, f"Incorrect API key provided: {KEY}"), AuthFailed, "authentication failed"),
    (Status(403), AuthFailed, "authentication failed"),
    (Status(404), Unavailable, "model or endpoint not found (404)"),
    (Status(400, "This model's maximum context length is 8192 tokens"), ContextTooLong,
     "request too long for this model"),
    (Hang(after=0), ProviderTimeout, "timed out before first token"),
    (Drop(after=0), Unavailable, "connection failed"),
    (Drop(after=2), Unavailable, "connection dropped mid-answer"),
    (Malformed(after=1), Unavailable, "malformed response stream"),
    (Malformed(after=1, payload='data: {"error": {"message": "Overloaded"}}\n\n'),
     Unavailable, "error event mid-answer"),
    (Hang(after=2), ProviderTimeout, "stalled mid-answer (idle timeout)"),
]


@pytest.mark.parametrize("transport", [OpenAICompatProvider, PlainOpenAICompatProvider])
@pytest.mark.parametrize(("behaviour", "error", "reason"), FAILURES)
async def test_failures_map_to_our_errors(
    openai_fake: FakeOpenAI, caplog: pytest.LogCaptureFixture,
    behaviour: object, error: type[ProviderError], reason: str,
    transport: type[OpenAICompatProvider],
) -> None:
    # Both transports map alike: the SDK's, and httpx2's alone (the local model's).
    caplog.set_level(logging.DEBUG)
    openai_fake.script(behaviour)  # type: ignore[arg-type]
    # Short limits only where the fake is scripted to hang: a loaded machine
    # must not turn another failure into a timeout.
    limit = 0.5 if isinstance(behaviour, Hang) else 10.0
    provider = _provider(openai_fake, transport, first_token_timeout_s=limit,
                         idle_timeout_s=limit)
    chunks, raised = await _drain(provider)
    assert type(raised) is error
    assert raised.reason == reason and raised.provider == "primary"
    assert raised.failover is True
    assert raised.__cause__ is not None  # raise ... from exc keeps the transport's error
    expected_text = list(getattr(behaviour, "chunks", []))[: getattr(behaviour, "after", 0)]
    assert [c.text for c in chunks if c.text] == expected_text
    assert KEY not in str(raised) and KEY not in raised.detail and KEY not in caplog.text
    assert openai_fake.count == 1  # max_retries=0


async def test_retry_after_is_read(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(RateLimit(retry_after=3))
    _, raised = await _drain(_provider(openai_fake))
    assert isinstance(raised, RateLimited) and raised.retry_after == 3.0


async def test_invalid_request_is_not_failed_over_and_hides_keys(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(Status(400, f"Unsupported parameter 'x' (your key {KEY})"))
    _, raised = await _drain(_provider(openai_fake))
    assert isinstance(raised, InvalidRequest) and raised.failover is False
    assert raised.reason == "request refused (HTTP 400)"  # our words, fit for anyone
    assert "Unsupported parameter" in raised.detail and KEY not in raised.detail  # theirs


@pytest.mark.parametrize("transport", [OpenAICompatProvider, PlainOpenAICompatProvider])
async def test_refused_connection_is_unavailable(transport: type[OpenAICompatProvider]) -> None:
    # Both transports: the SDK's, and httpx2's alone (the local model's).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: connecting is refused
    provider = transport(name="gone", model="m",
                         base_url=f"http://127.0.0.1:{port}/v1", timeout_s=2.0)
    _, raised = await _drain(provider)
    assert isinstance(raised, Unavailable) and raised.reason == "connection failed"


async def test_the_sdk_talks_over_aiohttp_and_closes_it(openai_fake: FakeOpenAI) -> None:
    # The SDK's aiohttp transport (C HTTP parsing), built off the loop by the
    # first request itself when nothing prepared it; closing the provider
    # closes aiohttp's session (no "Unclosed client session" at exit).
    import aiohttp

    provider = _provider(openai_fake)
    chunks, error = await _drain(provider)  # _drain closes the provider
    assert error is None and [c.text for c in chunks if c.text]
    transport: Any = provider._client._client._transport
    assert type(transport).__name__ == "AiohttpTransport"
    assert isinstance(transport.client, aiohttp.ClientSession) and transport.client.closed
    assert openai_fake.count == 1


@pytest.mark.parametrize("transport", [OpenAICompatProvider, PlainOpenAICompatProvider])
async def test_concurrent_first_requests_build_one_client_off_the_loop(
    openai_fake: FakeOpenAI, transport: type[OpenAICompatProvider],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Nothing prepared the provider: four chats arrive at once. One client is
    # built, in a worker thread; a second would leak its connection pool.
    builder = "_new_http" if transport is PlainOpenAICompatProvider else "_new_client"
    built: list[int] = []
    real = getattr(transport, builder)

    def counted(self: OpenAICompatProvider) -> Any:
        built.append(threading.get_ident())
        return real(self)

    monkeypatch.setattr(transport, builder, counted)
    provider = _provider(openai_fake, transport)

    async def ask() -> list[str]:
        return [c.text async for c in provider.stream(REQUEST) if c.text]

    try:
        answers = await asyncio.gather(*(ask() for _ in range(4)))
    finally:
        await provider.aclose()
    assert all(answers) and openai_fake.count == 4
    assert len(built) == 1 and built[0] != threading.get_ident()


async def test_no_response_headers_hits_the_overall_timeout(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(Hang(headers=False))
    _, raised = await _drain(_provider(openai_fake, timeout_s=0.3, first_token_timeout_s=5))
    assert isinstance(raised, ProviderTimeout) and raised.reason == "timed out"


async def test_no_key_never_sends_the_environment_key(
    openai_fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env-must-not-leak")
    chunks, error = await _drain(_provider(openai_fake, api_key=None))
    assert error is None and chunks
    assert openai_fake.requests[0].headers["Authorization"] == "Bearer no-key-needed"


async def test_images_sent_only_to_vision_models(openai_fake: FakeOpenAI) -> None:
    image = Attachment("cat.png", "image/png", 3, data=b"\x89PN")
    request = CompletionRequest((Message("user", "what is this?", images=(image,)),))
    await _drain(_provider(openai_fake, capabilities=Capabilities(vision=True)), request)
    await _drain(_provider(openai_fake, capabilities=Capabilities(vision=False)), request)
    with_vision, without = (r.messages[0]["content"] for r in openai_fake.requests)
    assert with_vision[0] == {"type": "text", "text": "what is this?"}
    assert with_vision[1]["image_url"]["url"] == "data:image/png;base64,iVBO"
    assert without.startswith("what is this?") and "cannot see images (cat.png)" in without


async def test_claude_subscription_checks_health_first(openai_fake: FakeOpenAI) -> None:
    config = ProviderConfig(name="sub", kind="claude_subscription", model="claude-sonnet",
                            base_url=openai_fake.base_url, timeout_s=60,
                            first_token_timeout_s=60)
    provider = build_provider(config)
    assert isinstance(provider, OpenAICompatProvider)
    assert (provider.timeout_s, provider.first_token_timeout_s) == (20.0, 8.0)  # capped
    assert "experimental" in provider.label
    openai_fake.healthy = False
    _, raised = await _drain(provider)
    assert isinstance(raised, Unavailable) and "health check" in raised.reason
    assert openai_fake.count == 0  # an unhealthy proxy gets no completion request
    openai_fake.healthy = True
    chunks, error = await _drain(build_provider(config))  # type: ignore[arg-type]
    assert error is None and chunks and openai_fake.count == 1


def test_registry_presets_and_overrides() -> None:
    openai = build_provider(ProviderConfig(name="p", kind="openai", model="gpt-4o-mini",
                                           api_key=SecretStr(KEY), context_window=64_000))
    assert isinstance(openai, OpenAICompatProvider)
    assert openai.base_url == "https://api.openai.com/v1"
    assert openai.capabilities.context_window == 64_000  # override
    assert openai.capabilities.vision is True  # preset
    assert KEY not in repr(openai)
    caps = capabilities(ProviderConfig(name="m", kind="mistral", vision=True))
    assert caps.vision is True and caps.context_window == 128_000
    with pytest.raises(ConfigError, match="base_url"):
        build_provider(ProviderConfig(name="x", kind="openai_compatible", model="llama3"))
    with pytest.raises(ConfigError, match="unknown kind"):
        build_provider(ProviderConfig(name="x", kind="nope", model="m"))


async def test_openai_kind_sends_max_completion_tokens(openai_fake: FakeOpenAI) -> None:
    provider = build_provider(ProviderConfig(name="p", kind="openai", model="gpt-4o-mini",
                                             api_key=SecretStr(KEY),
                                             base_url=openai_fake.base_url))
    assert isinstance(provider, OpenAICompatProvider)
    await _drain(provider, CompletionRequest(REQUEST.messages, max_tokens=50))
    body = openai_fake.requests[0].body
    assert body["max_completion_tokens"] == 50 and "max_tokens" not in body


async def test_whole_answer_is_bounded_by_timeout_s(openai_fake: FakeOpenAI) -> None:
    # Steady chunks (no idle gap) that together take longer than timeout_s.
    openai_fake.script(Text(["a", "b", "c", "d", "e", "f", "g", "h"], gap_s=0.3))
    provider = _provider(openai_fake, timeout_s=1.2, first_token_timeout_s=5,
                         idle_timeout_s=5)
    chunks, raised = await _drain(provider)
    assert isinstance(raised, ProviderTimeout) and raised.reason == "timed out mid-answer"
    assert 1 <= len([c for c in chunks if c.text]) < 8
