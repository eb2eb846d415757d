"""The fake OpenAI server speaks the protocol the real ``openai`` SDK expects.

Each scripted behaviour is driven through the real SDK, and the test checks
the SDK sees what a real server would make it see (the shapes TESTING.md lists).
"""

from __future__ import annotations

import asyncio

import httpx2
import openai
import pytest
from openai import AsyncOpenAI

from tests.fakes.openai_server import (
    Drop,
    FakeOpenAI,
    Hang,
    Malformed,
    RateLimit,
    Status,
    Text,
)

MESSAGES = [{"role": "user", "content": "hello there"}]


def _client(fake: FakeOpenAI, timeout: float = 5.0) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0,
                       timeout=httpx2.Timeout(timeout))


async def _collect(fake: FakeOpenAI, texts: list[str], sdk_timeout: float = 5.0) -> None:
    stream = await _client(fake, sdk_timeout).chat.completions.create(
        model="m", messages=MESSAGES, stream=True,  # type: ignore[arg-type]
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            texts.append(chunk.choices[0].delta.content)


async def test_streams_text_then_usage_and_records_request(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(Text(["Hi", " there"], usage=(7, 2)))
    stream = await _client(openai_fake).chat.completions.create(
        model="m", messages=MESSAGES, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    texts, usage = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            texts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert texts == ["Hi", " there"]
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (7, 2)
    assert openai_fake.count == 1
    request = openai_fake.requests[0]
    assert request.model == "m" and request.messages == MESSAGES
    assert request.headers["Authorization"] == "Bearer sk-test"


async def test_non_streaming(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(Text(["whole answer"]))
    result = await _client(openai_fake).chat.completions.create(
        model="m", messages=MESSAGES,  # type: ignore[arg-type]
    )
    assert result.choices[0].message.content == "whole answer"
    assert result.usage is not None and result.usage.completion_tokens == 1


async def test_rate_limit_carries_retry_after(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(RateLimit(retry_after=3))
    with pytest.raises(openai.RateLimitError) as info:
        await _collect(openai_fake, [])
    assert info.value.response.headers["retry-after"] == "3"
    assert openai_fake.count == 1  # max_retries=0: one request


@pytest.mark.parametrize(
    ("status", "error"),
    [(500, openai.InternalServerError), (401, openai.AuthenticationError),
     (400, openai.BadRequestError)],
)
async def test_error_statuses(openai_fake: FakeOpenAI, status: int, error: type) -> None:
    openai_fake.script(Status(status))
    with pytest.raises(error):
        await _collect(openai_fake, [])


async def test_drop_mid_stream_after_chunks(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(Drop(after=2))
    texts: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        await _collect(openai_fake, texts)
    assert texts == ["The answer", " is"]


async def test_malformed_sse_after_chunks(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(Malformed(after=1))
    texts: list[str] = []
    with pytest.raises(ValueError):  # json.JSONDecodeError from the SDK's sse.json()
        await _collect(openai_fake, texts)
    assert texts == ["The answer"]


async def test_hang_before_first_token_and_mid_stream(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(Hang(after=0), Hang(after=2))
    for expected in ([], ["partial", " answer"]):
        texts: list[str] = []
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.8):
                await _collect(openai_fake, texts)
        assert texts == expected


async def test_hang_before_headers_hits_sdk_timeout(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(Hang(headers=False))
    with pytest.raises(openai.APITimeoutError):
        await _collect(openai_fake, [], sdk_timeout=0.3)


async def test_scripts_per_model_and_health(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(Status(500), model="a")
    openai_fake.script(Text(["from b"]), model="b")
    client = _client(openai_fake)
    b = await client.chat.completions.create(model="b", messages=MESSAGES)  # type: ignore[arg-type]
    assert b.choices[0].message.content == "from b"
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="a", messages=MESSAGES)  # type: ignore[arg-type]
    assert (openai_fake.count_for("a"), openai_fake.count_for("b")) == (1, 1)
    async with httpx2.AsyncClient() as http:
        assert (await http.get(f"http://127.0.0.1:{openai_fake.port}/health")).status_code == 200
        openai_fake.healthy = False
        assert (await http.get(f"http://127.0.0.1:{openai_fake.port}/health")).status_code == 503
