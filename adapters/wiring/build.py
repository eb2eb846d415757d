"""The composition root: settings in, a running ``App`` out.

``build_app(settings)`` is the one place that reads the whole ``Settings``.
Everything it builds receives plain values. It is an async context manager
over one ``AsyncExitStack``: resources start in order (every provider that
owns a resource, e.g. the local llama.cpp server, lazily, then the database,
scale-out and ops, then memory) and a failed start closes whatever had
started, in reverse. Importing this module is cheap: the storage and memory
wiring (SQLAlchemy) is imported by ``build_app`` once the providers are
built (``STORAGE_MODULES``), so a local model starts loading before it.

    async with build_app(settings) as app:
        async for item in app.conversations["demo"].reply(message): ...

The root is one room, ``adapters/wiring/``, split so each file stays small:
``settings.py`` (the TOML contract), ``app.py`` (the ``App`` it fills),
``providers.py`` (provider settings to plain values), ``memory.py``
(long-term memory), ``scaleout.py`` (Redis-shared state, metrics, the ops
server) and ``platforms.py`` (each bot's chat-platform adapters, for
``boternity run``). Only this room imports ``persistence``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

from adapters.wiring import heap, scaleout
from adapters.wiring.app import App, imported
from adapters.wiring.providers import configure_breakers, used_configs
from adapters.wiring.settings import Settings
from engine.conversation import Conversation
from engine.ports import MemoryPolicy
from engine.providers.fallback import Breakers, FallbackChain
from engine.providers.local import LocalProvider
from engine.providers.openai_compat import OpenAICompatProvider
from engine.providers.registry import build_provider, sdk_module
from engine.usage import Budget, Price, UsageAccounting

if TYPE_CHECKING:
    from adapters.wiring.memory import MemoryParts

# What build_app imports once the providers are built, in a worker thread:
# SQLAlchemy and the memory wiring, 0.4-0.9 s of CPU, which a local model that
# answers a chat first (the demo) loads beside, in its own process, instead
# of after (the first line waits for both). Importing this module costs little.
STORAGE_MODULES = ("persistence.sql.database", "persistence.sql.conversations",
                   "adapters.wiring.memory")

# The modules declaring the relational tables (persistence.sql.migrations.TABLES),
# imported before the database starts: a new one is then created from them at
# once instead of by the migrations (see persistence.sql.database).
TABLE_MODULES = ("persistence.sql.tables", "persistence.sql.files", "persistence.sql.usage",
                 "persistence.sql.recall_log", "persistence.sql.chain_heads")

log = logging.getLogger(__name__)


@asynccontextmanager
async def build_app(settings: Settings, *, with_memory: bool = True, lazy: bool = False,
                    serve: bool = True, with_bots: bool = True,
                    chat_bot: str | None = None) -> AsyncIterator[App]:
    """Start everything the settings describe; stop it all on exit.

    ``with_memory=False`` starts no long-term memory at all (no embedding model,
    no LanceDB, no extraction queue; ``app.memories`` stays empty), for
    commands that only read providers or usage. Replies still work, without
    recall. ``lazy=True`` opens each memory piece on its first use
    (``adapters/wiring/memory.py``) and imports no provider SDK at start
    (a provider imports its own at its first request; ``warm_up`` loads both
    beforehand, in worker threads): what the one-shot commands and the
    terminal chat use. ``serve=False`` starts no ``[http]`` server and no
    metrics: a command run beside the service must not take its port.
    ``with_bots=False`` starts no provider, chain nor conversation (nor imports
    a provider SDK): for admin commands that read the stores only.
    ``chat_bot``: the bot whose first reply the caller is about to wait for
    (``boternity chat``); when its chain starts with a local model, that model
    starts loading (in its own process) before anything else starts or is
    imported (``STORAGE_MODULES``).
    """
    configs = used_configs(settings) if with_bots else {}
    async with AsyncExitStack() as stack:
        providers = {}
        for name, config in configs.items():  # cheap: no SDK is imported, nothing connects
            provider = build_provider(config)
            if hasattr(provider, "__aenter__"):
                provider = await stack.enter_async_context(provider)  # type: ignore[arg-type]
            providers[name] = provider
        if chat_bot is not None and isinstance(
                first := providers[settings.bots[chat_bot].chain[0]], LocalProvider):
            await first.start()  # returns at once; the model loads while the rest starts
        # TABLE_MODULES: so a new database is created at once (not migrated)
        for module in (*STORAGE_MODULES, *TABLE_MODULES):
            await imported(module)
        from adapters.wiring.memory import LazyRecall, bot_memory, start_memory
        from persistence.sql.conversations import SqlConversationStore
        from persistence.sql.database import Database
        from persistence.sql.usage import SqlUsageStore

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
        # /readyz answers while the start goes on (imports run off the loop): not
        # ready until everything started and `run` registered its platforms.
        app.ready_checks["starting"] = _not_yet
        # Redis-shared state, metrics, ops endpoint
        await scaleout.start(stack, app, serve=serve)
        if configs:
            await imported("pybreaker")  # imports redis: 0.1-0.2 s, not on the loop
            app.providers.update(providers)
            configure_breakers(app.breakers, configs)
            if not lazy:  # the SDKs the chains use (openai, aioboto3): not on the loop either
                await _prepare(app, list(configs))
        app.usage = UsageAccounting(
            SqlUsageStore(database),
            prices={n: Price(p.price_input_per_mtok, p.price_output_per_mtok)
                    for n, p in settings.providers.items()},
            budgets={n: Budget(b.budget_usd_per_day, b.user_budget_usd_per_day)
                     for n, b in settings.bots.items()},
        )
        app.observers.append(app.usage)
        memory_parts = (await start_memory(stack, settings, app, lazy=lazy)
                        if with_memory else None)
        app.extras["memory_parts"] = memory_parts  # what warm_up opens
        for bot_name, bot in settings.bots.items() if with_bots else ():
            chain = FallbackChain([app.providers[n] for n in bot.chain], app.breakers,
                                  name=bot_name, skip=app.usage.skip_for(bot_name))
            app.chains[bot_name] = chain
            memory = bot_memory(memory_parts, settings, bot_name, chain,
                                 app.usage.extraction)  # rows of kind "extraction"
            policy: MemoryPolicy | None = memory
            if memory is not None and memory_parts is not None:
                app.memories[bot_name] = memory
                policy = LazyRecall(memory, memory_parts) if lazy else memory
            if policy is not None and app.metrics is not None:
                from adapters.ops.metrics import TimedMemory

                policy = TimedMemory(policy, app.metrics)
            app.conversations[bot_name] = Conversation(
                bot=bot_name,
                persona=bot.persona,
                chain=chain,
                store=app.messages,
                memory=policy,
                footer=bot.footer,
                history_messages=bot.history_messages,
                max_output_tokens=bot.max_output_tokens,
                observers=app.observers,  # shared list: wiring added later is seen
                provider_notes={
                    n: label for n in bot.chain
                    if (label := getattr(app.providers[n], "label", ""))
                },
            )
        log.info("started %d bot(s): %s", len(app.conversations), ", ".join(app.conversations))
        del app.ready_checks["starting"]  # the caller adds its checks before it awaits
        heap.settle()  # what started stays: out of the cyclic GC's passes
        yield app


async def _not_yet() -> bool:
    return False


async def _prepare(app: App, names: list[str]) -> None:
    """Import the SDKs of these providers in worker threads, one at a time
    (``imported``), and build their clients."""
    configs = used_configs(app.settings)
    for module in dict.fromkeys(sdk_module(configs[name].kind) for name in names):
        await imported(module)
    for name in names:
        provider = app.providers[name]
        if isinstance(provider, OpenAICompatProvider):
            await provider.prepare()


async def warm_up(app: App, bot: str) -> None:
    """Load now, in worker threads, what the first reply of ``bot`` needs: the
    SDKs of its chain's providers, the local model when it comes first in the
    chain (the demo; in its own process) and, when there are memories to recall
    (``MemoryParts.may_have_tables``), the embedding model and LanceDB.

    ``boternity chat`` starts it beside the prompt, so the loads overlap the
    wait for the first line, and awaits it before the first reply. Built
    with ``lazy=False``, only the local model is left to load.
    """
    names = app.settings.bots[bot].chain
    await _prepare(app, names)
    first = app.providers[names[0]]
    if isinstance(first, LocalProvider):
        # It answers the first line, so its model is needed anyway; it loads in a
        # process of its own (started by build_app(chat_bot=...), else now).
        await first.serving()
    parts: MemoryParts | None = app.extras.get("memory_parts")
    if parts is not None and bot in app.memories and \
            await asyncio.to_thread(parts.may_have_tables):
        await parts.open_all()
