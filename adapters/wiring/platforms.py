"""Composition root, platform part: each bot's chat-platform adapters from settings.

``platform_runners(app)`` returns a runner for every Telegram, Slack and
Discord section of every bot; ``boternity run`` runs them side by side (the
CLI imports this module only then: ``boternity chat`` never loads the
platform SDKs). Like the rest of ``adapters/wiring/`` this module may import
``persistence``: it is the same composition root, split so each file stays
small. Settings become plain
values here (``SlackConfig``, ``DiscordConfig``); secrets are resolved from
the environment and a missing one is a ``ConfigError`` naming the key.

Shared by every bot and platform of one process (built on first use, kept on
``app.extras``):
- the ``FileStore`` under ``data_dir`` (``adapters.wiring.people.files``)
  with the storage caps;
- a ``LastReplies`` observer, for ``/provider status``;
- one semaphore bounding concurrent replies (``MAX_CONCURRENT_REPLIES``).
Per bot and platform: ``Commands`` with that platform's ``admins``. When the
scale-out part set them, ``app.budget`` (shared pacing) and ``app.dedupe``
(shared event claims) are used, ``app.metrics`` wraps every sender and each
adapter joins ``app.ready_checks``.

A new platform registers here the same way: its config from settings, its
adapter with the shared parts, one line in ``platform_runners``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from adapters.chat.commands import Commands
from adapters.chat.dedupe import Dedupe
from adapters.chat.gate import GateConfig
from adapters.chat.outbound import MessageSender, RateBudget
from adapters.platforms.discord import DiscordAdapter, DiscordConfig
from adapters.platforms.slack import SlackAdapter, SlackConfig
from adapters.platforms.telegram import TelegramAdapter, TelegramConfig
from adapters.wiring.app import App, Runner
from adapters.wiring.people import files, people
from adapters.wiring.settings import (
    DiscordSettings,
    PlatformSettings,
    SlackSettings,
    TelegramSettings,
)
from engine.admin.bot import FileAdmin, LastReplies, PersonaAdmin, ProviderAdmin, UsageAdmin
from engine.errors import ConfigError
from engine.ports import Transcriber

MAX_CONCURRENT_REPLIES = 32


def _shared(app: App, key: str, make: Callable[[], Any]) -> Any:
    if key not in app.extras:
        app.extras[key] = make()
    return app.extras[key]


def last_replies(app: App) -> LastReplies:
    def make() -> LastReplies:
        last = LastReplies()
        app.observers.append(last)  # the conversations share this list
        return last

    found: LastReplies = _shared(app, "last_replies", make)
    return found


def reply_semaphore(app: App) -> asyncio.Semaphore:
    found: asyncio.Semaphore = _shared(
        app, "reply_semaphore", lambda: asyncio.Semaphore(MAX_CONCURRENT_REPLIES))
    return found


def commands_for(app: App, bot: str, admins: list[str]) -> Commands:
    """The admin commands of one bot, for one platform's admins."""
    usage = getattr(app, "usage", None)
    return Commands(
        bot=bot, admins=admins, memory=getattr(app, "memory_admin", None),
        providers=ProviderAdmin(app.chains, last_replies(app)),
        files=FileAdmin(files(app)), persona=PersonaAdmin(app.conversations),
        usage=(lambda b: UsageAdmin(usage.store).report(b)) if usage is not None else None,
        people=people(app), history=getattr(app, "messages", None),
    )


def gate_config(platform: PlatformSettings, app: App | None = None,
                scope: str = "") -> GateConfig:
    """The gate's values; with Redis, its loop guard counts across workers
    (``scope``, e.g. ``telegram:<bot>``, keeps bots and platforms apart)."""
    redis = getattr(app, "redis", None)
    turns = redis.turns(scope) if redis is not None and platform.reply_to_bots else None
    return GateConfig(group_reply=platform.group_reply, channels=dict(platform.channels),
                      reply_to_bots=platform.reply_to_bots,
                      max_bot_turns=platform.max_bot_turns, turns=turns)


def slack_config(app: App, bot: str, s: SlackSettings) -> SlackConfig:
    settings, key = app.settings, f"bots.{bot}.slack"
    return SlackConfig(
        bot=bot,
        bot_token=settings.require_secret(s.bot_token_env, key=f"{key}.bot_token_env"),
        app_token=settings.require_secret(s.app_token_env, key=f"{key}.app_token_env")
        if s.mode == "socket" else None,
        signing_secret=settings.require_secret(s.signing_secret_env,
                                               key=f"{key}.signing_secret_env")
        if s.mode == "http" else None,
        mode=s.mode, http_host=s.http_host, http_port=s.http_port, http_path=s.http_path,
        api_base_url=s.api_base_url, trust_workspace_admins=s.trust_workspace_admins,
        gate=gate_config(s, app, f"slack:{bot}"),
    )


