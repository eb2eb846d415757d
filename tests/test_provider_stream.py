"""The provider's hot path: the request on the wire, each chunk as sent, the moving deadline.

``OpenAICompatProvider.stream`` posts the body it builds itself through the
SDK's low-level ``post`` (no request transform) and reads every chunk as the
JSON object the server sent (no pydantic models); the first-token, idle and
overall limits run on one ``Deadline`` per answer. These tests hold it to what
``chat.completions.create`` sends, to what servers send, and to the timeout
rules (the consumer's time never counts; a cancel from outside stays one).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from openai import AsyncOpenAI
from pydantic import SecretStr

from engine.errors import ProviderTimeout, Unavailable
from engine.providers.deadline import Deadline
from engine.providers.openai_compat import OpenAICompatProvider
from engine.types import Attachment, Capabilities, CompletionRequest, Message, Usage
from tests.fakes.openai_server import FakeOpenAI, Hang, Malformed, Text
from tests.test_openai_provider import _drain

KEY = "sk-test-stream-0123456789"
IMAGE = Attachment("cat.png", "image/png", 3, data=b"\x89PN")
REQUEST = CompletionRequest(
    (Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"),
     Message("user", "What is this? Answer in JSON.", images=(IMAGE,))),
    temperature=0.2, max_tokens=64, json_mode=True)


def _provider(fake: FakeOpenAI, **overrides: Any) -> OpenAICompatProvider:
    options: dict[str, Any] = {
        "name": "p", "model": "m", "base_url": fake.base_url, "api_key": SecretStr(KEY),
        "capabilities": Capabilities(vision=True), "first_token_timeout_s": 10.0,
        "idle_timeout_s": 10.0, "timeout_s": 20.0,
    }
    options.update(overrides)
    return OpenAICompatProvider(**options)


async def test_the_wire_carries_our_body_as_create_would_send_it(openai_fake: FakeOpenAI) -> None:
    provider = _provider(openai_fake)
    body = provider._body(REQUEST)
    chunks, error = await _drain(provider, REQUEST)
    assert error is None and [c.text for c in chunks if c.text]
    # The same arguments through the SDK's typed path, on a client like ours.
    async with AsyncOpenAI(base_url=openai_fake.base_url, api_key=KEY, max_retries=0,
                           timeout=20.0) as client:
        stream = await client.chat.completions.create(**body)
        async for _ in stream:
            pass
    ours, typed = openai_fake.requests
    assert ours.body == body == typed.body  # exactly what _body built, nothing re-shaped
    assert body["response_format"] == {"type": "json_object"} and body["max_tokens"] == 64
    assert body["messages"][3]["content"][1]["image_url"]["url"].startswith("data:image/png")
    assert ours.headers["Authorization"] == f"Bearer {KEY}"
    # The very headers of the SDK's own path: auth, content type, user agent,
    # x-stainless-* (retry count 0, the read timeout from timeout_s).
    assert ours.headers == typed.headers


async def test_null_usage_on_each_chunk_is_read_as_no_usage(openai_fake: FakeOpenAI) -> None:
    # OpenAI sends "usage": null on every chunk when usage is asked for.
    payload = ('data: {"choices": [{"index": 0, "delta": {"content": " more"}}], '
               '"usage": null}\n\n'
               'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}\n\n')
    openai_fake.script(Malformed(after=1, chunks=("Some",), payload=payload))
    chunks, error = await _drain(_provider(openai_fake))
    assert error is None
    assert [c.text for c in chunks if c.text] == ["Some", " more"]
    assert [c.usage for c in chunks if c.usage] == [Usage(9, 2)]


@pytest.mark.parametrize("payload", [
    "data: [1, 2]\n\n",
    'data: {"choices": "none"}\n\n',
    'data: {"choices": [{"delta": {"content": 7}}]}\n\n',
    'data: {"choices": [], "usage": {"prompt_tokens": "many"}}\n\n',
])
async def test_a_chunk_of_another_shape_is_a_malformed_stream(
    openai_fake: FakeOpenAI, payload: str
) -> None:
    openai_fake.script(Malformed(after=1, chunks=("Some",), payload=payload))
    chunks, error = await _drain(_provider(openai_fake))
    assert isinstance(error, Unavailable) and error.reason == "malformed response stream"
    assert [c.text for c in chunks if c.text] == ["Some"]


async def test_steady_chunks_move_the_deadline(openai_fake: FakeOpenAI) -> None:
    # Every gap is well under the idle limit; the answer after its first chunk takes
    # longer than that limit: the deadline moves with each chunk. (The first-token
    # limit is generous: a busy machine may take a while to start the answer.)
    openai_fake.script(Text(["a", "b", "c", "d", "e", "f", "g", "h"], gap_s=0.15))
    chunks, error = await _drain(_provider(openai_fake, first_token_timeout_s=30,
                                           idle_timeout_s=0.9))
    assert error is None and "".join(c.text for c in chunks) == "abcdefgh"


async def test_the_consumers_time_between_chunks_never_counts(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(Text(["a", "b", "c"]))
    provider = _provider(openai_fake, first_token_timeout_s=0.3, idle_timeout_s=0.3)
    got = []
    async for chunk in provider.stream(REQUEST):
        got.append(chunk.text)
        await asyncio.sleep(0.5)  # slower than the idle limit: not cancelled, not a timeout
    await provider.aclose()
    assert "".join(got) == "abc"


async def test_a_stall_after_a_slow_consumer_still_times_out(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(Hang(after=1, chunks=("a", "b")))
    # A first-token limit no busy machine reaches: only the idle limit may fire.
    provider = _provider(openai_fake, first_token_timeout_s=600, idle_timeout_s=0.3)
    stream = provider.stream(REQUEST)
    assert (await anext(stream)).text == "a"
    await asyncio.sleep(0.5)  # the timer fires now, while nothing waits: it re-arms later
    with pytest.raises(ProviderTimeout, match="idle timeout"):
        await anext(stream)
    await provider.aclose()


async def test_an_idle_limit_shorter_than_the_first_token_limit_fires_first(
    openai_fake: FakeOpenAI,
) -> None:
    # The timer was armed for the first-token deadline (600 s); after the first text
    # the deadline moves earlier, and the timer must follow it, not wait 600 s.
    openai_fake.script(Hang(after=1, chunks=("a", "b")))
    provider = _provider(openai_fake, timeout_s=600, first_token_timeout_s=600,
                         idle_timeout_s=0.2)
    stream = provider.stream(REQUEST)
    assert (await anext(stream)).text == "a"
    with pytest.raises(ProviderTimeout, match="idle timeout"):
        await asyncio.wait_for(anext(stream), 60)  # a bound, not a timing: 300x the limit
    await provider.aclose()


async def test_a_cancel_from_outside_stays_a_cancel(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(Hang(after=1, chunks=("a", "b")))
    provider = _provider(openai_fake)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in provider.stream(REQUEST):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    await provider.aclose()


async def test_deadline_raises_timeout_only_inside_wait() -> None:
    loop = asyncio.get_running_loop()
    timer = Deadline(loop, loop.time() + 0.05)
    assert await timer.wait(asyncio.sleep(0, "done")) == "done"
    await asyncio.sleep(0.1)  # past the deadline outside wait: nothing happens here
    with pytest.raises(TimeoutError):
        await timer.wait(asyncio.Event().wait())
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0  # our cancel was taken back
    timer.at = loop.time() + 5.0
    assert await timer.wait(asyncio.sleep(0.01, "later")) == "later"
    timer.cancel()


async def test_deadline_keeps_a_foreign_cancel() -> None:
    loop = asyncio.get_running_loop()
    timer = Deadline(loop, loop.time() + 5.0)
    task = asyncio.create_task(timer.wait(asyncio.Event().wait()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    timer.cancel()
