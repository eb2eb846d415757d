"""The ``local`` kind: the real demo GGUF through the real in-process llama.cpp server.

One short completion only (temperature 0, 16 tokens); assertions are on
structure (text, usage, lifecycle), never on wording.
"""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest

from engine.errors import ConfigError
from engine.providers.fallback import Breakers, FallbackChain
from engine.providers.local import DEMO_LABEL, LocalProvider, demo_model_path
from engine.providers.registry import ProviderConfig, build_provider
from engine.types import CompletionRequest, Message


async def test_demo_model_answers_through_the_chain_and_stops_cleanly() -> None:
    provider = build_provider(ProviderConfig(name="demo", kind="local", temperature=0.0))
    assert isinstance(provider, LocalProvider)
    assert provider.label == DEMO_LABEL and provider.is_demo
    assert provider.base_url is None  # lazy: nothing started yet
    # CPU-bound: reading a long prompt comes before the first token, so the
    # preset raises the configured (default 30 s / 15 s) limits to its floors.
    assert (provider.timeout_s, provider.first_token_timeout_s) == (120.0, 60.0)
    request = CompletionRequest(
        (Message("system", "You are a helpful assistant."),
         Message("user", "Say hello in one short sentence.")),
        max_tokens=16,
    )
    async with provider:
        run = FallbackChain([provider], Breakers()).run(request)
        texts = [chunk.text async for chunk in run if chunk.text]
        base_url = provider.base_url
    assert base_url is not None and base_url.startswith("http://127.0.0.1:")
    assert "".join(texts).strip()
    assert run.served_by == "demo" and run.failures == ()
    assert run.usage.estimated is False  # llama.cpp reports usage
    assert 0 < run.usage.completion_tokens <= 16 and run.usage.prompt_tokens > 0
    with pytest.raises(httpx2.ConnectError):  # the server is gone
        async with httpx2.AsyncClient(timeout=2) as http:
            await http.get(base_url.removesuffix("/v1") + "/health")


def test_demo_model_file_is_found_via_its_package() -> None:
    path = demo_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 1_000_000


def test_bad_model_path_is_a_clear_config_error(tmp_path: Path) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        LocalProvider(name="x", model_path=not_gguf)
    with pytest.raises(ConfigError, match="cannot read"):
        LocalProvider(name="x", model_path=tmp_path / "missing.gguf")
    own = LocalProvider(name="x", model_path=demo_model_path(), model="mine")
    assert own.label != DEMO_LABEL and own.model == "mine"  # any GGUF path, no demo label
