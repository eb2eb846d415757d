"""Provider construction from plain values: ``ProviderConfig`` -> ``Provider``.

    config = ProviderConfig(name="primary", kind="openai", model="gpt-4o-mini",
                            api_key=SecretStr("sk-..."))
    provider = build_provider(config)     # OpenAICompatProvider | LocalProvider | Bedrock
    if hasattr(provider, "__aenter__"):   # resource owners: the composition root enters them
        ...

``ProviderConfig`` and ``capabilities`` live in ``engine/providers/config.py``
(re-exported here). Kinds: see ``engine.providers.presets.PRESETS`` plus
``bedrock`` (``engine/providers/bedrock.py``, loaded only when used, so
aioboto3 is not imported by users who do not need it).
A bad combination raises ``ConfigError`` naming the provider.

Building a provider imports no SDK: each provider imports its own at its
first request (``openai`` 0.5-1 s, ``aioboto3`` about 1 s, ``httpx2`` for
``local``), so ``boternity providers`` lists them without. ``sdk_module(kind)`` names it, for the
composition root to import beforehand in a worker thread.
"""

from __future__ import annotations

from engine.errors import ConfigError
from engine.ports import Provider
from engine.providers.config import ProviderConfig, capabilities
from engine.providers.openai_compat import OpenAICompatProvider
from engine.providers.presets import PRESETS

# One import for callers.
__all__ = ["ProviderConfig", "build_provider", "capabilities", "sdk_module"]


def sdk_module(kind: str) -> str:
    """The SDK a provider of ``kind`` imports at its first request."""
    if kind == "local":  # llama.cpp's OpenAI API, on httpx2 without the openai SDK
        return "httpx2"
    return "aioboto3" if kind == "bedrock" else "openai"


def build_provider(config: ProviderConfig) -> Provider:
    if config.kind == "local":
        from engine.providers.local import LocalProvider

        timeout_s, first_token_s = _timeouts(config)
        return LocalProvider(
            name=config.name, model_path=config.model_path, model=config.model,
            threads=config.threads, capabilities=capabilities(config),
            timeout_s=timeout_s, first_token_timeout_s=first_token_s,
            idle_timeout_s=config.idle_timeout_s, temperature=config.temperature,
        )
    if config.kind == "bedrock":
        from engine.providers.bedrock import build_bedrock

        return build_bedrock(config)  # capability defaults per Bedrock model family
    preset = PRESETS.get(config.kind)
    if preset is None:
        raise ConfigError(f"providers.{config.name}.kind: unknown kind '{config.kind}'")
    base_url = config.base_url or preset.base_url
    if not base_url:
        raise ConfigError(f"providers.{config.name}.base_url: required for kind '{config.kind}'")
    if not config.model:
        raise ConfigError(f"providers.{config.name}.model: required for kind '{config.kind}'")
    timeout_s, first_token_s = _timeouts(config)
    health_url = None
    if preset.health_path:
        # the proxy serves /health at its root, beside /v1
        root = base_url.rstrip("/").removesuffix("/v1")
        health_url = root + preset.health_path
    label = "experimental: subscription proxy" if preset.experimental else ""
    return OpenAICompatProvider(
        name=config.name, model=config.model, base_url=base_url, api_key=config.api_key,
        capabilities=capabilities(config), timeout_s=timeout_s,
        first_token_timeout_s=first_token_s,
        idle_timeout_s=min(config.idle_timeout_s, timeout_s),
        temperature=config.temperature, max_tokens_field=preset.max_tokens_field,
        health_url=health_url, label=label, transcription_model=config.transcription_model,
    )


def _timeouts(config: ProviderConfig) -> tuple[float, float]:
    """(timeout_s, first_token_timeout_s) within the preset's caps and floors."""
    preset = PRESETS[config.kind]
    timeout_s, first_token_s = config.timeout_s, config.first_token_timeout_s
    if preset.max_timeout_s is not None:  # a less reliable peer: give up on it sooner
        timeout_s = min(timeout_s, preset.max_timeout_s)
    if preset.max_first_token_s is not None:
        first_token_s = min(first_token_s, preset.max_first_token_s)
    if preset.min_timeout_s is not None:  # a slow peer: do not give up too early
        timeout_s = max(timeout_s, preset.min_timeout_s)
    if preset.min_first_token_s is not None:
        first_token_s = max(first_token_s, preset.min_first_token_s)
    return timeout_s, first_token_s
