"""FallbackChain over real OpenAICompatProviders (real ``openai`` SDK) against the fake.

One fake server plays every provider: requests are told apart by model
("a" = primary, "b" = backup, "c" = third), so each test can assert exactly
which provider received what, and that a skipped provider received nothing.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import pybreaker
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from engine.errors import AllProvidersFailed, ContextTooLong, InvalidRequest
from engine.ports import Provider
from engine.providers.fallback import (
    CONTINUE_INSTRUCTION,
    Breakers,
    ChainRun,
    FallbackChain,
    NoProviderFits,
)
from engine.providers.openai_compat import OpenAICompatProvider
from engine.types import Capabilities, Chunk, CompletionRequest, Failure, Message, Usage
from tests.fakes.openai_server import (
    Behaviour,
    Drop,
    FakeOpenAI,
    Hang,
    Malformed,
    RateLimit,
    Status,
    Text,
    start_openai_fake,
)

REQUEST = CompletionRequest((Message("system", "Be brief."), Message("user", "Tell me.")))
SECRET = "sk-chain-secret-abcdef123456"


def _provider(fake: FakeOpenAI, name: str, model: str, window: int = 8192,
              quick: bool = False) -> Provider:
    """``quick``: short first-token/idle timeouts, for providers scripted to hang.
    Everyone else gets generous ones, so a loaded test machine cannot fail them."""
    limit = 0.5 if quick else 10.0
    return OpenAICompatProvider(
        name=name, model=model, base_url=fake.base_url, api_key=SecretStr(SECRET),
        capabilities=Capabilities(context_window=window, max_output_tokens=256),
        first_token_timeout_s=limit, idle_timeout_s=limit, timeout_s=20.0,
    )


def _chain(fake: FakeOpenAI, breakers: Breakers | None = None, *, quick_primary: bool = False,
           **kwargs: object) -> FallbackChain:
    providers = [_provider(fake, "primary", "a", quick=quick_primary),
                 _provider(fake, "backup", "b")]
    return FallbackChain(providers, breakers or Breakers(), **kwargs)  # type: ignore[arg-type]


async def _collect(run: ChainRun) -> tuple[list[str], list[Usage]]:
    texts, usages = [], []
    async for chunk in run:
        if chunk.text:
            texts.append(chunk.text)
        if chunk.usage:
            usages.append(chunk.usage)
    return texts, usages


FAILURES: list[tuple[str, Behaviour, str, str]] = [
    ("429", RateLimit(retry_after=None), "rate_limited", "rate limited"),
    ("500", Status(500), "unavailable", "server error 500"),
    ("401", Status(401, f"Incorrect API key provided: {SECRET}"), "auth",
     "authentication failed"),
    ("hang-before-first-token", Hang(after=0), "timeout", "timed out before first token"),
    ("hang-mid-stream", Hang(after=2), "timeout", "stalled mid-answer (idle timeout)"),
    ("tcp-drop-mid-stream", Drop(after=2), "unavailable", "connection dropped mid-answer"),
    ("malformed-sse", Malformed(after=1), "unavailable", "malformed response stream"),
]


@pytest.mark.parametrize(("label", "behaviour", "kind", "reason"), FAILURES,
                         ids=[f[0] for f in FAILURES])
async def test_each_failure_fails_over_and_the_answer_is_right(
    openai_fake: FakeOpenAI, caplog: pytest.LogCaptureFixture,
    label: str, behaviour: Behaviour, kind: str, reason: str,
) -> None:
    caplog.set_level(logging.INFO)
    openai_fake.script(behaviour, model="a")
    openai_fake.script(Text([" and the rest."], usage=(40, 4)), model="b")
    run = _chain(openai_fake, quick_primary=True).run(REQUEST)
    texts, usages = await _collect(run)

    partial = list(getattr(behaviour, "chunks", []))[: getattr(behaviour, "after", 0)]
    assert texts == [*partial, " and the rest."]  # nothing retracted, nothing repeated
    assert run.served_by == "backup" and run.model == "b"
    assert run.failures == (Failure("primary", kind, reason),)
    assert usages == [Usage(40, 4)] and run.usage == Usage(40, 4)
    backup_request = openai_fake.requests[-1]
    assert backup_request.model == "b"
    if partial:  # mid-stream: the backup continues the partial answer
        assert backup_request.messages[-2] == {"role": "assistant", "content": "".join(partial)}
        assert backup_request.messages[-1] == {"role": "user", "content": CONTINUE_INSTRUCTION}
        assert backup_request.messages[:2] == openai_fake.requests[0].messages
    else:
        assert backup_request.messages == openai_fake.requests[0].messages
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("primary failed" in r.getMessage() and "backup" in r.getMessage()
               for r in warnings)
    assert SECRET not in caplog.text
    if kind == "auth":  # logged loudly, without the key
        assert any(r.levelno == logging.ERROR and "AUTHENTICATION FAILED" in r.getMessage()
                   for r in caplog.records)


async def test_two_mid_stream_failures_keep_the_whole_partial(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(Drop(after=1, chunks=("One,",)), model="a")
    openai_fake.script(Drop(after=1, chunks=(" two,",)), model="b")
    openai_fake.script(Text([" three."]), model="c")
    chain = FallbackChain(
        [_provider(openai_fake, "primary", "a"), _provider(openai_fake, "backup", "b"),
         _provider(openai_fake, "third", "c")], Breakers())
    run = chain.run(REQUEST)
    texts, _ = await _collect(run)
    assert "".join(texts) == "One, two, three." and run.text == "One, two, three."
    assert run.served_by == "third"
    assert [f.provider for f in run.failures] == ["primary", "backup"]
    third = openai_fake.requests[-1]
    assert third.messages[-2] == {"role": "assistant", "content": "One, two,"}


async def test_all_fail_raises_with_every_reason(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(Status(500), model="a")
    openai_fake.script(RateLimit(retry_after=None), model="b")
    run = _chain(openai_fake).run(REQUEST)
    with pytest.raises(AllProvidersFailed) as info:
        await _collect(run)
    expected = (Failure("primary", "unavailable", "server error 500"),
                Failure("backup", "rate_limited", "rate limited"))
    assert info.value.failures == expected and run.failures == expected
    assert run.served_by is None
    assert "server error 500" in str(info.value) and "rate limited" in str(info.value)


async def test_invalid_request_is_not_failed_over(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(Status(400, "messages: content must not be empty"), model="a")
    with pytest.raises(InvalidRequest, match=r"request refused \(HTTP 400\)") as refused:
        await _collect(_chain(openai_fake).run(REQUEST))
    assert refused.value.detail == "messages: content must not be empty"  # for log, admins
    assert openai_fake.count_for("b") == 0


async def test_open_breaker_sends_no_request(
    openai_fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    breakers = Breakers(fail_max=2, reset_timeout_s=60)
    openai_fake.script(Status(500), Status(500), model="a")
    for _ in range(2):
        await _collect(_chain(openai_fake, breakers).run(REQUEST))
    assert breakers.state("primary") == "open"
    assert openai_fake.count_for("a") == 2

    run = _chain(openai_fake, breakers).run(REQUEST)
    texts, _ = await _collect(run)
    assert texts and run.served_by == "backup"
    assert openai_fake.count_for("a") == 2  # skipped without a request
    assert run.failures[0].provider == "primary" and run.failures[0].kind == "circuit_open"
    assert any(r.levelno == logging.WARNING and "primary skipped (circuit open" in r.getMessage()
               and "failing over to backup" in r.getMessage() for r in caplog.records)


async def test_breaker_is_shared_by_every_bots_chain(openai_fake: FakeOpenAI) -> None:
    breakers = Breakers(fail_max=1, reset_timeout_s=60)
    openai_fake.script(Status(503), model="a")
    await _collect(_chain(openai_fake, breakers, name="bot-one").run(REQUEST))
    run = _chain(openai_fake, breakers, name="bot-two").run(REQUEST)
    await _collect(run)
    assert openai_fake.count_for("a") == 1 and run.failures[0].kind == "circuit_open"


async def test_half_open_probe_closes_or_reopens_the_breaker(openai_fake: FakeOpenAI) -> None:
    storages: dict[str, pybreaker.CircuitMemoryStorage] = {}

    def storage(name: str) -> pybreaker.CircuitMemoryStorage:
        return storages.setdefault(name, pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED))

    breakers = Breakers(fail_max=1, reset_timeout_s=60, storage=storage)

    def reset_timeout_elapses() -> None:  # instead of sleeping 60 s
        storages["primary"].opened_at = datetime.now(UTC) - timedelta(seconds=61)

    openai_fake.script(Status(500), Status(500), model="a")
    await _collect(_chain(openai_fake, breakers).run(REQUEST))
    assert breakers.state("primary") == "open"

    reset_timeout_elapses()  # probe fails: open again, backup serves
    run = _chain(openai_fake, breakers).run(REQUEST)
    await _collect(run)
    assert openai_fake.count_for("a") == 2 and breakers.state("primary") == "open"
    assert run.served_by == "backup"

    reset_timeout_elapses()  # probe succeeds: closed, primary serves
    run = _chain(openai_fake, breakers).run(REQUEST)
    await _collect(run)
    assert openai_fake.count_for("a") == 3 and run.served_by == "primary"
    assert breakers.state("primary") == "closed" and run.failures == ()


async def test_retry_after_cools_the_provider_down(openai_fake: FakeOpenAI) -> None:
    breakers = Breakers(fail_max=5)
    openai_fake.script(RateLimit(retry_after=30), model="a")
    await _collect(_chain(openai_fake, breakers).run(REQUEST))
    run = _chain(openai_fake, breakers).run(REQUEST)
    await _collect(run)
    assert openai_fake.count_for("a") == 1  # no request while cooling down
    assert run.failures[0].kind == "rate_limited" and "retry in" in run.failures[0].reason
    assert breakers.state("primary") == "cooling down"


async def test_skip_hooks_sync_and_async(openai_fake: FakeOpenAI) -> None:
    def over_budget(provider: Provider, request: CompletionRequest) -> str | None:
        return "over budget" if provider.name == "primary" else None

    async def never(provider: Provider, request: CompletionRequest) -> str | None:
        await asyncio.sleep(0)
        return None

    run = _chain(openai_fake, skip=over_budget).run(REQUEST, skip=never)
    await _collect(run)
    assert run.served_by == "backup"
    assert run.failures == (Failure("primary", "skipped", "over budget"),)
    assert openai_fake.count_for("a") == 0


async def test_request_too_large_for_the_small_window_goes_to_one_that_fits(
    openai_fake: FakeOpenAI,
) -> None:
    long_request = CompletionRequest((Message("user", "x" * 8000),))  # ~2000 tokens
    small = _provider(openai_fake, "small", "a", window=1024)
    big = _provider(openai_fake, "big", "b", window=32_000)
    chain = FallbackChain([small, big], Breakers())
    assert chain.capabilities.context_window == 32_000
    run = chain.run(long_request)
    await _collect(run)
    assert run.served_by == "big" and openai_fake.count_for("a") == 0
    assert run.failures[0].kind == "context_too_long"
    assert "window" in run.failures[0].reason

    short = chain.run(REQUEST)  # a short request still goes to the first provider
    await _collect(short)
    assert short.served_by == "small"

    tiny = FallbackChain([small, _provider(openai_fake, "also-small", "b", window=512)],
                         Breakers())
    with pytest.raises(NoProviderFits) as info:
        await _collect(tiny.run(long_request))
    assert [f.provider for f in info.value.failures] == ["small", "also-small"]
    assert isinstance(info.value, AllProvidersFailed) and isinstance(info.value, ContextTooLong)
    assert info.value.failover is False


async def test_usage_is_estimated_when_the_server_reports_none(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(Text(["12345678"], report_usage=False), model="a")
    run = _chain(openai_fake).run(REQUEST)
    await _collect(run)
    assert run.usage.estimated is True
    assert run.usage.completion_tokens == 2  # 8 characters / 4
    assert run.usage.prompt_tokens > 0


async def test_chain_is_a_provider_and_reports_status(openai_fake: FakeOpenAI) -> None:
    breakers = Breakers(fail_max=3)
    chain = _chain(openai_fake, breakers, fail_max={"primary": 1})
    assert isinstance(chain, Provider)
    openai_fake.script(Status(502), model="a")
    chunks = [c async for c in chain.stream(REQUEST)]
    assert "".join(c.text for c in chunks) == "Hello from the fake."
    assert isinstance(chunks[-1], Chunk) and chunks[-1].usage is not None
    status = {s.name: s for s in chain.status()}
    assert status["primary"].state == "open"  # fail_max=1 for primary only
    assert status["primary"].last_error == "server error 502"
    assert status["backup"].state == "closed" and status["backup"].last_served_at is not None
    assert status["backup"].model == "b"


# --- property: whatever fails where, nothing shown is retracted or repeated ---

_words = st.lists(st.sampled_from(["Alpha", " beta", " gamma", ",", " delta."]),
                  min_size=1, max_size=4)


@st.composite
def _behaviour(draw: st.DrawFn) -> Behaviour:
    chunks = tuple(draw(_words))
    kind = draw(st.sampled_from(["text", "drop", "malformed", "500", "429"]))
    after = draw(st.integers(0, len(chunks)))
    return {
        "text": Text(chunks),
        "drop": Drop(after=after, chunks=chunks),
        "malformed": Malformed(after=after, chunks=chunks),
        "500": Status(500),
        "429": RateLimit(retry_after=None),
    }[kind]


async def _scenario(behaviours: list[Behaviour]) -> None:
    async with start_openai_fake() as fake:
        names = [f"p{i}" for i in range(len(behaviours))]
        for name, behaviour in zip(names, behaviours, strict=True):
            fake.script(behaviour, model=name)
        chain = FallbackChain([_provider(fake, n, n) for n in names], Breakers())
        run = chain.run(REQUEST)
        shown: list[str] = []
        error: AllProvidersFailed | None = None
        try:
            async for chunk in run:
                shown.append(chunk.text)
        except AllProvidersFailed as exc:
            error = exc

        expected, served = "", None
        for name, behaviour in zip(names, behaviours, strict=True):
            if isinstance(behaviour, Text):
                expected += "".join(behaviour.chunks)
                served = name
                break
            if isinstance(behaviour, Drop | Malformed):
                expected += "".join(behaviour.chunks[: behaviour.after])
        assert "".join(shown) == expected == run.text
        assert run.served_by == served and (error is None) == (served is not None)
        assert [f.provider for f in run.failures] == names[: len(run.failures)]
        # every provider after a partial answer was asked to continue exactly it
        partial = ""
        for request, behaviour in zip(fake.requests, behaviours, strict=False):
            if partial:
                assert request.messages[-2] == {"role": "assistant", "content": partial}
            if isinstance(behaviour, Drop | Malformed):
                partial += "".join(behaviour.chunks[: behaviour.after])


@settings(max_examples=25, deadline=None)
@given(st.lists(_behaviour(), min_size=1, max_size=3))
def test_property_streamed_text_is_never_retracted(behaviours: list[Behaviour]) -> None:
    asyncio.run(_scenario(behaviours))
