"""PlainOpenAICompatProvider: the OpenAI-compatible stream on httpx2 alone, against the fake.

The same server behaviours as the SDK's provider must come out as the same
errors with the same reasons (the failure table of tests/test_openai_provider.py
runs on both transports), the same body must go on the wire, and the
``openai`` package must never be imported.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from engine.errors import InvalidRequest, RateLimited
from engine.providers.openai_compat import OpenAICompatProvider
from engine.providers.openai_plain import PlainOpenAICompatProvider
from engine.types import Capabilities, CompletionRequest, Usage
from tests.fakes.openai_server import FakeOpenAI, RateLimit, Status, Text
from tests.test_openai_provider import KEY, REQUEST, _drain

ROOT = Path(__file__).resolve().parent.parent


def _provider(fake: FakeOpenAI, cls: type[OpenAICompatProvider] = PlainOpenAICompatProvider,
              **overrides: Any) -> OpenAICompatProvider:
    options: dict[str, object] = {
        "name": "local", "model": "m", "base_url": fake.base_url,
        "first_token_timeout_s": 2.0, "idle_timeout_s": 2.0, "timeout_s": 5.0,
    }
    options.update(overrides)
    return cls(**options)  # type: ignore[arg-type]


async def test_streams_text_and_usage_with_the_sdks_body(openai_fake: FakeOpenAI) -> None:
    request = CompletionRequest(REQUEST.messages, max_tokens=500)
    options: dict[str, Any] = {"temperature": 0.3,
                                  "capabilities": Capabilities(max_output_tokens=100)}
    openai_fake.script(Text(["4", "2"], usage=(12, 2)), Text(["4", "2"], usage=(12, 2)))
    plain = _provider(openai_fake, **options)
    await plain.prepare()
    chunks, error = await _drain(plain, request)
    assert error is None
    assert [c.text for c in chunks if c.text] == ["4", "2"]
    assert [c.usage for c in chunks if c.usage] == [Usage(12, 2)]
    await _drain(_provider(openai_fake, OpenAICompatProvider, **options), request)
    ours, sdks = openai_fake.requests
    assert ours.body == sdks.body and ours.path == sdks.path
    assert "Authorization" not in ours.headers  # no key: none sent (the SDK sends a dummy)
    assert ours.headers["Accept"] == "text/event-stream"


async def test_a_key_is_sent_as_a_bearer_token(openai_fake: FakeOpenAI) -> None:
    _, error = await _drain(_provider(openai_fake, api_key=SecretStr(KEY)))
    assert error is None
    assert openai_fake.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(_provider(openai_fake, api_key=SecretStr(KEY)))


async def test_retry_after_and_the_servers_words_as_detail(openai_fake: FakeOpenAI) -> None:
    openai_fake.script(RateLimit(retry_after=3), Status(400, "Unsupported parameter 'x'"))
    _, raised = await _drain(_provider(openai_fake))
    assert isinstance(raised, RateLimited) and raised.retry_after == 3.0
    _, raised = await _drain(_provider(openai_fake))
    assert isinstance(raised, InvalidRequest) and raised.failover is False
    assert raised.reason == "request refused (HTTP 400)"
    assert raised.detail == "Unsupported parameter 'x'"  # the message, as the SDK gives it


async def test_no_proxy_from_the_environment(
        openai_fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    # The server is local: a proxy configured for the internet must not carry it.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    chunks, error = await _drain(_provider(openai_fake))
    assert error is None and chunks


def test_a_plain_http_server_gets_no_ca_bundle_and_tls_would_fail_closed() -> None:
    def context(base_url: str) -> ssl.SSLContext:
        provider = PlainOpenAICompatProvider(name="l", model="m", base_url=base_url)
        pool = provider._new_http()._transport._pool  # type: ignore[attr-defined]
        return pool._ssl_context  # type: ignore[no-any-return]

    plain = context("http://127.0.0.1:9/v1")
    assert plain.cert_store_stats()["x509_ca"] == 0  # nothing loaded...
    assert plain.verify_mode == ssl.CERT_REQUIRED and plain.check_hostname  # ...nor trusted
    assert context("https://example.invalid/v1").verify_mode == ssl.CERT_REQUIRED


async def test_a_stream_imports_no_openai_sdk(openai_fake: FakeOpenAI) -> None:
    # A fresh interpreter: this one has the SDK loaded by the other tests.
    script = (
        "import asyncio, sys\n"
        "from engine.providers.openai_plain import PlainOpenAICompatProvider\n"
        "from engine.types import CompletionRequest, Message\n"
        "async def main():\n"
        f"    p = PlainOpenAICompatProvider(name='l', model='m',\n"
        f"                                  base_url={openai_fake.base_url!r})\n"
        "    await p.prepare()\n"
        "    request = CompletionRequest((Message('user', 'hi'),))\n"
        "    text = ''.join([c.text async for c in p.stream(request) if c.text])\n"
        "    await p.aclose()\n"
        "    print(text, sorted(m for m in sys.modules if m.split('.')[0] == 'openai'))\n"
        "asyncio.run(main())\n"
    )
    openai_fake.script(Text(["Hi", "!"]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == ["Hi!", "[]"]
