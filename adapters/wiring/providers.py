"""Provider settings to the registry's plain values (``[providers.NAME]`` -> ``ProviderConfig``),
and the providers ``boternity providers`` shows (``provider_view``).

Part of the composition root: the only place a provider's secrets are read
from ``Settings`` (the environment or ``.env``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from adapters.wiring import scaleout
from adapters.wiring.app import imported
from adapters.wiring.settings import ProviderSettings, Settings
from engine.errors import ConfigError
from engine.ports import Provider
from engine.providers.config import ProviderConfig
from engine.providers.fallback import Breakers
from engine.providers.presets import PRESETS
from engine.providers.registry import build_provider


def provider_config(name: str, p: ProviderSettings, settings: Settings) -> ProviderConfig:
    """Map one ``[providers.NAME]`` table to the registry's plain values.

    A key is required when the kind needs one (or ``api_key_env`` names a
    variable): a missing key is a ``ConfigError`` at start, not a 401 later.
    """
    key_name = f"providers.{name}.api_key_env"
    preset = PRESETS.get(p.kind)
    if p.api_key_env:
        api_key = settings.require_secret(p.api_key_env, key=key_name)
    elif preset is not None and preset.needs_key:
        raise ConfigError(
            f"{settings.source}: {key_name}: required for kind '{p.kind}' "
            f"(name the environment variable that holds the key)"
        )
    else:
        api_key = None
    return ProviderConfig(
        name=name,
        kind=p.kind,
        model=p.model,
        api_key=api_key,
        base_url=p.base_url,
        timeout_s=p.timeout_s,
        first_token_timeout_s=p.first_token_timeout_s,
        idle_timeout_s=p.idle_timeout_s,
        fail_max=p.fail_max or settings.chain.fail_max,
        reset_timeout_s=p.reset_timeout_s or settings.chain.reset_timeout_s,
        temperature=p.temperature,
        vision=p.vision,
        tools=p.tools,
        context_window=p.context_window,
        max_output_tokens=p.max_output_tokens,
        price_input_per_mtok=p.price_input_per_mtok,
        price_output_per_mtok=p.price_output_per_mtok,
        transcription_model=p.transcription_model,
        model_path=p.model_path,
        threads=p.threads,
        region=p.region or (_env_region(settings) if p.kind == "bedrock" else None),
        profile=p.profile,
        endpoint_url=p.endpoint_url,
        **(_aws_keys(settings) if p.kind == "bedrock" and not p.profile else {}),
    )


def _env_region(settings: Settings) -> str | None:
    return settings.env.get("AWS_REGION") or settings.env.get("AWS_DEFAULT_REGION") or None


def _aws_keys(settings: Settings) -> dict[str, Any]:
    """AWS keys from .env or the environment, for a Bedrock provider without a profile.

    botocore reads only the real environment; ``.env`` is Boternity's. With
    no keys in either, botocore's chain (profile, SSO, instance role) applies.
    """
    env = settings.env
    secret = settings.secret("AWS_SECRET_ACCESS_KEY", key="AWS_SECRET_ACCESS_KEY")
    if not env.get("AWS_ACCESS_KEY_ID") or secret is None:
        return {}
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": secret,
        "aws_session_token": settings.secret("AWS_SESSION_TOKEN", key="AWS_SESSION_TOKEN"),
    }


def used_configs(settings: Settings) -> dict[str, ProviderConfig]:
    """``ProviderConfig`` of every provider some bot's chain uses, in config order.

    Every ``[providers.NAME]`` is checked, used or not (a missing key is a
    ``ConfigError`` at start); an unused one is not started (a local model is heavy).
    """
    configs = {n: provider_config(n, p, settings) for n, p in settings.providers.items()}
    used = {name for bot in settings.bots.values() for name in bot.chain}
    return {name: config for name, config in configs.items() if name in used}


def configure_breakers(breakers: Breakers, configs: dict[str, ProviderConfig]) -> None:
    """Each provider's own breaker limits (creating its breaker: pybreaker is imported)."""
    for name, config in configs.items():
        breakers.configure(name, fail_max=config.fail_max, reset_timeout_s=config.reset_timeout_s)


@dataclass
class ProviderView:
    """The providers and breakers ``boternity providers`` shows when no service answers."""

    providers: dict[str, Provider]
    breakers: Breakers
    shared: bool  # the breaker states are the ones every worker shares in Redis


@asynccontextmanager
async def provider_view(settings: Settings) -> AsyncIterator[ProviderView]:
    """The providers some chain uses, built but not started (no SDK imported, no
    database opened), with their breakers: shared through Redis when ``[storage]
    redis_url`` is set (every state loaded before this yields), else this
    process's own, which no call went through yet."""
    configs = used_configs(settings)
    providers = {name: build_provider(config) for name, config in configs.items()}
    chain = settings.chain
    async with AsyncExitStack() as stack:
        if not settings.storage.redis_url:
            # No breaker is created: a new one is closed (Breakers.state), and
            # pybreaker, which imports redis, stays unimported.
            yield ProviderView(providers, Breakers(fail_max=chain.fail_max,
                                                   reset_timeout_s=chain.reset_timeout_s), False)
            return
        shared, breakers = await scaleout.shared_breakers(stack, settings)
        await imported("pybreaker")
        configure_breakers(breakers, configs)
        await shared.flush()  # the loads of every breaker's shared state, awaited
        yield ProviderView(providers, breakers, True)
