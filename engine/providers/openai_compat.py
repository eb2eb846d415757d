"""One provider for every OpenAI-compatible API, on the real ``openai`` SDK.

    provider = OpenAICompatProvider(
        name="primary", model="gpt-4o-mini", base_url="https://api.openai.com/v1",
        api_key=SecretStr("sk-..."), capabilities=Capabilities(...),
        timeout_s=30, first_token_timeout_s=15, idle_timeout_s=15,
    )
    async with provider:                      # closes the HTTP client on exit
        async for chunk in provider.stream(request):   # Chunk(text) ..., Chunk(usage)
            ...

Contract (``engine.ports.Provider``): ``stream`` yields text chunks, then one
usage chunk when the server reports usage. It raises only ``ProviderError``
subclasses, possibly after chunks were yielded:

    RateLimited      429 (``retry_after`` from the Retry-After header)
    AuthFailed       401 / 403 (the key is never part of any message)
    ContextTooLong   400 whose code/message says the context is too long, 413
    InvalidRequest   any other 400 / 422: the request is wrong, not the provider
    Unavailable      5xx, 404 (wrong model or URL), refused or dropped connection,
                     malformed SSE, an error event inside the stream
    ProviderTimeout  no first text within ``first_token_timeout_s``, a gap over
                     ``idle_timeout_s``, the whole answer over ``timeout_s``

The SDK never retries (``max_retries=0``): the fallback chain owns retrying.
Its HTTP transport is aiohttp (the SDK's ``DefaultAioHttpClient``): aiohttp
parses HTTP in C where httpx2's own transport runs h11 in Python, which cost
about a quarter of a reply's CPU on the event loop (docs/benchmarks.md).
``timeout_s`` is the overall limit: it bounds connecting, every read, and the
whole answer from this provider (wall clock from the request). An answer cut
by it is not lost: the chain continues it on the next provider. Raise it for
models that write long answers slowly. All three limits wrap each ``anext``
of the stream only, never the consumer's work between chunks (a timeout
around a ``yield`` would cancel the consumer).

Importing ``openai`` takes 0.5-1 s, so constructing a provider imports
nothing: ``boternity providers`` lists it without the SDK. ``prepare()``
imports what the first request needs in a worker thread and builds the
client (the composition root awaits it before a service serves, and a chat
while it waits for the first line); without it, the first request does, the
same way, before its clocks start. Concurrent first requests share one build.

The transport is ``_open`` (the answer's chunk objects) and ``_map_error``:
``engine/providers/openai_plain.py`` replaces both to talk to our own
llama.cpp server on httpx2 without the SDK; ``_status_error`` maps an HTTP
error status for either.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import SecretStr

from engine.errors import (
    SCRUBBED,
    AuthFailed,
    ContextTooLong,
    InvalidRequest,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    Unavailable,
    scrub,
)
from engine.providers.closing import ClosesOnExit
from engine.providers.deadline import Deadline
from engine.types import Capabilities, Chunk, CompletionRequest, Message, Usage, output_cap

if TYPE_CHECKING:  # imported when the client is built (see the module docstring)
    import httpx2
    from openai import AsyncOpenAI

log = logging.getLogger(__name__)

# The SDK insists on a key; servers that need none (Ollama, llama.cpp) ignore it.
# Never pass None: the SDK would read OPENAI_API_KEY from the environment and
# send a real OpenAI key to some other host.
NO_KEY = "no-key-needed"
HEALTH_TTL_S = 30.0
_CONTEXT_HINTS = ("context_length", "context length", "maximum context", "too many tokens",
                  "prompt is too long", "tokens exceed")


class EventStream(Protocol):
    """An answer's chunk objects as they arrive (``anext``), and its ``close``."""

    def __anext__(self) -> Awaitable[object]: ...

    async def close(self) -> None: ...