def discord_config(app: App, bot: str, s: DiscordSettings) -> DiscordConfig:
    settings = app.settings
    return DiscordConfig(
        bot=bot, token=settings.require_secret(s.token_env, key=f"bots.{bot}.discord.token_env"),
        data_dir=settings.storage.data_dir, gate=gate_config(s, app, f"discord:{bot}"),
        api_base_url=s.api_base_url, gateway_url=s.gateway_url,
        trust_guild_admins=s.trust_guild_admins,
        shard_ids=tuple(s.shard_ids) if s.shard_ids is not None else None,
        shard_count=s.shard_count,
    )


def telegram_config(app: App, bot: str, s: TelegramSettings) -> TelegramConfig:
    settings, key = app.settings, f"bots.{bot}.telegram"
    secret = settings.secret(s.webhook_secret_env, key=f"{key}.webhook_secret_env")
    if s.mode == "webhook" and secret is None:
        # Without the secret anyone who finds the URL can post updates as any user.
        raise ConfigError(
            f"{settings.source}: {key}.webhook_secret_env: webhook mode needs a secret: "
            + (f"environment variable '{s.webhook_secret_env}' is empty or unset"
               if s.webhook_secret_env else "name an environment variable holding one")
            + " (see .env.example)")
    return TelegramConfig(
        bot=bot, token=settings.require_secret(s.token_env, key=f"{key}.token_env"),
        admins=tuple(s.admins), gate=gate_config(s, app, f"telegram:{bot}"),
        api_base_url=s.api_base_url, mode=s.mode,
        webhook_url=s.webhook_url, webhook_listen=s.webhook_listen, webhook_port=s.webhook_port,
        webhook_secret=secret,
    )


def _wrapper(app: App, platform: str) -> Callable[[MessageSender], MessageSender] | None:
    metrics = getattr(app, "metrics", None)
    if metrics is None:
        return None
    from adapters.ops.metrics import MeteredSender

    return lambda sender: MeteredSender(sender, metrics, platform)


def _ready(app: App, name: str, adapter: SlackAdapter | DiscordAdapter | TelegramAdapter) -> None:
    checks = getattr(app, "ready_checks", None)
    if isinstance(checks, dict):
        checks[name] = adapter.is_ready


def transcriber_for(app: App, bot: str) -> Transcriber | None:
    """The first provider of the bot's chain with a ``transcription_model``, if any."""
    for name in app.settings.bots[bot].chain:
        provider = app.providers.get(name)
        if getattr(provider, "transcription_model", None) and isinstance(provider, Transcriber):
            return provider
    return None


def platform_runners(app: App) -> list[tuple[str, Runner]]:
    """``(label, runner)`` for every Telegram, Slack and Discord section of every bot."""
    found: list[tuple[str, Runner]] = []
    budget: RateBudget | None = getattr(app, "budget", None)
    dedupe: Dedupe | None = getattr(app, "dedupe", None)
    slack_listeners: dict[tuple[str, int], str] = {}  # HTTP mode: one bot per host:port
    for bot, settings in app.settings.bots.items():
        if settings.telegram is not None:
            telegram = TelegramAdapter(
                telegram_config(app, bot, settings.telegram), replier=app.conversations[bot],
                commands=commands_for(app, bot, settings.telegram.admins), files=files(app),
                budget=budget, semaphore=reply_semaphore(app), dedupe=dedupe,
                inflight=getattr(app, "inflight", None), wrap_sender=_wrapper(app, "telegram"),
                transcriber=transcriber_for(app, bot))
            _ready(app, f"telegram:{bot}", telegram)
            found.append((f"{bot}/telegram", telegram.run))
        if settings.slack is not None:
            where = (settings.slack.http_host, settings.slack.http_port)
            if settings.slack.mode == "http" and where[1]:
                if where in slack_listeners:
                    raise ConfigError(
                        f"{app.settings.source}: bots.{bot}.slack.http_port: {where[1]} is "
                        f"already used by bots.{slack_listeners[where]}.slack; give each "
                        f"bot its own port")
                slack_listeners[where] = bot
            slack = SlackAdapter(
                slack_config(app, bot, settings.slack), replier=app.conversations[bot],
                commands=commands_for(app, bot, settings.slack.admins), files=files(app),
                dedupe=dedupe, budget=budget, semaphore=reply_semaphore(app),
                inflight=getattr(app, "inflight", None), wrap_sender=_wrapper(app, "slack"))
            _ready(app, f"slack:{bot}", slack)
            found.append((f"{bot}/slack", slack.run))
        if settings.discord is not None:
            discord = DiscordAdapter(
                discord_config(app, bot, settings.discord), replier=app.conversations[bot],
                commands=commands_for(app, bot, settings.discord.admins), files=files(app),
                budget=budget, semaphore=reply_semaphore(app),
                inflight=getattr(app, "inflight", None), wrap_sender=_wrapper(app, "discord"))
            _ready(app, f"discord:{bot}", discord)
            found.append((f"{bot}/discord", discord.run))
    return found
