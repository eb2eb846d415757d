"""``OpenAICompatProvider`` without the ``openai`` SDK: the chat stream on ``httpx2`` alone.

    provider = PlainOpenAICompatProvider(name="local", model="m",
                                         base_url="http://127.0.0.1:PORT/v1")
    await provider.prepare()            # httpx2 and its transport, in a worker thread
    async for chunk in provider.stream(request): ...

For a server of our own on this machine (the local model's llama.cpp
child, ``engine/providers/local/``), where importing the SDK (0.5-1 s of
CPU, holding the GIL) would be most of a demo chat's start-up: ``httpx2``
(the SDK's own transport) takes ~0.15 s, and it parses the server-sent events
itself (``httpx2.EventSource``, derived from httpx-sse).

Everything but the transport is ``OpenAICompatProvider``'s: the request body,
the three time limits, the chunk reading, the mapping of HTTP statuses to our
errors. The transport's failures map like the SDK's do:

    HTTP error status      as the SDK's APIStatusError (the server's error object
                           and message, Retry-After)
    httpx2.TimeoutException          ProviderTimeout "timed out" (mid-answer)
    broken SSE, data not JSON        Unavailable "malformed response stream"
    refused / dropped connection     Unavailable "connection failed" (dropped mid-answer)
    an ``{"error": ...}`` event      Unavailable "stream error" (error event mid-answer)

No speech to text (``transcribe`` refuses), no proxy from the environment
(``trust_env=False``: the server is local; a proxy set for the internet
must not carry it), no CA bundle loaded for a plain-HTTP URL, no retries
(the chain's job).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncGenerator, Awaitable
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidRequest, ProviderError, ProviderTimeout, Unavailable
from engine.providers.openai_compat import (
    EventStream,
    OpenAICompatProvider,
    import_transport,
    retry_after_s,
)

if TYPE_CHECKING:  # imported by prepare() in a worker thread, else at the first request
    import httpx2

log = logging.getLogger(__name__)


class StreamError(Exception):
    """The server sent an error object inside the event stream (llama.cpp does)."""


class PlainOpenAICompatProvider(OpenAICompatProvider):
    """An ``OpenAICompatProvider`` whose transport is ``httpx2``; see the module docstring."""

    _http: httpx2.AsyncClient | None = None  # built by prepare()

    def __repr__(self) -> str:  # no key, ever
        return f"PlainOpenAICompatProvider(name={self.name!r}, model={self.model!r})"

    async def prepare(self) -> None:
        """Import httpx2 and its transport and build the client, in a worker thread,
        once (as the SDK provider's). The openai SDK is never imported."""
        if self._http is None:
            async with self._preparing:
                if self._http is None:
                    self._http = await asyncio.to_thread(self._new_http)

    def _new_http(self) -> httpx2.AsyncClient:
        import httpx2

        import_transport()
        headers = {"Authorization": f"Bearer {self._secret}"} if self._secret else {}
        # Plain HTTP (our server on loopback): no CA bundle to load, 25-50 ms of
        # CPU on the start's critical path. The context still verifies, trusting
        # no CA: TLS, were it ever asked for, would fail closed.
        verify: ssl.SSLContext | bool = (ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                                         if self.base_url.startswith("http://") else True)
        return httpx2.AsyncClient(
            base_url=self.base_url, headers=headers, trust_env=False, verify=verify,
            timeout=httpx2.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0)))

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def transcribe(self, audio: bytes, *, filename: str, mime_type: str) -> str:
        raise InvalidRequest(self.name, "no speech to text on this provider")

    async def _open(self, body: dict[str, Any]) -> EventStream:
        import httpx2

        assert self._http is not None, "prepare() first"  # stream() awaits it
        request = self._http.build_request(
            "POST", "/chat/completions", json=body,
            headers={"Accept": "text/event-stream", "Cache-Control": "no-store"})
        response = await self._http.send(request, stream=True)
        if response.is_error:
            try:
                await response.aread()  # the error object, for _map_error
            finally:
                await response.aclose()
            response.raise_for_status()
        return _Events(response, httpx2.EventSource(response))

    def _map_error(self, exc: Exception, *, started: bool) -> ProviderError:
        import httpx2  # loaded already: the error came from the client

        name = self.name
        if isinstance(exc, httpx2.HTTPStatusError):
            response = exc.response
            try:
                body: object = response.json()
            except ValueError:
                body = None
            # Like the SDK: the error object inside {"error": ...}, and a message
            # carrying the status and the body.
            error = body.get("error", body) if isinstance(body, dict) else body
            message = f"Error code: {response.status_code} - {body or response.text}"
            return self._status_error(response.status_code, error, message,
                                      retry_after_s(response))
        if isinstance(exc, httpx2.TimeoutException):
            return ProviderTimeout(name, "timed out mid-answer" if started else "timed out")
        if isinstance(exc, (json.JSONDecodeError, httpx2.SSEError)):  # SSEError: a TransportError
            return Unavailable(name, "malformed response stream")
        if isinstance(exc, httpx2.TransportError):
            return Unavailable(name, "connection dropped mid-answer" if started
                               else "connection failed")
        if isinstance(exc, StreamError):
            return Unavailable(name, "error event mid-answer" if started else "stream error")
        log.exception("provider %s: unexpected %s", name, type(exc).__name__)
        return Unavailable(name, f"unexpected error ({type(exc).__name__})")


class _Events:
    """The chunk objects of one streamed response (an ``EventStream``): each
    event's data as parsed JSON, up to ``[DONE]``; ``close`` ends the response."""

    def __init__(self, response: httpx2.Response, source: httpx2.EventSource) -> None:
        self._response = response
        self._chunks = _chunks(source)

    def __anext__(self) -> Awaitable[object]:
        return anext(self._chunks)

    async def close(self) -> None:
        await self._chunks.aclose()
        await self._response.aclose()  # not read to its end: the connection is closed


async def _chunks(source: httpx2.EventSource) -> AsyncGenerator[object, None]:
    async for event in source:
        if event.data.startswith("[DONE]"):
            return
        data = event.json()  # JSONDecodeError: a malformed stream
        if isinstance(data, dict) and data.get("error"):
            error = data["error"]
            said = error.get("message") if isinstance(error, dict) else None
            raise StreamError(said if isinstance(said, str) and said
                              else "An error occurred during streaming")
        yield data
