"""AWS Bedrock through the Converse API (``converse`` / ``converse_stream``).

Contract: ``BedrockProvider`` satisfies ``engine.ports.Provider``. ``stream``
yields text chunks, then one chunk with the usage Bedrock reported, and
raises only ``engine.errors.ProviderError`` subclasses, mid-stream included.

- Credentials and region come from the standard AWS chain (environment,
  profile, SSO, instance role); ``region``, ``profile`` and ``endpoint_url``
  override it. Explicit keys are only for what botocore cannot see (the
  composition root passes AWS keys found in ``.env``); never in the TOML.
- The SDK never retries (``total_max_attempts=1``): the fallback chain decides
  what happens next, and botocore's default 5 attempts cost ~8 s per failure.
- One aioboto3 client is opened on ``__aenter__`` (or lazily on first use)
  and kept for every request; ``__aexit__`` closes it. aioboto3 (with
  aiohttp) takes about a second to import: it is imported then, in a worker
  thread, so building a provider (``boternity providers``) imports no SDK.
- Timeouts: ``timeout_s`` bounds connect and each socket read (and a whole
  non-streaming call); ``first_token_timeout_s`` bounds the wait for the
  first text; ``idle_timeout_s`` bounds each later gap between events.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any, Self, TypeVar

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    NoCredentialsError,
    NoRegionError,
    ProfileNotFound,
    ReadTimeoutError,
    SSOError,
    TokenRetrievalError,
)
from pydantic import SecretStr

from engine.errors import (
    AuthFailed,
    ConfigError,
    ContextTooLong,
    InvalidRequest,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    Unavailable,
    scrub,
)
from engine.providers.closing import ClosesOnExit
from engine.providers.config import ProviderConfig
from engine.providers.deadline import Deadline
from engine.types import Capabilities, Chunk, CompletionRequest, Message, Usage, output_cap

log = logging.getLogger(__name__)
T = TypeVar("T")

_IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg",
                  "image/gif": "gif", "image/webp": "webp"}

# AWS error code -> (our error class, footer-ready reason)
_ERRORS: dict[str, tuple[type[ProviderError], str]] = {
    "ThrottlingException": (RateLimited, "rate limited"),
    "TooManyRequestsException": (RateLimited, "rate limited"),
    "ServiceQuotaExceededException": (RateLimited, "quota exceeded"),
    "ModelNotReadyException": (Unavailable, "model not ready"),
    "ServiceUnavailableException": (Unavailable, "service unavailable"),
    "InternalServerException": (Unavailable, "internal server error"),
    "ModelErrorException": (Unavailable, "model error"),
    "ModelStreamErrorException": (Unavailable, "model stream error"),
    "ModelTimeoutException": (ProviderTimeout, "model timed out"),
    "AccessDeniedException": (AuthFailed, "access denied"),
    "UnrecognizedClientException": (AuthFailed, "invalid AWS credentials"),
    "ExpiredTokenException": (AuthFailed, "expired AWS credentials"),
    # A wrong model id or region is this provider's problem, not the user's.
    "ResourceNotFoundException": (Unavailable, "model not found"),
    "ValidationException": (InvalidRequest, "invalid request"),
}
# A ValidationException about the model/setup (a model that needs an inference
# profile, images or system prompts it does not take) is no fault of the user.
_SETUP_HINTS = ("on-demand throughput", "inference profile", "doesn't support",
                "does not support", "not supported", "model identifier is invalid")
# Bedrock reports an oversized prompt as a ValidationException; only the
# message tells it apart, and the wording differs per model family.
_TOO_LONG_HINTS = ("too long", "too many tokens", "too many input tokens", "context length",
                   "context window", "maximum context", "context limit", "input tokens exceed",
                   "too large for model")


def map_error(provider: str, exc: BaseException) -> ProviderError:
    """Translate an SDK / transport error into our error tree (never leaks keys)."""
    # aiohttp is aiobotocore's transport (imported with it): a dropped connection
    # surfaces as a raw aiohttp.ClientPayloadError that botocore does not wrap.
    import aiohttp

    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, ClientError):  # EventStreamError (in-stream) is a ClientError too
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        code = code[:1].upper() + code[1:]  # in-stream codes are lowerCamelCase
        message = str(error.get("Message", ""))
        cls, reason = _ERRORS.get(code, (Unavailable, f"AWS error {code or 'unknown'}"))
        if cls is InvalidRequest and any(h in message.lower() for h in _TOO_LONG_HINTS):
            return ContextTooLong(provider, "prompt too long for the model")
        if cls is InvalidRequest and any(h in message.lower() for h in _SETUP_HINTS):
            # This provider's setup is wrong, not the user's request: fail over.
            log.error("bedrock %s: the model rejects this setup (check model id/region/"
                      "capabilities): %s", provider, scrub(message))
            return Unavailable(provider, "model setup rejected (see log)")
        # Bedrock's own words (a validation message may quote ARNs, accounts,
        # keys) are a scrubbed detail for the log and admins, never the reason.
        return cls(provider, reason, detail=message)
    if isinstance(exc, (ReadTimeoutError, ConnectTimeoutError, TimeoutError)):
        return ProviderTimeout(provider, "timed out")
    if isinstance(exc, (NoCredentialsError, ProfileNotFound, TokenRetrievalError, SSOError)):
        return AuthFailed(provider, "no usable AWS credentials")
    if isinstance(exc, NoRegionError):
        return Unavailable(provider, "no AWS region configured")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return Unavailable(provider, "connection dropped mid-stream")
    if isinstance(exc, (BotoCoreError, aiohttp.ClientError, OSError)):
        return Unavailable(provider, "connection failed")
    return Unavailable(provider, f"unexpected {type(exc).__name__}")


def converse_messages(
    messages: tuple[Message, ...], *, vision: bool, json_mode: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Our messages as Converse ``(system, messages)``.

    Converse wants user/assistant turns that alternate and start with the
    user: consecutive turns of one role are merged, leading assistant turns
    (history cut mid-exchange) are dropped. Images become image blocks only
    when the model has vision; otherwise a note keeps the turn honest.
    """
    # Converse rejects blank text blocks ("must contain non-whitespace text").
    system = [{"text": m.content} for m in messages if m.role == "system" and m.content.strip()]
    if json_mode:
        system.append({"text": "Answer with one JSON object and nothing else."})
    turns: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "system" or (not turns and m.role == "assistant"):
            continue
        blocks: list[dict[str, Any]] = []
        for image in m.images:
            fmt = _IMAGE_FORMATS.get(image.mime_type.lower())
            if vision and fmt and image.data:
                blocks.append({"image": {"format": fmt, "source": {"bytes": image.data}}})
            else:
                blocks.append({"text": f"[image {image.name} not shown to this model]"})
        if m.content.strip():
            blocks.append({"text": m.content})
        if not blocks:
            continue
        if turns and turns[-1]["role"] == m.role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": m.role, "content": blocks})
    return system, turns


