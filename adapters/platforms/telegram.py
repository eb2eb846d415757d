"""Telegram adapter: python-telegram-bot in, the shared core out.

``TelegramAdapter`` is an async context manager per bot. Entering it builds
a PTB ``Application`` (``api_base_url`` points it at a local Bot API server
or a test fake), registers the admin commands with ``setMyCommands`` and
starts polling (default) or a webhook. Every message update is normalized:

- commands (``/memory ...``, ``/memory@ThisBot ...``) go to ``Commands`` and
  are answered in a task; a command for another bot is left alone; in a
  group, an answer that may show someone's data (admin commands,
  ``/forget me``) goes to the caller's private chat with the bot, or the
  group is told to open one: never to the group;
- other messages pass the ``Gate`` (DMs always; groups when the bot is
  @mentioned or replied to, or per the channel config; other bots only with
  the loop guard), become an ``IncomingMessage`` (the mention removed,
  ``user`` = ``telegram:<id>``) with documents and photos as ``PendingFile``
  (downloaded through the Bot API only when the reply task runs), and go to
  ``Handler.submit``: the update callback returns at once;
- what has no text still gets an answer: a voice or video note is
  transcribed (``transcriber``) or declined with a sentence (``Handler``), a
  sticker or a location reaches the model described in words
  (``describe``), anything else unreadable gets ``UNREADABLE``.

Sending and editing go through ``TelegramSender`` (``telegram_sender.py``).

Group admins are NOT trusted for admin commands: anyone can create a group
and add the bot, so only the configured ``admins`` ids may run them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import SecretStr
from telegram import BotCommand, Message, MessageEntity, Update
from telegram import error as tg_error
from telegram.ext import Application, ContextTypes, MessageHandler, filters

from adapters.chat.commands import COMMANDS, Caller, Commands, answers_privately, parse
from adapters.chat.dedupe import Dedupe, MemoryDedupe
from adapters.chat.gate import Facts, Gate, GateConfig
from adapters.chat.handler import Handler, Inflight, PendingFile
from adapters.chat.outbound import (
    TELEGRAM,
    Limits,
    MemoryBudget,
    MessageSender,
    Outbound,
    RateBudget,
)
from adapters.platforms.telegram_sender import TelegramSender
from engine.errors import ConfigError, StartupError
from engine.memory.scope import user_key
from engine.ports import FileStore, Replier, Transcriber
from engine.types import IncomingMessage

log = logging.getLogger(__name__)

_COMMAND_NAMES = {spec.name for spec in COMMANDS}
UNREADABLE = ("Sorry, I can't read this kind of message; send me text, a document or a "
              "photo.")


def describe(message: Message) -> str:
    """A sticker or a location in words, for the model; "" for anything else."""
    if message.sticker is not None:
        return f"[sends a sticker: {message.sticker.emoji or 'no emoji'}]"
    place = message.venue.location if message.venue else message.location
    if place is not None:
        venue = message.venue
        named = f" ({venue.title}, {venue.address})" if venue else ""
        return (f"[shares a location{named}: latitude {place.latitude:.5f}, "
                f"longitude {place.longitude:.5f}]")
    return ""


@dataclass(frozen=True)
class TelegramConfig:
    """Plain values from ``TelegramSettings`` (the composition root resolves the token)."""

    bot: str
    token: SecretStr
    admins: tuple[str, ...] = ()
    gate: GateConfig = field(default_factory=GateConfig)
    api_base_url: str | None = None
    mode: Literal["polling", "webhook"] = "polling"
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    webhook_listen: str = "127.0.0.1"
    webhook_port: int = 8443
    poll_timeout_s: int = 30
    limits: Limits = TELEGRAM  # Telegram's published limits; tests may use faster ones
    request_timeout_s: float = 10.0  # per Bot API call (sends, edits, downloads)

    @property
    def webhook_path(self) -> str:
        """Where the webhook server listens: the path of ``webhook_url`` itself.

        Telegram posts to exactly that URL, so a reverse proxy that passes the
        path through reaches the worker; listening anywhere else is a silent 404.
        """
        if not self.webhook_url:
            return self.bot
        return urlsplit(self.webhook_url).path.strip("/")


class TelegramAdapter:
    """One bot on Telegram (see the module docstring)."""

    def __init__(
        self,
        config: TelegramConfig,
        *,
        replier: Replier,
        commands: Commands,
        files: FileStore | None = None,
        budget: RateBudget | None = None,
        semaphore: asyncio.Semaphore | None = None,
        dedupe: Dedupe | None = None,
        inflight: Inflight | None = None,
        wrap_sender: Callable[[MessageSender], MessageSender] | None = None,
        transcriber: Transcriber | None = None,
    ) -> None:
        secret = config.webhook_secret
        if config.mode == "webhook" and (secret is None or not secret.get_secret_value()):
            # python-telegram-bot checks nothing without one: anyone could post updates.
            raise ConfigError(f"bots.{config.bot}.telegram.webhook_secret_env: "
                              "webhook mode needs a non-empty secret")
        self.config = config
        builder = Application.builder().token(config.token.get_secret_value())
        if config.api_base_url:
            base = config.api_base_url.rstrip("/")
            builder = builder.base_url(f"{base}/bot").base_file_url(f"{base}/file/bot")
        # Updates are acknowledged at once (work runs in tasks), so sequential
        # processing keeps per-chat order without blocking anything.
        timeout = config.request_timeout_s
        self.app = (builder.connection_pool_size(64).read_timeout(timeout)
                    .write_timeout(timeout).connect_timeout(timeout).pool_timeout(timeout)
                    .build())
        self.sender = TelegramSender(self.app.bot, scope=f"telegram:{config.bot}",
                                     limits=config.limits)
        sender: MessageSender = wrap_sender(self.sender) if wrap_sender else self.sender
        self.outbound = Outbound(sender, budget or MemoryBudget())
        self.handler = Handler(replier=replier, outbound=self.outbound, files=files,
                               semaphore=semaphore, inflight=inflight, transcriber=transcriber)
        self.handler.serve_redeliveries("telegram", config.bot)
        # Webhooks are redelivered and several workers may share one: handle once.
        self.dedupe: Dedupe = dedupe or MemoryDedupe()
        self.commands = commands
        self.gate = Gate(config.gate)
        self.username = ""
        self.bot_id = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.app.add_handler(MessageHandler(
            filters.UpdateType.MESSAGE & ~filters.StatusUpdate.ALL, self._on_message))

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> TelegramAdapter:
        try:
            try:
                await self.app.initialize()  # getMe: checks the token
            except tg_error.InvalidToken:
                raise ConfigError(f"bots.{self.config.bot}.telegram: the bot token was "
                                  "refused by Telegram (check token_env)") from None
            except tg_error.NetworkError as exc:  # also TimedOut: nobody answered
                raise StartupError(f"bots.{self.config.bot}.telegram: cannot reach Telegram "
                                   f"({exc.message}); check the network, or api_base_url "
                                   "if set") from exc
            me = self.app.bot.bot
            self.username, self.bot_id = (me.username or "").lower(), me.id
            await self.app.bot.set_my_commands(
                [BotCommand(spec.name, spec.description) for spec in COMMANDS])
            await self.app.start()
            await self._start_updates()
        except BaseException:
            await self._stop()
            raise
        log.info("telegram: bot %s is @%s", self.config.bot, self.username)
        return self

    async def run(self) -> None:
        """Serve until cancelled (``boternity run``)."""
        async with self:
            await asyncio.Event().wait()

    async def is_ready(self) -> bool:
        """For ``/readyz``: polling or the webhook server is running."""
        return bool(self.app.running and self.app.updater and self.app.updater.running)

    async def _start_updates(self) -> None:
        updater = self.app.updater
        assert updater is not None
        if self.config.mode == "webhook":
            secret = self.config.webhook_secret
            assert secret is not None  # checked in __init__
            await updater.start_webhook(
                listen=self.config.webhook_listen, port=self.config.webhook_port,
                url_path=self.config.webhook_path, webhook_url=self.config.webhook_url,
                secret_token=secret.get_secret_value())
        else:
            await updater.start_polling(timeout=self.config.poll_timeout_s, poll_interval=0)

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._stop()

    async def _stop(self) -> None:
        updater = self.app.updater
        if updater is not None and updater.running:
            await updater.stop()
        await self.handler.aclose()
        for task in list(self._tasks):
            task.cancel()
        if self.app.running:
            await self.app.stop()
        await self.app.shutdown()

    # -------------------------------------------------------------- inbound

    async def _on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None or message.from_user is None:
            return
        text = message.text or message.caption or describe(message)
        is_group = message.chat.type != "private"
        parsed = parse(text)
        if parsed is not None and self._for_us(text, is_group):
            if await self.dedupe.claim(
                    f"telegram:{self.config.bot}:{message.chat.id}:{message.message_id}"):
                self._spawn(self._command(message, *parsed))
            return
        user = message.from_user
        # Posted as a channel, by an anonymous group admin or forwarded from a
        # linked channel: ``from_user`` is one placeholder account shared by
        # everyone who posts that way (136817688, 1087968824, 777000), so the
        # sender is the chat in ``sender_chat`` (its own memory and budget).
        sender = message.sender_chat
        sender_id, sender_name = (
            (sender.id, sender.title or sender.username or str(sender.id)) if sender
            else (user.id, user.full_name))
        reply = message.reply_to_message
        replied_to_us = bool(reply and reply.from_user and reply.from_user.id == self.bot_id)
        facts = Facts(chat=str(message.chat.id), is_group=is_group,
                      addressed=self._mentioned(message) or replied_to_us,
                      from_bot=user.is_bot and sender is None, from_self=user.id == self.bot_id)
        decision = await self.gate.decide(facts)
        if decision != "answer":
            log.debug("telegram %s: not answering %s (%s)", self.config.bot, facts.chat, decision)
            return
        if not await self.dedupe.claim(
                f"telegram:{self.config.bot}:{message.chat.id}:{message.message_id}"):
            return
        incoming = IncomingMessage(
            platform="telegram", bot=self.config.bot, chat=str(message.chat.id),
            user=user_key("telegram", sender_id), text=self._strip_mention(text),
            message_id=str(message.message_id), user_name=sender_name,
            is_group=is_group, reply_to=str(reply.message_id) if reply else None,
        )
        files = self._pending_files(message)
        if not incoming.text and not files:  # a video, a poll, a contact...: not silence
            self._spawn(self.outbound.send_text(incoming.chat, UNREADABLE, is_group=is_group,
                                                reply_to=incoming.message_id))
            return
        self.handler.submit(incoming, files)

    def _for_us(self, text: str, is_group: bool) -> bool:
        """``/cmd@OtherBot`` is someone else's; a bare ``/cmd`` is ours if we know it."""
        head = text.strip().split(" ", 1)[0]
        name, _, target = head[1:].partition("@")
        if target:
            return target.lower() == self.username
        return name.lower() in _COMMAND_NAMES or not is_group

    def _mentioned(self, message: Message) -> bool:
        for entity, value in message.parse_entities().items():
            if entity.type == MessageEntity.MENTION and value.lower() == f"@{self.username}":
                return True
            if entity.type == MessageEntity.TEXT_MENTION and entity.user is not None \
                    and entity.user.id == self.bot_id:
                return True
        caption = message.parse_caption_entities()
        return any(e.type == MessageEntity.MENTION and v.lower() == f"@{self.username}"
                   for e, v in caption.items())

    def _strip_mention(self, text: str) -> str:
        if not self.username:
            return text.strip()
        tag = f"@{self.username}"
        lowered = text.lower()
        while (at := lowered.find(tag)) >= 0:
            text, lowered = text[:at] + text[at + len(tag):], lowered[:at] + lowered[at + len(tag):]
        return text.strip()

    def _pending_files(self, message: Message) -> list[PendingFile]:
        files: list[PendingFile] = []
        if message.document is not None:
            doc = message.document
            files.append(PendingFile(
                name=doc.file_name or f"document_{doc.file_unique_id}",
                mime_type=doc.mime_type or "", size=doc.file_size,
                download=self._downloader(doc.file_id)))
        if message.photo:
            photo = max(message.photo, key=lambda p: p.width * p.height)
            files.append(PendingFile(
                name=f"photo_{photo.file_unique_id}.jpg", mime_type="image/jpeg",
                size=photo.file_size,
                download=self._downloader(photo.file_id)))
        # Speech: transcribed by the handler, never stored.
        if message.voice is not None:
            files.append(PendingFile(
                name="voice.ogg", mime_type=message.voice.mime_type or "audio/ogg",
                size=message.voice.file_size, download=self._downloader(message.voice.file_id),
                voice=True))
        if message.video_note is not None:
            note = message.video_note
            files.append(PendingFile(name="video_note.mp4", mime_type="video/mp4",
                                     size=note.file_size, download=self._downloader(note.file_id),
                                     voice=True))
        return files

    def _downloader(self, file_id: str) -> Callable[[], AsyncIterator[bytes]]:
        async def download() -> AsyncIterator[bytes]:
            telegram_file = await self.app.bot.get_file(file_id)
            yield bytes(await telegram_file.download_as_bytearray())

        return download

    # ------------------------------------------------------------- commands

    async def _command(self, message: Message, name: str, args: str) -> None:
        assert message.from_user is not None
        is_group = message.chat.type != "private"
        caller = Caller(platform="telegram", chat=str(message.chat.id),
                        user=str(message.from_user.id), is_group=is_group)
        # Telegram clients send /start first; answer it with the help text.
        answer = await self.commands.run(caller, "help" if name == "start" else name, args)
        if is_group and answers_privately(name):
            await self._answer_privately(message, name, answer)
            return
        await self.outbound.send_text(str(message.chat.id), answer, is_group=is_group,
                                      reply_to=str(message.message_id))

    async def _answer_privately(self, message: Message, name: str, answer: str) -> None:
        """A group has no private replies: the answer goes to the caller's DM with us.

        Telegram lets a bot write to a person only after they started a chat
        with it; if they have not, the group is asked to do that, and the
        answer (someone's data, maybe) is never posted there.
        """
        assert message.from_user is not None
        dm = str(message.from_user.id)  # a private chat's id is the user's id
        delivered = await self.outbound.send_text(dm, answer, is_group=False)
        note = (f"I sent you the answer to /{name} in our private chat." if
                delivered.final_landed else
                f"I answer /{name} only in private: open a chat with @{self.username}, "
                "press Start, and send the command there.")
        await self.outbound.send_text(str(message.chat.id), note, is_group=True,
                                      reply_to=str(message.message_id))

    def _spawn(self, coro: Awaitable[object]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception:
                log.exception("telegram %s: command failed", self.config.bot)

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