class OpenAICompatProvider(ClosesOnExit):
    """A ``Provider`` over ``AsyncOpenAI``; see the module docstring."""

    def __init__(
        self,
        *,
        name: str,
        model: str,
        base_url: str,
        api_key: SecretStr | None = None,
        capabilities: Capabilities | None = None,
        timeout_s: float = 30.0,
        first_token_timeout_s: float = 15.0,
        idle_timeout_s: float = 15.0,
        temperature: float | None = None,
        max_tokens_field: str = "max_tokens",
        health_url: str | None = None,
        label: str = "",
        transcription_model: str | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.capabilities = capabilities or Capabilities()
        self.base_url = base_url
        self.label = label  # shown by `boternity providers`, e.g. "demo model: ..."
        self.first_token_timeout_s = first_token_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.timeout_s = timeout_s
        self.temperature = temperature
        self._max_tokens_field = max_tokens_field
        # Set: this provider also offers speech to text (``transcribe``).
        self.transcription_model = transcription_model
        self._health_url = health_url
        self._healthy_until = 0.0
        self._secret = api_key.get_secret_value() if api_key else ""
        self._sdk: AsyncOpenAI | None = None  # built by prepare()
        self._preparing = asyncio.Lock()  # one build, however many first requests

    def __repr__(self) -> str:  # no key, ever
        return f"OpenAICompatProvider(name={self.name!r}, model={self.model!r})"

    async def prepare(self) -> None:
        """Import what the first request needs and build the client, in a worker
        thread, once; every request awaits it first, so none imports on the loop."""
        if self._sdk is None:
            async with self._preparing:
                if self._sdk is None:
                    self._sdk = await asyncio.to_thread(self._new_client)

    @property
    def _client(self) -> AsyncOpenAI:
        """The SDK client that ``prepare`` built."""
        assert self._sdk is not None, "prepare() first"
        return self._sdk

    def _new_client(self) -> AsyncOpenAI:
        # Building it takes ~20 ms of CPU (its TLS context), importing the SDK 0.5-1 s.
        import httpx2  # the SDK's transport
        from openai import AsyncOpenAI, DefaultAioHttpClient

        import_transport()
        timeout = httpx2.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0))
        return AsyncOpenAI(
            base_url=self.base_url,
            api_key=self._secret or NO_KEY,
            max_retries=0,
            timeout=timeout,
            http_client=DefaultAioHttpClient(timeout=timeout),
        )

    async def aclose(self) -> None:
        if self._sdk is not None:
            await self._sdk.close()

    async def _open(self, body: dict[str, Any]) -> EventStream:
        """The answer's stream of chunk objects (parsed JSON) for ``body``.

        The SDK's public low-level ``post``, both ways plain JSON: ``_body``
        already builds it, where ``chat.completions.create`` would re-walk every
        message against its TypedDicts (~7 ms of CPU on the loop for 30
        messages); and ``AsyncStream[object]`` yields each chunk as the parsed
        JSON object instead of building pydantic models (~two thirds of the
        SDK's per-chunk cost). SSE parsing, error events, HTTP errors stay the SDK's.
        """
        from openai import AsyncStream

        stream: EventStream = await self._client.post(
            "/chat/completions", body=body, cast_to=object,
            options={"security": {"bearer_auth": True}},
            stream=True, stream_cls=AsyncStream[object])
        return stream

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        # Before the clocks start: without ``prepare`` a first request builds the
        # client here (0.5-2 s), off the loop, not charged to the first token.
        await self.prepare()
        if self._health_url:
            await self._check_health()
        loop = asyncio.get_running_loop()
        overall = loop.time() + self.timeout_s
        deadline = loop.time() + self.first_token_timeout_s
        timer = Deadline(loop, min(deadline, overall))
        got_text = False
        events: EventStream | None = None
        try:
            events = await timer.wait(self._open(self._body(request)))
            while True:
                try:
                    event = await timer.wait(anext(events))
                except StopAsyncIteration:
                    break
                text, usage = _read_chunk(self.name, event)
                if usage is not None:
                    yield Chunk(usage=usage)
                if text:
                    got_text = True
                    yield Chunk(text=text)
                # Before the first text, role/empty chunks do not restart the clock.
                if got_text:
                    deadline = loop.time() + self.idle_timeout_s
                    timer.at = min(deadline, overall)
        except TimeoutError as exc:
            if overall <= deadline:
                reason = "timed out mid-answer" if got_text else "timed out"
            else:
                reason = ("stalled mid-answer (idle timeout)" if got_text
                          else "timed out before first token")
            raise ProviderTimeout(self.name, reason) from exc
        except ProviderError:
            raise
        except Exception as exc:
            raise self._map_error(exc, started=got_text) from exc
        finally:
            timer.cancel()
            if events is not None:
                await events.close()

    async def transcribe(self, audio: bytes, *, filename: str, mime_type: str) -> str:
        """The words in ``audio`` (``POST /audio/transcriptions``); ProviderError on failure."""
        if not self.transcription_model:
            raise InvalidRequest(self.name, "no transcription_model configured")
        await self.prepare()
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await self._client.audio.transcriptions.create(
                    model=self.transcription_model, file=(filename, audio, mime_type))
        except TimeoutError as exc:
            raise ProviderTimeout(self.name, "transcription timed out") from exc
        except Exception as exc:
            raise self._map_error(exc, started=False) from exc
        return str(getattr(result, "text", "") or "").strip()

    def _body(self, request: CompletionRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [self._message(m) for m in request.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        temperature = request.temperature if request.temperature is not None else self.temperature
        if temperature is not None:
            body["temperature"] = temperature
        # Always capped: a server left to its own limit lets a looping model
        # write until the timeout (a small local model does).
        body[self._max_tokens_field] = output_cap(request, self.capabilities)
        if request.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    def _message(self, message: Message) -> dict[str, Any]:
        images = [i for i in message.images if i.data]
        if not images:
            return {"role": message.role, "content": message.content}
        if not self.capabilities.vision:
            names = ", ".join(i.name for i in images)
            note = f"\n[image not shown: this model cannot see images ({names})]"
            return {"role": message.role, "content": message.content + note}
        parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}]
        for image in images:
            assert image.data is not None
            data = base64.b64encode(image.data).decode()
            parts.append({"type": "image_url",
                          "image_url": {"url": f"data:{image.mime_type};base64,{data}"}})
        return {"role": message.role, "content": parts}

    async def _check_health(self) -> None:
        """Ask the proxy's health endpoint first; a success is trusted for a while."""
        if time.monotonic() < self._healthy_until:
            return
        assert self._health_url is not None
        import httpx2  # the SDK's transport: imported with it

        try:
            async with httpx2.AsyncClient(timeout=min(self.first_token_timeout_s, 3.0)) as http:
                response = await http.get(self._health_url)
        except Exception as exc:
            raise Unavailable(self.name, "proxy not reachable (health check)") from exc
        if response.status_code != 200:
            raise Unavailable(self.name, f"proxy unhealthy (health check: {response.status_code})")
        self._healthy_until = time.monotonic() + HEALTH_TTL_S

    def _map_error(self, exc: Exception, *, started: bool) -> ProviderError:
        import openai  # loaded already: the error came from the client

        name = self.name
        dropped = _aiohttp_failure(exc)  # before the SDK's classes: see there
        if dropped:
            return Unavailable(name, "connection dropped mid-answer" if started
                               else "connection failed")
        if isinstance(exc, openai.APITimeoutError) or dropped is False:
            return ProviderTimeout(name, "timed out mid-answer" if started else "timed out")
        if isinstance(exc, openai.APIStatusError):
            return self._status_error(exc.status_code, exc.body, exc.message,
                                      retry_after_s(exc.response))
        if isinstance(exc, openai.APIConnectionError):
            return Unavailable(name, "connection dropped mid-answer" if started
                               else "connection failed")
        if isinstance(exc, (json.JSONDecodeError, openai.APIResponseValidationError)):
            return Unavailable(name, "malformed response stream")
        if isinstance(exc, openai.APIError):  # an error event inside the stream
            return Unavailable(name, "error event mid-answer" if started else "stream error")
        log.exception("provider %s: unexpected %s", name, type(exc).__name__)
        return Unavailable(name, f"unexpected error ({type(exc).__name__})")

    def _status_error(self, status: int, body: object, message: str,
                      retry_after: float | None) -> ProviderError:
        """Our error for an HTTP error status; ``body`` is the error object the
        server sent (the SDK's ``APIStatusError.body``), ``message`` its text."""
        name = self.name
        if status == 429:
            return RateLimited(name, retry_after=retry_after)
        if status in (401, 403):
            return AuthFailed(name, "authentication failed")
        if status == 413 or (status == 400 and _looks_like_context(body, message)):
            return ContextTooLong(name, "request too long for this model")
        if status in (400, 422):
            # The server's words (a 400 body may quote keys, accounts, hosts) go
            # to the log and admins as ``detail``; users get our own phrase.
            return InvalidRequest(name, f"request refused (HTTP {status})",
                                  detail=self._safe(body, message))
        if status == 404:
            return Unavailable(name, "model or endpoint not found (404)")
        if status == 408:
            return ProviderTimeout(name, "server timed out (408)")
        if status >= 500:
            return Unavailable(name, f"server error {status}")
        return Unavailable(name, f"unexpected HTTP status {status}")

    def _safe(self, body: object, message: str) -> str:
        """The server's message with our key and anything key-like removed (``scrub``)."""
        said = body.get("message") if isinstance(body, dict) else None
        text = str(said or message)
        if self._secret:
            text = text.replace(self._secret, SCRUBBED)
        return scrub(text)


