"""The composition root: settings in, a running ``App`` out.

``build_app(settings)`` is the one place that reads the whole ``Settings``
and the one adapter module that imports ``persistence``. Everything it builds
receives plain values. It is an async context manager over one
``AsyncExitStack``: resources start in order (database, then every provider
that owns one, e.g. the local llama.cpp server) and a failed start closes
whatever had started, in reverse.

    async with build_app(settings) as app:
        async for item in app.conversations["demo"].reply(message): ...

Other parts add their attributes to ``App`` (memory, files, usage, metrics)
and their wiring to ``build_app`` with small edits; platform adapters register
in ``platform_runners``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from adapters.settings import ProviderSettings, Settings
from engine.conversation import Conversation
from engine.errors import ConfigError
from engine.ports import Provider, ReplyObserver
from engine.providers.fallback import Breakers, FallbackChain
from engine.providers.presets import PRESETS
from engine.providers.registry import ProviderConfig, build_provider
from engine.usage import Budget, Price, UsageAccounting
from persistence.conversations import SqlConversationStore
from persistence.database import Database
from persistence.usage import SqlUsageStore

log = logging.getLogger(__name__)

# A platform adapter's main loop: runs until cancelled.
Runner = Callable[[], Coroutine[Any, Any, None]]


@dataclass
class App:
    """Everything a running Boternity holds; adapters read what they need."""

    settings: Settings
    database: Database
    messages: SqlConversationStore
    breakers: Breakers
    providers: dict[str, Provider] = field(default_factory=dict)
    chains: dict[str, FallbackChain] = field(default_factory=dict)
    conversations: dict[str, Conversation] = field(default_factory=dict)
    observers: list[ReplyObserver] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    usage: UsageAccounting | None = None  # token/cost rows per reply, daily budgets


def provider_config(name: str, p: ProviderSettings, settings: Settings) -> ProviderConfig:
    """Map one ``[providers.NAME]`` table to the registry's plain values.

    A key is required when the kind needs one (or ``api_key_env`` names a
    variable): a missing key is a ``ConfigError`` at start, not a 401 later.
    """
    key_name = f"providers.{name}.api_key_env"
    preset = PRESETS.get(p.kind)
    if p.api_key_env:
        api_key = settings.require_secret(p.api_key_env, key=key_name)
    elif preset is not None and preset.needs_key:
        raise ConfigError(
            f"{settings.source}: {key_name}: required for kind '{p.kind}' "
            f"(name the environment variable that holds the key)"
        )
    else:
        api_key = None
    return ProviderConfig(
        name=name,
        kind=p.kind,
        model=p.model,
        api_key=api_key,
        base_url=p.base_url,
        timeout_s=p.timeout_s,
        first_token_timeout_s=p.first_token_timeout_s,
        idle_timeout_s=p.idle_timeout_s,
        fail_max=p.fail_max or settings.chain.fail_max,
        reset_timeout_s=p.reset_timeout_s or settings.chain.reset_timeout_s,
        temperature=p.temperature,
        vision=p.vision,
        tools=p.tools,
        context_window=p.context_window,
        max_output_tokens=p.max_output_tokens,
        price_input_per_mtok=p.price_input_per_mtok,
        price_output_per_mtok=p.price_output_per_mtok,
        model_path=p.model_path,
        threads=p.threads,
        region=p.region,
        profile=p.profile,
        endpoint_url=p.endpoint_url,
    )


def platform_runners(app: App) -> list[tuple[str, Runner]]:
    """``(label, runner)`` for every platform adapter the config enables.

    Platform adapters add themselves here (one line each); ``boternity run``
    runs them all until interrupted. The terminal is not listed: it is
    ``boternity chat``.
    """
    runners: list[tuple[str, Runner]] = []
    return runners


@asynccontextmanager
async def build_app(settings: Settings) -> AsyncIterator[App]:
    """Start everything the settings describe; stop it all on exit."""
    configs = {n: provider_config(n, p, settings) for n, p in settings.providers.items()}
    used = {name for bot in settings.bots.values() for name in bot.chain}
    async with AsyncExitStack() as stack:
        database = await stack.enter_async_context(
            Database(settings.storage.resolved_database_url())
        )
        app = App(
            settings=settings,
            database=database,
            messages=SqlConversationStore(database),
            breakers=Breakers(fail_max=settings.chain.fail_max,
                              reset_timeout_s=settings.chain.reset_timeout_s),
        )
        for name, config in configs.items():
            if name not in used:
                continue  # configured but in no chain: do not start it (a local model is heavy)
            provider = build_provider(config)
            if hasattr(provider, "__aenter__"):
                provider = await stack.enter_async_context(provider)  # type: ignore[arg-type]
            app.providers[name] = provider
            app.breakers.configure(name, fail_max=config.fail_max,
                                   reset_timeout_s=config.reset_timeout_s)
        app.usage = UsageAccounting(
            SqlUsageStore(database),
            prices={n: Price(p.price_input_per_mtok, p.price_output_per_mtok)
                    for n, p in settings.providers.items()},
            budgets={n: Budget(b.budget_usd_per_day, b.user_budget_usd_per_day)
                     for n, b in settings.bots.items()},
        )
        app.observers.append(app.usage)
        for bot_name, bot in settings.bots.items():
            chain = FallbackChain([app.providers[n] for n in bot.chain], app.breakers,
                                  name=bot_name, skip=app.usage.skip_for(bot_name))
            app.chains[bot_name] = chain
            app.conversations[bot_name] = Conversation(
                bot=bot_name,
                persona=bot.persona,
                chain=chain,
                store=app.messages,
                footer=bot.footer,
                history_messages=bot.history_messages,
                observers=app.observers,  # shared list: wiring added later is seen
                provider_notes={
                    n: label for n in bot.chain
                    if (label := getattr(app.providers[n], "label", ""))
                },
            )
        log.info("started %d bot(s): %s", len(app.conversations), ", ".join(app.conversations))
        yield app
