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
from typing import TYPE_CHECKING, Any

from adapters.chat.dedupe import Dedupe
from adapters.chat.handler import Inflight
from adapters.chat.outbound import RateBudget
from adapters.ops.metrics import Metrics, TimedMemory
from adapters.ops.server import Check, OpsServer
from adapters.wiring import scaleout
from adapters.wiring.settings import ProviderSettings, Settings
from engine.admin import BotInfo, MemoryAdmin
from engine.background import Background
from engine.conversation import Conversation
from engine.errors import ConfigError
from engine.memory.policy import BotMemory, MemoryConfig
from engine.ports import ConversationStore, Provider, ReplyObserver
from engine.providers.fallback import Breakers, FallbackChain
from engine.providers.presets import PRESETS
from engine.providers.registry import ProviderConfig, build_provider
from engine.usage import Budget, Price, UsageAccounting
from persistence.sql.conversations import SqlConversationStore
from persistence.sql.database import Database
from persistence.sql.recall_log import SqlRecallLog
from persistence.sql.usage import SqlUsageStore

if TYPE_CHECKING:
    # Imported where memory starts: lancedb, pyarrow and fastembed take seconds
    # to import, and commands without memory (`providers`, `usage`) skip them.
    from persistence.vectors.embeddings import FastEmbedder
    from persistence.vectors.memory import LanceMemoryStore
    from persistence.vectors.shared import SharedMemory

log = logging.getLogger(__name__)

# A platform adapter's main loop: runs until cancelled.
Runner = Callable[[], Coroutine[Any, Any, None]]


@dataclass
class App:
    """Everything a running Boternity holds; adapters read what they need."""

    settings: Settings
    database: Database
    messages: ConversationStore  # SQL; with Redis, wrapped so a taken-over reply stores once
    breakers: Breakers
    providers: dict[str, Provider] = field(default_factory=dict)
    chains: dict[str, FallbackChain] = field(default_factory=dict)
    conversations: dict[str, Conversation] = field(default_factory=dict)
    observers: list[ReplyObserver] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    memories: dict[str, BotMemory] = field(default_factory=dict)  # per bot, if enabled
    memory_admin: MemoryAdmin | None = None  # `boternity memory ...`, /memory
    memory_jobs: Background | None = None  # background fact extraction
    usage: UsageAccounting | None = None  # token/cost rows per reply, daily budgets
    # scale-out and ops (adapters/scaleout.py): None = one process, in-memory defaults
    metrics: Metrics | None = None
    redis: Any = None  # persistence.redis.state.RedisState when [storage] redis_url is set
    budget: RateBudget | None = None  # shared per-chat pacing: give it to every Outbound
    dedupe: Dedupe | None = None  # shared event claims: give it to every platform adapter
    inflight: Inflight | None = None  # replies in flight: give it to every Handler
    ready_checks: dict[str, Check] = field(default_factory=dict)  # /readyz; platforms add theirs
    ops: OpsServer | None = None


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
        region=p.region or (_env_region(settings) if p.kind == "bedrock" else None),
        profile=p.profile,
        endpoint_url=p.endpoint_url,
        **(_aws_keys(settings) if p.kind == "bedrock" and not p.profile else {}),
    )


def _env_region(settings: Settings) -> str | None:
    return settings.env.get("AWS_REGION") or settings.env.get("AWS_DEFAULT_REGION") or None


def _aws_keys(settings: Settings) -> dict[str, Any]:
    """AWS keys from .env or the environment, for a Bedrock provider without a profile.

    botocore reads only the real environment; ``.env`` is Boternity's. With
    no keys in either, botocore's chain (profile, SSO, instance role) applies.
    """
    env = settings.env
    secret = settings.secret("AWS_SECRET_ACCESS_KEY", key="AWS_SECRET_ACCESS_KEY")
    if not env.get("AWS_ACCESS_KEY_ID") or secret is None:
        return {}
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": secret,
        "aws_session_token": settings.secret("AWS_SESSION_TOKEN", key="AWS_SESSION_TOKEN"),
    }