@dataclass
class BedrockProvider(ClosesOnExit):
    """One Bedrock model (id, inference profile or ARN) behind our Provider port."""

    name: str
    model: str
    capabilities: Capabilities
    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    timeout_s: float = 30.0
    first_token_timeout_s: float = 15.0
    idle_timeout_s: float = 15.0
    temperature: float | None = None
    # Explicit keys (from .env); None = botocore's chain finds them itself.
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: SecretStr | None = field(default=None, repr=False)
    aws_session_token: SecretStr | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._client: Any = None
        self._stack: AsyncExitStack | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        try:
            await self._open()
        except (NoRegionError, ProfileNotFound) as exc:
            # At startup a missing region/profile is a config mistake: say which.
            raise ConfigError(
                f"provider '{self.name}': {exc} (set region/profile in the config "
                "or AWS_REGION / AWS_PROFILE)"
            ) from None
        return self

    async def aclose(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def _open(self) -> Any:
        async with self._lock:
            if self._client is None:
                aioboto3 = await asyncio.to_thread(importlib.import_module, "aioboto3")
                from botocore.config import Config

                session = aioboto3.Session(
                    profile_name=self.profile, region_name=self.region,
                    aws_access_key_id=self.aws_access_key_id,
                    aws_secret_access_key=_reveal(self.aws_secret_access_key),
                    aws_session_token=_reveal(self.aws_session_token),
                )
                config = Config(
                    retries={"total_max_attempts": 1},
                    connect_timeout=self.timeout_s,
                    read_timeout=self.timeout_s,
                    user_agent_extra="boternity",
                )
                stack = AsyncExitStack()
                self._client = await stack.enter_async_context(
                    session.client("bedrock-runtime", endpoint_url=self.endpoint_url,
                                   config=config)
                )
                self._stack = stack
            return self._client

    def _params(self, request: CompletionRequest) -> dict[str, Any]:
        system, messages = converse_messages(
            request.messages, vision=self.capabilities.vision, json_mode=request.json_mode
        )
        if not messages:
            raise InvalidRequest(self.name, "nothing to send: no user message")
        inference: dict[str, Any] = {"maxTokens": output_cap(request, self.capabilities)}
        temperature = request.temperature if request.temperature is not None \
            else self.temperature
        if temperature is not None:
            inference["temperature"] = temperature
        params: dict[str, Any] = {"modelId": self.model, "messages": messages,
                                  "inferenceConfig": inference}
        if system:
            params["system"] = system
        return params

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        params = self._params(request)
        try:
            client = await self._open()
            if not self.capabilities.streaming:
                async for chunk in self._converse(client, params):
                    yield chunk
                return
            async for chunk in self._converse_stream(client, params):
                yield chunk
        except ProviderError:
            raise
        except Exception as exc:  # mapped at the edge, by class (timeouts included)
            error = map_error(self.name, exc)
            log.info("bedrock %s failed: %s (%s)", self.name, error.reason,
                     type(exc).__name__)
            raise error from exc

    async def _converse(self, client: Any, params: dict[str, Any]) -> AsyncIterator[Chunk]:
        reply = await _within(self.timeout_s, client.converse(**params))
        content = reply.get("output", {}).get("message", {}).get("content", [])
        text = "".join(block.get("text", "") for block in content)
        if text:
            yield Chunk(text=text)
        usage = _usage(reply.get("usage"))
        if usage is not None:
            yield Chunk(usage=usage)

    async def _converse_stream(
        self, client: Any, params: dict[str, Any]
    ) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        # Until the first text, the first-token deadline holds; then idle gaps
        # (one timer for the answer, moved per event: no timeout context per chunk).
        timer = Deadline(loop, loop.time() + self.first_token_timeout_s)
        try:
            response = await timer.wait(client.converse_stream(**params))
            events = response["stream"]
            iterator = aiter(events)
            seen_text = finished = False
            try:
                while True:
                    try:
                        event = await timer.wait(anext(iterator))
                    except StopAsyncIteration:
                        finished = True
                        break
                    delta = event.get("contentBlockDelta", {}).get("delta", {})
                    if text := delta.get("text"):
                        seen_text = True
                        yield Chunk(text=text)
                    elif "metadata" in event:
                        usage = _usage(event["metadata"].get("usage"))
                        if usage is not None:
                            yield Chunk(usage=usage)
                    if seen_text:
                        timer.at = loop.time() + self.idle_timeout_s
            finally:
                # Stopped early (error, timeout, consumer gone): drop the connection, it
                # holds an unread body. A finished stream already went back to the pool.
                if not finished:
                    events.close()
        finally:
            timer.cancel()


def _reveal(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret is not None else None


async def _within(seconds: float, awaitable: Awaitable[T]) -> T:
    async with asyncio.timeout(seconds):
        return await awaitable


def _usage(raw: dict[str, Any] | None) -> Usage | None:
    if not raw:
        return None
    prompt, completion = int(raw.get("inputTokens", 0)), int(raw.get("outputTokens", 0))
    if prompt == 0 and completion == 0:
        return None  # nothing reported: let accounting estimate and say so
    return Usage(prompt_tokens=prompt, completion_tokens=completion)



def default_capabilities(model: str) -> Capabilities:
    """Conservative defaults per model family (ids, inference profiles or ARNs).

    Anthropic Claude and Amazon Nova take images and long prompts; for other
    families (Llama, Mistral, ...) configure ``vision`` / ``context_window``.
    """
    family = model.lower().rsplit("/", 1)[-1]
    if "anthropic." in family or "claude" in family:
        return Capabilities(vision=True, tools=True, context_window=200_000,
                            max_output_tokens=8_192)
    if "amazon.nova" in family and "micro" not in family:
        return Capabilities(vision=True, tools=True, context_window=300_000,
                            max_output_tokens=5_000)
    return Capabilities(tools=True, context_window=32_000, max_output_tokens=2_048)


def build_bedrock(config: ProviderConfig) -> BedrockProvider:
    """The registry's ``bedrock`` branch: plain config values -> a provider."""
    if not config.model:
        raise ConfigError(f"providers.{config.name}.model: required for kind 'bedrock' "
                          "(a model id, inference profile id or ARN)")
    overrides: dict[str, Any] = {
        "vision": config.vision, "tools": config.tools,
        "context_window": config.context_window, "max_output_tokens": config.max_output_tokens,
    }
    caps = replace(default_capabilities(config.model),
                   **{k: v for k, v in overrides.items() if v is not None})
    return BedrockProvider(
        name=config.name, model=config.model, capabilities=caps, region=config.region,
        profile=config.profile, endpoint_url=config.endpoint_url or config.base_url,
        timeout_s=config.timeout_s, first_token_timeout_s=config.first_token_timeout_s,
        idle_timeout_s=config.idle_timeout_s, temperature=config.temperature,
        aws_access_key_id=config.aws_access_key_id,
        aws_secret_access_key=config.aws_secret_access_key,
        aws_session_token=config.aws_session_token,
    )
