"""Named presets for OpenAI-compatible providers: where each kind lives and what it can do.

``PRESETS[kind]`` gives the default ``base_url`` and ``Capabilities`` for a
provider kind; a config may override any of them (``ProviderConfig``).
Windows and output limits are conservative defaults for the kind's current
flagship models; a model with other limits is configured with
``context_window`` / ``max_output_tokens``.

``claude_subscription`` is experimental and opt-in: it talks to a local proxy
that forwards requests through a personal Claude subscription (a possible
breach of that subscription's terms of service, and less reliable than an
API). Its preset therefore caps the timeouts (``max_timeout_s``,
``max_first_token_s``) and requires a healthy ``/health`` before use.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.types import Capabilities

Kind = str  # one of PRESETS' keys, "local" or "bedrock" (validated by the settings model)


@dataclass(frozen=True)
class Preset:
    base_url: str | None
    capabilities: Capabilities
    # Which request field carries the output limit: OpenAI's newer models reject
    # "max_tokens"; most compatible servers only know "max_tokens".
    max_tokens_field: str = "max_tokens"
    health_path: str | None = None  # checked (and cached briefly) before use
    max_timeout_s: float | None = None  # caps the configured timeouts (less reliable peers)
    max_first_token_s: float | None = None
    min_timeout_s: float | None = None  # floors for slow peers (a CPU-bound local model)
    min_first_token_s: float | None = None
    experimental: bool = False
    needs_key: bool = True


PRESETS: dict[Kind, Preset] = {
    "openai": Preset(
        "https://api.openai.com/v1",
        Capabilities(vision=True, tools=True, context_window=128_000, max_output_tokens=16_384),
        max_tokens_field="max_completion_tokens",
    ),
    "gemini": Preset(
        "https://generativelanguage.googleapis.com/v1beta/openai/",
        Capabilities(vision=True, tools=True, context_window=1_048_576, max_output_tokens=8_192),
    ),
    "mistral": Preset(
        "https://api.mistral.ai/v1",
        Capabilities(vision=False, tools=True, context_window=128_000, max_output_tokens=8_192),
    ),
    # z.ai's OpenAI-compatible endpoint, GLM 4.7
    "glm": Preset(
        "https://api.z.ai/api/paas/v4/",
        Capabilities(vision=False, tools=True, context_window=200_000, max_output_tokens=32_768),
    ),
    # Anthropic's OpenAI SDK compatibility endpoint
    "anthropic": Preset(
        "https://api.anthropic.com/v1/",
        Capabilities(vision=True, tools=True, context_window=200_000, max_output_tokens=8_192),
    ),
    "claude_subscription": Preset(
        "http://localhost:3456/v1",
        Capabilities(vision=False, tools=False, context_window=200_000, max_output_tokens=8_192),
        health_path="/health",
        max_timeout_s=20.0,
        max_first_token_s=8.0,
        experimental=True,
        needs_key=False,
    ),
    # Ollama, vLLM, OpenRouter, LM Studio, ...: base_url is required, limits unknown
    "openai_compatible": Preset(None, Capabilities(), needs_key=False),
    # the llama.cpp server in a child process (engine/providers/local/); base_url is set at start
    "local": Preset(
        None,
        Capabilities(vision=False, tools=False, context_window=4_096, max_output_tokens=512),
        needs_key=False,
        # On CPU the first token waits until the whole prompt is read (~150
        # tokens/s per thread): a full 4k window needs ~30 s before any text.
        min_timeout_s=120.0,
        min_first_token_s=60.0,
    ),
}