def _read_chunk(name: str, event: Any) -> tuple[str | None, Usage | None]:
    """The text and the usage in one ``chat.completion.chunk`` (the JSON object sent).

    OpenAI sends ``"usage": null`` on every chunk but the last when usage is
    asked for; a chunk of any other shape is a malformed stream (``Unavailable``).
    """
    try:
        choices = event.get("choices")
        text = (choices[0].get("delta") or {}).get("content") if choices else None
        raw = event.get("usage")
        usage = (Usage(int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0))
                 if raw is not None else None)
    except (AttributeError, TypeError, ValueError, IndexError, KeyError) as exc:
        raise Unavailable(name, "malformed response stream") from exc
    if text is not None and not isinstance(text, str):
        raise Unavailable(name, "malformed response stream")
    return text, usage


# Beyond ``import openai``, the SDK imports these by the end of the first
# request (httpx2's HTTP transport, which the local model's client uses and
# proxies may): ~40 ms on a quiet machine, measured, that ``prepare`` moves off
# the event loop (``openai_plain`` too). Optional: a later SDK may lay them out
# differently. The aiohttp transport is imported as the client is built.
_FIRST_REQUEST_MODULES = ("httpcore2", "h11", "anyio._backends._asyncio")


def import_transport() -> None:
    """Import ``_FIRST_REQUEST_MODULES`` (those present): for ``prepare``'s worker thread."""
    for module in _FIRST_REQUEST_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)


def _aiohttp_failure(exc: BaseException) -> bool | None:
    """True: the aiohttp transport's connection failed or dropped; False: it
    timed out; None: not its error. That transport maps every aiohttp
    connection error, a refusal or a hang-up too, to httpx2's ConnectTimeout
    (the SDK's APITimeoutError), so the original is read on ``__cause__``."""
    import sys

    aiohttp = sys.modules.get("aiohttp")
    seen: BaseException | None = exc
    while aiohttp is not None and seen is not None:
        if isinstance(seen, aiohttp.ClientError):
            return not isinstance(seen, aiohttp.ServerTimeoutError)
        seen = seen.__cause__
    return None


def retry_after_s(response: httpx2.Response) -> float | None:
    """The seconds a 429's Retry-After header asks for; None when absent or a date."""
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: rare for APIs; treat as unknown
        return None


def _looks_like_context(body: object, message: str) -> bool:
    fields = body if isinstance(body, dict) else {}
    text = f"{fields.get('code', '')} {fields.get('message', '')} {message}".lower()
    return any(hint in text for hint in _CONTEXT_HINTS)
