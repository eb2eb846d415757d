"""A fake OpenAI-compatible server: the network peer of the real ``openai`` SDK.

An in-process aiohttp app on 127.0.0.1, port 0. It serves
``POST /v1/chat/completions`` (streaming SSE and plain JSON), ``GET /health``
(for the Claude-subscription proxy preset) and ``POST /v1/audio/transcriptions``
(speech to text: multipart upload in, ``{"text": fake.transcription}`` out, or
``fake.transcription_error`` when set; each upload is kept in
``fake.transcriptions``). What each completion request gets is scripted:

    async with start_openai_fake() as fake:           # or the `openai_fake` fixture
        fake.script(RateLimit(retry_after=2), Text(["Hi", " there"]))
        client = AsyncOpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0)
        ...
        fake.count                      # requests served so far
        fake.requests[0].body           # the JSON body; .headers, .model too

Behaviours are consumed one per request, in order; ``model=`` scopes a script
to requests naming that model (so one server can play several providers).
When a queue is empty the ``default`` behaviour answers (a short text).

Behaviours (all frozen dataclasses, see below): ``Text`` (chunks, usage),
``Status`` (any error status; ``RateLimit`` adds retry-after), ``Hang`` (before
the headers, before the first chunk, or after N chunks), ``Drop`` (close the
TCP connection after N chunks), ``Malformed`` (a broken SSE event after N chunks).
Hanging handlers are released when the server stops, so teardown never waits.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.fakes.serve import serve


@dataclass(frozen=True)
class Text:
    """A normal answer. ``usage`` = (prompt, completion); None = a made-up count."""

    chunks: Sequence[str] = ("Hello", " from", " the fake.")
    usage: tuple[int, int] | None = None
    finish_reason: str = "stop"
    report_usage: bool = True  # False: like servers that ignore stream_options
    gap_s: float = 0.0  # streaming only: pause between chunks (a model typing)


@dataclass(frozen=True)
class Status:
    """An HTTP error with an OpenAI-style error body."""

    status: int = 500
    message: str = "fake server error"
    headers: tuple[tuple[str, str], ...] = ()


def RateLimit(retry_after: float | None = 1.0, message: str = "Rate limit reached") -> Status:
    headers = (("retry-after", str(retry_after)),) if retry_after is not None else ()
    return Status(429, message, headers)


@dataclass(frozen=True)
class Hang:
    """Stall until the server stops: before headers (``headers=False``), or
    after sending headers and ``after`` chunks."""

    after: int = 0
    headers: bool = True
    chunks: Sequence[str] = ("partial", " answer", " more")


@dataclass(frozen=True)
class Drop:
    """Send headers and ``after`` chunks of ``chunks``, then close the TCP connection."""

    after: int = 1
    chunks: Sequence[str] = ("The answer", " is", " forty-two.")


@dataclass(frozen=True)
class Malformed:
    """Send ``after`` chunks, then an SSE event whose data is not JSON."""

    after: int = 1
    chunks: Sequence[str] = ("The answer", " is")
    payload: str = "data: {this is not json\n\n"


Behaviour = Text | Status | Hang | Drop | Malformed


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))


@dataclass(frozen=True)
class RecordedAudio:
    """One upload to ``/audio/transcriptions``."""

    model: str
    filename: str
    content_type: str
    data: bytes


@dataclass
class FakeOpenAI:
    """State of one running fake; see the module docstring."""

    default: Behaviour = field(default_factory=Text)
    healthy: bool = True
    requests: list[RecordedRequest] = field(default_factory=list)
    transcription: str = "What is the capital of France?"
    transcription_error: Status | None = None
    transcriptions: list[RecordedAudio] = field(default_factory=list)
    port: int = 0
    _queues: dict[str | None, deque[Behaviour]] = field(
        default_factory=lambda: defaultdict(deque)
    )
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def count(self) -> int:
        return len(self.requests)

    def count_for(self, model: str) -> int:
        return sum(1 for r in self.requests if r.model == model)

    def script(self, *behaviours: Behaviour, model: str | None = None) -> None:
        """Queue behaviours for the next requests (for ``model`` only, if given)."""
        self._queues[model].extend(behaviours)

    async def wait_for_requests(self, n: int) -> None:
        """Wait until at least ``n`` requests arrived (use under a timeout)."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= n)

    def _next(self, model: str) -> Behaviour:
        for key in (model, None):
            if self._queues[key]:
                return self._queues[key].popleft()
        return self.default

    # --- handlers ---

    async def health(self, request: web.Request) -> web.Response:
        if self.healthy:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "down"}, status=503)

    async def transcribe(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form["file"]
        assert isinstance(upload, web.FileField)
        self.transcriptions.append(RecordedAudio(
            str(form.get("model", "")), upload.filename, upload.content_type,
            upload.file.read()))
        if self.transcription_error is not None:
            return _error(self.transcription_error)
        return web.json_response({"text": self.transcription})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(RecordedRequest(request.path, dict(request.headers), body))
        async with self._arrived:
            self._arrived.notify_all()
        behaviour = self._next(str(body.get("model", "")))
        if isinstance(behaviour, Status):
            return _error(behaviour)
        if isinstance(behaviour, Hang) and not behaviour.headers:
            await self._release.wait()
            return _error(Status(503, "fake released a hung request"))
        if not body.get("stream"):
            return await self._plain(request, body, behaviour)
        return await self._stream(request, body, behaviour)

    async def _plain(
        self, request: web.Request, body: dict[str, Any], behaviour: Behaviour
    ) -> web.StreamResponse:
        if isinstance(behaviour, Text):
            text = "".join(behaviour.chunks)
            prompt, completion = _usage(body, behaviour)
            return web.json_response({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", ""),
                "choices": [{"index": 0, "finish_reason": behaviour.finish_reason,
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion},
            })
        if isinstance(behaviour, Hang):
            await self._release.wait()
            return _error(Status(503, "fake released a hung request"))
        if isinstance(behaviour, Drop):
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        return web.Response(text="{not json", content_type="application/json")

    async def _stream(
        self, request: web.Request, body: dict[str, Any], behaviour: Behaviour
    ) -> web.StreamResponse:
        model = str(body.get("model", ""))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunks = list(getattr(behaviour, "chunks", ()))
        limit = len(chunks) if isinstance(behaviour, Text) else behaviour.after  # type: ignore[union-attr]
        for i, text in enumerate(chunks[:limit]):
            delta: dict[str, Any] = {"content": text}
            if i == 0:
                delta["role"] = "assistant"
            elif isinstance(behaviour, Text) and behaviour.gap_s:
                await asyncio.sleep(behaviour.gap_s)
            await resp.write(_sse(_chunk(model, delta, None)))
        if isinstance(behaviour, Hang):
            await self._release.wait()
            return resp
        if isinstance(behaviour, Drop):
            assert request.transport is not None
            request.transport.close()
            return resp
        if isinstance(behaviour, Malformed):
            await resp.write(behaviour.payload.encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp
        assert isinstance(behaviour, Text)
        await resp.write(_sse(_chunk(model, {}, behaviour.finish_reason)))
        if behaviour.report_usage and (body.get("stream_options") or {}).get("include_usage"):
            prompt, completion = _usage(body, behaviour)
            usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                     "total_tokens": prompt + completion}
            await resp.write(_sse({**_chunk(model, {}, None), "choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _chunk(model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def _usage(body: dict[str, Any], behaviour: Text) -> tuple[int, int]:
    if behaviour.usage is not None:
        return behaviour.usage
    chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
    return max(1, chars // 4), len(behaviour.chunks)


def _error(status: Status) -> web.Response:
    kind = {400: "invalid_request_error", 401: "authentication_error",
            429: "rate_limit_exceeded"}.get(status.status, "server_error")
    return web.json_response(
        {"error": {"message": status.message, "type": kind, "code": kind}},
        status=status.status, headers=dict(status.headers),
    )


@asynccontextmanager
async def start_openai_fake(default: Behaviour | None = None) -> AsyncIterator[FakeOpenAI]:
    """Run a fake on 127.0.0.1 (free port) for the duration of the block."""
    fake = FakeOpenAI() if default is None else FakeOpenAI(default=default)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.completions)
    app.router.add_get("/health", fake.health)
    app.router.add_post("/v1/audio/transcriptions", fake.transcribe)
    runner, fake.port = await serve(app, shutdown_timeout=1.0)
    try:
        yield fake
    finally:
        fake._release.set()  # wake hanging handlers so cleanup is quick
        with suppress(Exception):
            await runner.cleanup()


def spawn_openai_fake(chunks: tuple[str, ...], usage: tuple[int, int]
                      ) -> tuple[subprocess.Popen[str], str]:
    """The fake in a process of its own, answering every request with ``Text(chunks,
    usage)``: (the process, its base URL). For benchmarks, whose client must not share
    a CPU-bound loop with its server; kill the process when done."""
    root = str(Path(__file__).resolve().parent.parent.parent)
    code = (
        "import asyncio, sys\n"
        f"sys.path.insert(0, {root!r})\n"
        "from tests.fakes.openai_server import start_openai_fake, Text\n"
        "async def main():\n"
        f"    async with start_openai_fake(Text(chunks={chunks!r}, usage={usage!r})) as fake:\n"
        "        print(fake.base_url, flush=True)\n"
        "        await asyncio.Event().wait()\n"
        "asyncio.run(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()