def platform_runners(app: App) -> list[tuple[str, Runner]]:
    """``(label, runner)`` for every platform adapter the config enables.

    Platform adapters add themselves here (one line each); ``boternity run``
    runs them all until interrupted. The terminal is not listed: it is
    ``boternity chat``.
    """
    runners: list[tuple[str, Runner]] = []
    from adapters.wiring import platforms  # here: `boternity chat` need not load the platform SDKs

    runners += platforms.runners(app)  # Slack and Discord
    return runners


@dataclass
class _MemoryParts:
    embedder: FastEmbedder
    store: LanceMemoryStore
    shared: SharedMemory
    recall_log: SqlRecallLog
    jobs: Background


async def _start_memory(stack: AsyncExitStack, settings: Settings, app: App) -> _MemoryParts | None:
    """The embedding model, the LanceDB stores, the recall log and the extraction queue.

    Entered after the providers, so on exit the extraction queue drains
    first (while stores and providers are still open), then the stores close.
    """
    bots = settings.bots
    if not any(bot.memory.enabled for bot in bots.values()):
        return None
    from persistence.vectors.embeddings import FastEmbedder
    from persistence.vectors.memory import LanceMemoryStore
    from persistence.vectors.shared import SharedMemory

    storage = settings.storage
    embedder = await FastEmbedder.load(
        storage.data_dir, threads=max(b.memory.embedding_threads for b in bots.values()))
    uri, options = storage.resolved_memory_uri(), scaleout.memory_storage_options(settings)
    store = await stack.enter_async_context(
        await LanceMemoryStore.open(uri, embedder, storage_options=options))
    shared = await stack.enter_async_context(
        await SharedMemory.open(uri, embedder, storage_options=options,
                                writer_lock=scaleout.writer_lock(app, "shared-memory")))
    parts = _MemoryParts(embedder, store, shared, SqlRecallLog(app.database),
                         await stack.enter_async_context(Background(name="memory")))
    app.memory_jobs = parts.jobs
    app.memory_admin = MemoryAdmin(
        store, shared=shared, recall_log=parts.recall_log,
        bots={n: BotInfo(n, b.trust_level, tuple(b.trust_groups)) for n, b in bots.items()},
    )
    return parts


def _bot_memory(parts: _MemoryParts | None, settings: Settings, bot_name: str,
                chain: FallbackChain, usage: ReplyObserver | None) -> BotMemory | None:
    bot = settings.bots[bot_name]
    if parts is None or not bot.memory.enabled:
        return None
    m = bot.memory
    config = MemoryConfig(
        bot=bot_name, top_k=m.top_k, min_score=m.min_score, extract=m.extract,
        extract_with_local=m.extract_with_local, trust_groups=tuple(bot.trust_groups),
        local_providers=frozenset(n for n, p in settings.providers.items() if p.kind == "local"),
    )
    return BotMemory(config, store=parts.store, embedder=parts.embedder, jobs=parts.jobs,
                     shared=parts.shared, chain=chain, recall_log=parts.recall_log,
                     usage=usage)  # extraction tokens are recorded and budgeted too


@asynccontextmanager
async def build_app(settings: Settings, *, with_memory: bool = True) -> AsyncIterator[App]:
    """Start everything the settings describe; stop it all on exit.

    ``with_memory=False`` starts no long-term memory at all (no embedding model,
    no LanceDB, no extraction queue; ``app.memories`` stays empty), for
    commands that only read providers or usage. Replies still work, without
    recall.
    """
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
        await scaleout.start(stack, app)  # Redis-shared state, metrics, ops endpoint
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
        memory_parts = await _start_memory(stack, settings, app) if with_memory else None
        if memory_parts is not None:
            app.ready_checks["lancedb"] = scaleout.lancedb_check(memory_parts.store)
        for bot_name, bot in settings.bots.items():
            chain = FallbackChain([app.providers[n] for n in bot.chain], app.breakers,
                                  name=bot_name, skip=app.usage.skip_for(bot_name))
            app.chains[bot_name] = chain
            memory = _bot_memory(memory_parts, settings, bot_name, chain,
                                 app.usage.extraction)  # rows of kind "extraction"
            if memory is not None:
                app.memories[bot_name] = memory
            app.conversations[bot_name] = Conversation(
                bot=bot_name,
                persona=bot.persona,
                chain=chain,
                store=app.messages,
                memory=TimedMemory(memory, app.metrics) if memory and app.metrics else memory,
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
