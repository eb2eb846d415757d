"""The platform-neutral reply flow: acknowledge first, then work in a bounded task.

``Handler.submit(message, files)`` returns at once (platform callbacks must
answer within seconds) and schedules ``handle`` in a task; at most
``concurrency`` replies run at a time per semaphore (share one semaphore
between a bot's platforms to bound the whole process). ``handle``:

1. stores each attachment in the ``FileStore`` (streamed from the platform,
   size-checked before download when the platform declares a size) and turns
   it into an ``Attachment`` (``documents``: extracted text, or image bytes); a refused file
   gets a clear note in the chat and the rest of the message goes on;
2. streams ``Replier.reply(message)`` through ``Outbound.stream`` (first
   message as soon as text arrives, throttled edits, final text with footer).

A voice message (``PendingFile.voice``: a voice or video note) is not stored:
with a ``Transcriber`` its words become the message's text and are answered;
without one the user is told that voice is not supported here. A message
with no text and no usable attachment is not answered. Errors in one reply
are logged and never reach other replies.

With an ``Inflight`` (several workers: ``persistence.redis.inflight``), each
message is recorded before its reply starts and dropped when it ends, so a
worker killed mid-reply has its messages taken over by a live worker
(``serve_redeliveries``); a message already answered or being answered by a
live worker is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from adapters.chat import documents
from adapters.chat.outbound import Delivery, Outbound
from engine.errors import FileRejected, ProviderError
from engine.log_context import bind
from engine.ports import FileStore, Replier, Transcriber
from engine.types import Attachment, IncomingMessage

log = logging.getLogger(__name__)

VOICE_UNSUPPORTED = ("Sorry, I can't listen to voice messages here; please type your "
                     "message instead.")
VOICE_FAILED = "Sorry, I could not transcribe your voice message; please type it instead."
VOICE_EMPTY = "I could not make out any words in that voice message."
MAX_VOICE_BYTES = 20 * 1024 * 1024  # Telegram's own download limit; transcription APIs take 25 MB


class Inflight(Protocol):
    """Replies in flight, shared by workers (see the module docstring)."""

    def route(self, platform: str, bot: str,
              resubmit: Callable[[IncomingMessage], object]) -> None: ...

    async def begin(self, message: IncomingMessage) -> bool: ...

    async def finish(self, message: IncomingMessage) -> None: ...


@dataclass(frozen=True)
class PendingFile:
    """An attachment not downloaded yet: ``download()`` streams its bytes."""

    name: str
    mime_type: str
    size: int | None
    download: Callable[[], AsyncIterator[bytes]]
    voice: bool = False  # speech to transcribe (a voice or video note), never stored


class Handler:
    """One bot on one platform: messages in, replies out (see module docstring)."""

    def __init__(
        self,
        *,
        replier: Replier,
        outbound: Outbound,
        files: FileStore | None = None,
        semaphore: asyncio.Semaphore | None = None,
        concurrency: int = 8,
        text_budget: int = 20_000,
        inflight: Inflight | None = None,
        transcriber: Transcriber | None = None,
    ) -> None:
        self.replier = replier
        self.transcriber = transcriber
        self.inflight = inflight
        self.outbound = outbound
        self.files = files
        self.semaphore = semaphore or asyncio.Semaphore(concurrency)
        self.text_budget = text_budget
        self._tasks: set[asyncio.Task[Delivery | None]] = set()

    def submit(
        self, message: IncomingMessage, files: Sequence[PendingFile] = ()
    ) -> asyncio.Task[Delivery | None]:
        """Schedule the reply and return at once (the platform gets its ack)."""
        task = asyncio.create_task(self._guarded(message, files),
                                   name=f"reply:{message.platform}:{message.chat}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def serve_redeliveries(self, platform: str, bot: str) -> None:
        """Take over ``platform``/``bot`` messages of workers that died mid-reply."""
        if self.inflight is not None:
            self.inflight.route(platform, bot, self.submit)

    async def _guarded(
        self, message: IncomingMessage, files: Sequence[PendingFile]
    ) -> Delivery | None:
        # Every log line of this reply says whom it is about (adapters/ops/logs.py).
        with bind(bot=message.bot, platform=message.platform, chat=message.chat):
            return await self._guarded_reply(message, files)

    async def _guarded_reply(
        self, message: IncomingMessage, files: Sequence[PendingFile]
    ) -> Delivery | None:
        # Recorded before waiting for the semaphore: queued messages count too.
        if self.inflight is not None and not await self.inflight.begin(message):
            log.info("%s:%s %s is answered elsewhere", message.platform, message.chat,
                     message.message_id)
            return None
        try:
            async with self.semaphore:
                result = await self.handle(message, files)
        except asyncio.CancelledError:
            # Shutting down mid-reply: not finished, so once this worker's
            # lease runs out a live worker takes the message over.
            raise
        except Exception:
            log.exception("reply to %s:%s failed", message.platform, message.chat)
            result = None
        if self.inflight is not None:
            with contextlib.suppress(Exception):
                await self.inflight.finish(message)
        return result

    async def handle(
        self, message: IncomingMessage, files: Sequence[PendingFile] = ()
    ) -> Delivery | None:
        """Store attachments, then stream the reply. None when nothing to answer."""
        voices = [f for f in files if f.voice]
        attachments, notes = await self._store(message, [f for f in files if not f.voice])
        if voices:
            heard, said = await self._hear(voices)
            notes += said
            if heard:
                message = dataclasses.replace(
                    message, text="\n\n".join(t for t in (message.text.strip(), heard) if t))
        if notes:
            await self.outbound.send_text(message.chat, "\n".join(notes),
                                          is_group=message.is_group,
                                          reply_to=message.message_id or None)
        if not message.text.strip() and not attachments:
            return None
        if attachments:
            message = dataclasses.replace(
                message, attachments=message.attachments + tuple(attachments))
        return await self.outbound.stream(
            message.chat, self.replier.reply(message),
            is_group=message.is_group, reply_to=message.message_id or None,
        )

    async def _store(
        self, message: IncomingMessage, files: Sequence[PendingFile]
    ) -> tuple[list[Attachment], list[str]]:
        attachments: list[Attachment] = []
        notes: list[str] = []
        if files and self.files is None:
            return [], ["Attachments are not stored by this bot; I only read the text."]
        for pending in files:
            assert self.files is not None
            try:
                stored = await self.files.save(
                    bot=message.bot, platform=message.platform, chat=message.chat,
                    uploader=message.user, name=pending.name, mime_type=pending.mime_type,
                    chunks=pending.download(), declared_size=pending.size,
                )
                attachments.append(await documents.attachment(
                    stored, self.files.path(stored), text_budget=self.text_budget))
            except FileRejected as exc:
                notes.append(f"⚠️ {exc}")
            except Exception as exc:  # a failed download or disk: this file only
                log.warning("storing %r failed: %s", pending.name, exc)
                notes.append("⚠️ I could not store that file; please try again later.")
        return attachments, notes

    async def _hear(self, voices: Sequence[PendingFile]) -> tuple[str, list[str]]:
        """(the words of every voice message, notes for the user)."""
        if self.transcriber is None:
            return "", [VOICE_UNSUPPORTED]
        words: list[str] = []
        for voice in voices:
            try:
                if voice.size is not None and voice.size > MAX_VOICE_BYTES:
                    raise FileRejected(f"{voice.name}: too long to transcribe")
                audio = b"".join([chunk async for chunk in voice.download()])
                words.append(await self.transcriber.transcribe(
                    audio, filename=voice.name, mime_type=voice.mime_type))
            except ProviderError as exc:
                log.warning("transcribing %r with %s failed: %s", voice.name,
                            self.transcriber.name, exc)
                return "", [VOICE_FAILED]
            except Exception as exc:  # a failed download, a refused size
                log.warning("voice message %r unavailable: %s", voice.name, exc)
                return "", [VOICE_FAILED]
        heard = "\n".join(w for w in words if w)
        return heard, ([] if heard else [VOICE_EMPTY])

    async def aclose(self, grace_s: float = 10.0) -> None:
        """Let running replies finish (up to ``grace_s``), then cancel the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
