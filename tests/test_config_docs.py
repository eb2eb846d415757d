"""The README's Configuration section is a contract: every key is documented.

Walks the settings models behind ``[storage]``, ``[chain]``,
``[providers.NAME]``, ``[bots.NAME]``, ``[log]`` and ``[http]`` and checks
the README or docs/configuration.md names each key, so a new setting cannot ship undocumented.
(Memory and platform keys are documented in their own sections.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from adapters.wiring import settings

ROOT = Path(__file__).resolve().parent.parent
# The README keeps the overview; every key is in the configuration reference.
README = "\n".join((ROOT / name).read_text(encoding="utf-8")
                   for name in ("README.md", "docs/configuration.md", "docs/memory.md"))
MODELS: list[type[BaseModel]] = [
    settings.StorageSettings, settings.ChainSettings, settings.ProviderSettings,
    settings.BotSettings, settings.LogSettings, settings.HttpSettings,
    settings.AdminSettings,
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_key_is_in_the_readme(model: type[BaseModel]) -> None:
    missing = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        documented = f"`{key}`" in README or f"[bots.NAME.{key}]" in README or f".{key}`" in README
        if not documented:
            missing.append(key)
    assert missing == [], f"document these {model.__name__} keys in README.md: {missing}"


def test_the_example_config_loads_and_names_every_provider_kind() -> None:
    example = Path(__file__).resolve().parent.parent / "deploy" / "boternity.example.toml"
    loaded = settings.load_settings(example, environ={}, dotenv=None)
    assert list(loaded.bots) == ["demo"] and loaded.bots["demo"].chain == ["local"]
    text = example.read_text(encoding="utf-8")
    for kind in ("openai", "gemini", "mistral", "glm", "anthropic", "claude_subscription",
                 "openai_compatible", "local", "bedrock"):
        assert kind in text
