"""Discord adapter: discord.py with the message-content intent and app commands.

Contract:
- Sending and editing go through ``DiscordSender`` (``discord_sender.py``,
  which also says who handles rate limits).
- ``DiscordAdapter`` (async context manager, one per bot) logs in, syncs the
  app commands only when their definition changed (hash stored in the data
  dir: Discord limits command writes), and normalizes ``on_message`` into
  ``IncomingMessage`` through the shared gate and handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket
from pydantic import SecretStr

from adapters.chat.commands import COMMANDS, Caller, Commands, CommandSpec
from adapters.chat.gate import Facts, Gate, GateConfig
from adapters.chat.handler import Handler, Inflight, PendingFile
from adapters.chat.outbound import (
    DISCORD,
    Limits,
    MessageSender,
    Outbound,
    RateBudget,
)
from adapters.chat.render import to_discord
from adapters.chat.splitting import split_markdown
from adapters.platforms.discord_sender import MAX_RATELIMIT_TIMEOUT_S, DiscordSender
from engine.errors import ConfigError
from engine.memory.scope import user_key
from engine.ports import FileStore, Replier
from engine.types import IncomingMessage

log = logging.getLogger(__name__)

# --- the adapter --------------------------------------------------------------

# Route.BASE and DEFAULT_GATEWAY are process-global in discord.py: remember who set them.
_HOOKS: dict[str, tuple[str, int]] = {}  # name -> (value, adapters using it)


@dataclass(frozen=True)
class DiscordConfig:
    """Plain values for one bot's Discord connection (built by the composition root).

    ``api_base_url`` is the REST base (``.../api/v10``) and ``gateway_url`` the
    websocket; both are for proxies and tests, and process-global in discord.py
    (two bots in one process cannot point at different hosts).
    ``trust_guild_admins``: server Administrators run admin commands, read-only, on
    their server's data (chat/commands.py). Off by default: anyone can make a server.
    """

    bot: str
    token: SecretStr
    data_dir: Path
    gate: GateConfig = field(default_factory=GateConfig)
    api_base_url: str | None = None
    gateway_url: str | None = None
    trust_guild_admins: bool = False
    limits: Limits = DISCORD
    ready_timeout_s: float = 60.0
    # Sharding across workers: this worker runs ``shard_ids`` of ``shard_count``
    # gateway shards (discord.py's AutoShardedClient); None = one unsharded connection.
    shard_ids: tuple[int, ...] | None = None
    shard_count: int | None = None


def command_payload(tree: app_commands.CommandTree[discord.Client]) -> list[dict[str, Any]]:
    """What ``tree.sync`` would upload (global commands)."""
    return [command.to_dict(tree) for command in tree.get_commands()]


def commands_hash(payload: list[dict[str, Any]], application_id: int | None) -> str:
    canonical = json.dumps({"app": application_id, "commands": payload}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class DiscordAdapter:
    """One bot on Discord; ``async with`` it, or ``await run()``."""

    def __init__(
        self,
        config: DiscordConfig,
        *,
        replier: Replier,
        commands: Commands | None = None,
        files: FileStore | None = None,
        budget: RateBudget | None = None,
        semaphore: asyncio.Semaphore | None = None,
        wrap_sender: Callable[[MessageSender], MessageSender] | None = None,
        inflight: Inflight | None = None,
    ) -> None:
        self.config = config
        self.commands = commands
        # Text only: no voice, so no warnings about voice libraries at every start.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enable it in the developer portal
        options: dict[str, Any] = dict(
            intents=intents, max_ratelimit_timeout=MAX_RATELIMIT_TIMEOUT_S,
            guild_ready_timeout=0.5, member_cache_flags=discord.MemberCacheFlags.none(),
            allowed_mentions=discord.AllowedMentions.none(),
        )
        self.client: discord.Client
        if config.shard_count:
            if config.shard_ids is not None:
                options["shard_ids"] = list(config.shard_ids)
            self.client = discord.AutoShardedClient(shard_count=config.shard_count, **options)
        else:
            self.client = discord.Client(**options)
        self.tree: app_commands.CommandTree[discord.Client] = app_commands.CommandTree(
            self.client)
        self.sender = DiscordSender(self.client, scope=f"discord:{config.bot}",
                                    limits=config.limits)
        sender: MessageSender = self.sender
        if wrap_sender is not None:
            sender = wrap_sender(sender)  # e.g. metrics around every send/edit
        self.outbound = Outbound(sender, budget)
        self.handler = Handler(replier=replier, outbound=self.outbound, files=files,
                               semaphore=semaphore, inflight=inflight)
        self.handler.serve_redeliveries("discord", config.bot)
        self.gate = Gate(config.gate)
        self.synced = False  # whether the last start uploaded the commands
        self._connection: asyncio.Task[None] | None = None
        self.client.event(self.on_message)
        for spec in COMMANDS:
            self.tree.add_command(self._app_command(spec))
        self.tree.error(self._on_tree_error)

    # lifecycle ---------------------------------------------------------------
    async def __aenter__(self) -> DiscordAdapter:
        _hook("Route.BASE", self.config.api_base_url,
              lambda url: setattr(discord.http.Route, "BASE", url.rstrip("/")))
        _hook("DEFAULT_GATEWAY", self.config.gateway_url,
              lambda url: setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(url)))
        try:
            try:
                await self.client.login(self.config.token.get_secret_value())
            except discord.LoginFailure:
                raise ConfigError(
                    f"bots.{self.config.bot}.discord: the token was refused") from None
            await self.sync_commands()
            self._connection = asyncio.create_task(self.client.connect(reconnect=True),
                                                   name=f"discord:{self.config.bot}")
            await self._wait_ready()
        except BaseException:
            await self._stop()
            raise
        log.info("discord: bot %s connected as %s", self.config.bot, self.client.user)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def run(self) -> None:
        """Serve until cancelled or the connection dies for good."""
        async with self:
            assert self._connection is not None
            await asyncio.shield(self._connection)

    async def is_ready(self) -> bool:
        """For ``/readyz``: logged in and the gateway session is up."""
        return self.client.is_ready() and not self.client.is_closed()

    async def _wait_ready(self) -> None:
        """Ready, or the connection task's error (discord.py dies silently otherwise)."""
        assert self._connection is not None
        ready = asyncio.ensure_future(self.client.wait_until_ready())
        done, _ = await asyncio.wait({ready, self._connection},
                                     timeout=self.config.ready_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            if self._connection in done:
                try:
                    self._connection.result()  # raises what killed it
                except discord.PrivilegedIntentsRequired:
                    raise ConfigError(
                        f"bots.{self.config.bot}.discord: enable the Message Content intent "
                        f"for this bot in the Discord developer portal") from None
            raise TimeoutError(f"discord: bot {self.config.bot} not ready in "
                               f"{self.config.ready_timeout_s:g}s")

    async def _stop(self) -> None:
        await self.handler.aclose()
        await self.client.close()
        if self._connection is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._connection
        _unhook("Route.BASE", self.config.api_base_url)
        _unhook("DEFAULT_GATEWAY", self.config.gateway_url)

    async def sync_commands(self) -> None:
        """Upload the app commands only when they changed since the last upload."""
        payload = command_payload(self.tree)
        digest = commands_hash(payload, self.client.application_id)
        marker = self.config.data_dir / "bots" / self.config.bot / "discord-commands.sha256"
        known = await asyncio.to_thread(_read, marker)
        if known == digest:
            self.synced = False
            return
        await self.tree.sync()
        await asyncio.to_thread(_write, marker, digest)
        self.synced = True
        log.info("discord: bot %s uploaded %d app commands", self.config.bot, len(payload))

    # messages ----------------------------------------------------------------
    async def on_message(self, message: discord.Message) -> None:
        me = self.client.user
        if me is None:
            return
        is_group = message.guild is not None
        reference = message.reference
        resolved = reference.resolved if reference else None
        replied_to_us = isinstance(resolved, discord.Message) and resolved.author.id == me.id
        facts = Facts(
            chat=str(message.channel.id), is_group=is_group,
            addressed=me in message.mentions or replied_to_us,
            from_bot=message.author.bot, from_self=message.author.id == me.id,
        )
        decision = await self.gate.decide(facts)
        if decision != "answer":
            log.debug("discord: not answering %s (%s)", facts.chat, decision)
            return
        incoming = IncomingMessage(
            platform="discord", bot=self.config.bot, chat=str(message.channel.id),
            user=user_key("discord", message.author.id), text=self.strip_mention(message.content),
            message_id=str(message.id), user_name=message.author.display_name,
            is_group=is_group, reply_to=str(reference.message_id)
            if reference and reference.message_id else None,
        )
        self.handler.submit(incoming, [_pending(a) for a in message.attachments])

    def strip_mention(self, text: str) -> str:
        me = self.client.user
        if me is None:
            return text.strip()
        return text.replace(f"<@{me.id}>", "").replace(f"<@!{me.id}>", "").strip()

    # app commands --------------------------------------------------------------
    def _app_command(self, spec: CommandSpec) -> app_commands.Command[Any, ..., None]:
        async def callback(interaction: discord.Interaction[discord.Client],
                           args: str | None = None) -> None:
            await self._on_command(interaction, spec.name, args or "")

        describe = app_commands.describe(args=spec.usage or "(none)")
        return app_commands.Command(name=spec.name, description=spec.description,
                                    callback=describe(callback))

    async def _on_tree_error(self, interaction: discord.Interaction[discord.Client],
                             error: app_commands.AppCommandError) -> None:
        if isinstance(error, app_commands.CommandNotFound):
            # A command Discord still has registered but we no longer know.
            await self._on_command(interaction, error.name, "")
            return
        log.error("discord: command failed", exc_info=error)
        if not interaction.response.is_done():
            await interaction.response.send_message("Sorry, that command failed.",
                                                    ephemeral=True)

    async def _on_command(self, interaction: discord.Interaction[discord.Client], name: str,
                          args: str) -> None:
        """Defer at once (Discord's 3 s), then answer privately by editing."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        text = "Admin commands are not enabled for this bot."
        if self.commands is not None:
            chat = str(interaction.channel_id or "")
            caller = Caller(
                platform="discord", chat=chat, user=str(interaction.user.id),
                is_group=interaction.guild_id is not None,
                is_platform_admin=self.config.trust_guild_admins
                and interaction.guild_id is not None and interaction.permissions.administrator,
                platform_chats=_server_chats(interaction.guild, chat),
            )
            text = await self.commands.run(caller, name, args)
        for part in split_markdown(to_discord(text), self.config.limits.max_len)[:1]:
            await interaction.edit_original_response(
                content=part, allowed_mentions=discord.AllowedMentions.none())


def _server_chats(guild: discord.Guild | None, chat: str) -> frozenset[str]:
    """What a server Administrator may read: its server's channels and threads."""
    found = [*guild.channels, *guild.threads] if guild is not None else []  # else: here only
    return frozenset({chat, *(str(c.id) for c in found)})


def _pending(attachment: discord.Attachment) -> PendingFile:
    async def download() -> AsyncIterator[bytes]:
        # Attachment.read() is discord.py's own CDN download; the handler has
        # already refused a file whose declared size is over the cap.
        yield await attachment.read()

    return PendingFile(name=attachment.filename,
                       mime_type=attachment.content_type or "application/octet-stream",
                       size=attachment.size, download=download)


def _hook(name: str, value: str | None, apply: Callable[[str], None]) -> None:
    """Point a process-global discord.py hook at ``value`` (refcounted per adapter)."""
    if not value:
        return
    current, users = _HOOKS.get(name, (value, 0))
    if users and current != value:
        raise ConfigError(f"discord: {name} is process-global and already points at "
                          f"another host; all bots in one process must share it")
    _HOOKS[name] = (value, users + 1)
    apply(value)


def _unhook(name: str, value: str | None) -> None:
    if value and name in _HOOKS:
        current, users = _HOOKS[name]
        if users <= 1:
            del _HOOKS[name]
        else:
            _HOOKS[name] = (current, users - 1)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
