"""A provider's plain configuration, and the capabilities it ends up with.

``ProviderConfig`` holds everything needed to build one provider (the
composition root fills it from ``[providers.NAME]``); ``capabilities(config)``
is the preset's ``Capabilities`` with the config's overrides applied. Both
live here, below the registry and every provider module, so that a provider
(Bedrock's ``build_bedrock``) and the registry that loads it depend on this
module and not on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import SecretStr

from engine.providers.presets import PRESETS
from engine.types import Capabilities


@dataclass(frozen=True)
class ProviderConfig:
    """Everything needed to build one provider; plain values only."""

    name: str
    kind: str
    model: str = ""
    api_key: SecretStr | None = None
    base_url: str | None = None
    timeout_s: float = 30.0
    first_token_timeout_s: float = 15.0
    idle_timeout_s: float = 15.0
    fail_max: int = 3
    reset_timeout_s: float = 30.0
    temperature: float | None = None
    # capability overrides; None = the preset's default
    vision: bool | None = None
    tools: bool | None = None
    context_window: int | None = None
    max_output_tokens: int | None = None
    # USD per million tokens (usage accounting)
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0
    # speech to text through this provider (OpenAI-compatible kinds): the model id
    transcription_model: str | None = None
    # local only
    model_path: Path | None = None
    threads: int = 1
    # bedrock only
    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    # explicit AWS keys (e.g. from .env, which is not the process environment);
    # None = botocore's own chain (environment, profile, SSO, instance role)
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None


def capabilities(config: ProviderConfig) -> Capabilities:
    preset = PRESETS.get(config.kind)
    base = preset.capabilities if preset else Capabilities()
    return replace(
        base,
        vision=base.vision if config.vision is None else config.vision,
        tools=base.tools if config.tools is None else config.tools,
        context_window=config.context_window or base.context_window,
        max_output_tokens=config.max_output_tokens or base.max_output_tokens,
    )
