"""A fake AWS Bedrock runtime on 127.0.0.1 for the real aioboto3 client.

moto implements neither Converse nor ConverseStream, so this small aiohttp app
speaks the two routes the provider uses:

- ``POST /model/{modelId}/converse``: JSON, like Bedrock's non-streaming reply.
- ``POST /model/{modelId}/converse-stream``: ``application/vnd.amazon.eventstream``
  frames: messageStart, contentBlockDelta x N, contentBlockStop, messageStop,
  metadata (usage).

botocore ships only the event-stream *decoder* (``botocore.eventstream``), no
encoder, so ``encode_frame`` writes the framing (documented in TESTING.md);
the tests check it round-trips through botocore's own decoder.

Each request pops the next scripted ``Behaviour`` (else ``default``) and is
recorded in ``requests`` (model id, operation, JSON body, headers). Errors
come back the way Bedrock sends them: an HTTP status with
``x-amzn-ErrorType`` before the stream, or an exception frame
(``:message-type=exception``) inside it. ``drop`` closes the TCP connection
mid-stream; ``hang`` waits (until ``release()`` or shutdown) before the first
or after the N-th delta.
"""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote

from aiohttp import web

from tests.fakes.serve import serve

# Bedrock's HTTP status for each error it names in ``x-amzn-ErrorType``.
ERROR_STATUS = {
    "ThrottlingException": 429,
    "ServiceUnavailableException": 503,
    "ModelTimeoutException": 408,
    "ValidationException": 400,
    "AccessDeniedException": 403,
    "InternalServerException": 500,
    "ModelNotReadyException": 429,
    "ResourceNotFoundException": 404,
    "ModelStreamErrorException": 424,
}

Mode = Literal["text", "error", "stream_error", "drop", "hang"]


@dataclass
class Behaviour:
    """What the fake does for one request.

    ``mode``: ``text`` answers normally; ``error`` fails before the stream with
    ``error`` (an AWS error code) and ``message``; ``stream_error`` sends
    ``after`` deltas then an exception frame; ``drop`` sends ``after`` deltas
    then closes the connection; ``hang`` sends ``after`` deltas then waits.
    ``usage=False`` leaves the metadata event (token counts) out.
    """

    mode: Mode = "text"
    chunks: tuple[str, ...] = ("Hello", " from", " Bedrock")
    input_tokens: int = 11
    output_tokens: int = 3
    usage: bool = True
    error: str = "ThrottlingException"
    message: str = "Too many requests, please wait before trying again."
    after: int = 0


@dataclass
class Recorded:
    model: str
    op: str
    body: dict[str, Any]
    headers: dict[str, str]
    peer: int = 0  # the client's port: equal ports = one pooled connection


def _header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode(), value.encode()
    # type 7 = string; name length u8, value length u16, big endian
    return (
        struct.pack("!B", len(raw_name)) + raw_name
        + struct.pack("!BH", 7, len(raw_value)) + raw_value
    )


def encode_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude, prelude CRC, headers, payload, CRC."""
    raw_headers = b"".join(_header(k, v) for k, v in headers.items())
    total = 12 + len(raw_headers) + len(payload) + 4
    prelude = struct.pack("!II", total, len(raw_headers))
    prelude += struct.pack("!I", zlib.crc32(prelude))
    body = prelude + raw_headers + payload
    return body + struct.pack("!I", zlib.crc32(body))


def event_frame(event_type: str, payload: dict[str, Any]) -> bytes:
    return encode_frame(
        {":event-type": event_type, ":content-type": "application/json",
         ":message-type": "event"},
        json.dumps(payload).encode(),
    )


def exception_frame(error: str, message: str) -> bytes:
    # In the stream Bedrock names exceptions in lowerCamelCase (throttlingException).
    return encode_frame(
        {":exception-type": error[:1].lower() + error[1:], ":content-type": "application/json",
         ":message-type": "exception"},
        json.dumps({"message": message}).encode(),
    )


@dataclass
class FakeBedrock:
    """The fake peer. Use ``async with FakeBedrock() as fake`` or the fixture."""

    script: deque[Behaviour] = field(default_factory=deque)
    default: Behaviour = field(default_factory=Behaviour)  # when the script is empty
    requests: list[Recorded] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, in order."""
        self.script.extend(behaviours)

    def release(self) -> None:
        """Wake every hanging request (they then finish normally)."""
        self._release.set()

    @property
    def count(self) -> int:
        return len(self.requests)

    async def __aenter__(self) -> FakeBedrock:
        app = web.Application()
        app.router.add_post("/model/{model:.+}/converse-stream", self._stream)
        app.router.add_post("/model/{model:.+}/converse", self._converse)
        self._runner, port = await serve(app, shutdown_timeout=0.1)
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _record(self, request: web.Request, op: str) -> Behaviour:
        body = await request.json()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append(Recorded(unquote(request.match_info["model"]), op, body,
                                      dict(request.headers), peer[1] if peer else 0))
        return self.script.popleft() if self.script else self.default

    @staticmethod
    def _error_response(b: Behaviour) -> web.Response:
        return web.json_response(
            {"message": b.message},
            status=ERROR_STATUS.get(b.error, 400),
            headers={"x-amzn-ErrorType": f"{b.error}:http://internal.amazon.com/coral/"},
        )

    async def _converse(self, request: web.Request) -> web.StreamResponse:
        b = await self._record(request, "converse")
        if b.mode == "hang":
            await self._release.wait()
        if b.mode != "text" and b.mode != "hang":
            return self._error_response(b)
        reply: dict[str, Any] = {
            "output": {"message": {"role": "assistant",
                                   "content": [{"text": "".join(b.chunks)}]}},
            "stopReason": "end_turn",
            "metrics": {"latencyMs": 1},
        }
        if b.usage:
            reply["usage"] = {"inputTokens": b.input_tokens, "outputTokens": b.output_tokens,
                              "totalTokens": b.input_tokens + b.output_tokens}
        else:  # Bedrock always sends usage; an absent one tests the estimate path
            reply["usage"] = {"inputTokens": 0, "outputTokens": 0, "totalTokens": 0}
        return web.json_response(reply)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        b = await self._record(request, "converse-stream")
        if b.mode == "error":
            return self._error_response(b)
        response = web.StreamResponse(
            headers={"Content-Type": "application/vnd.amazon.eventstream"}
        )
        await response.prepare(request)
        async for frame in self._frames(b):
            await response.write(frame)
        if b.mode == "drop":
            # Close the socket without the final chunk: the client sees a payload error.
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write_eof()
        return response

    async def _frames(self, b: Behaviour) -> AsyncIterator[bytes]:
        yield event_frame("messageStart", {"role": "assistant"})
        for i, text in enumerate(b.chunks):
            if b.mode != "text" and i == b.after:
                break
            yield event_frame("contentBlockDelta",
                              {"contentBlockIndex": 0, "delta": {"text": text}})
        if b.mode == "stream_error":
            yield exception_frame(b.error, b.message)
            return
        if b.mode == "drop":
            return
        if b.mode == "hang":
            await self._release.wait()
            for text in b.chunks[b.after:]:
                yield event_frame("contentBlockDelta",
                                  {"contentBlockIndex": 0, "delta": {"text": text}})
        yield event_frame("contentBlockStop", {"contentBlockIndex": 0})
        yield event_frame("messageStop", {"stopReason": "end_turn"})
        if b.usage:
            yield event_frame("metadata", {
                "usage": {"inputTokens": b.input_tokens, "outputTokens": b.output_tokens,
                          "totalTokens": b.input_tokens + b.output_tokens},
                "metrics": {"latencyMs": 1},
            })
