"""Long-term memory, wired: the embedding model, the LanceDB stores, the recall
log and the extraction queue, started only when a bot has memory enabled.

Part of the composition root. lancedb, pyarrow and fastembed are imported
inside ``start_memory``: they take seconds to import, and commands without
memory (``providers``, ``usage``) never pay for them.
"""

from __future__ import annotations

import contextlib
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from adapters.wiring import scaleout
from adapters.wiring.app import App
from adapters.wiring.settings import Settings
from engine.admin.memory import BotInfo, MemoryAdmin
from engine.background import Background
from engine.memory.policy import BotMemory, MemoryConfig
from engine.ports import ReplyObserver
from engine.providers.fallback import FallbackChain
from persistence.sql.chain_heads import SqlChainHeads
from persistence.sql.provenance import learned_in
from persistence.sql.recall_log import SqlRecallLog

if TYPE_CHECKING:
    from persistence.vectors.embeddings import FastEmbedder
    from persistence.vectors.memory import LanceMemoryStore
    from persistence.vectors.shared import SharedMemory


@dataclass
class MemoryParts:
    embedder: FastEmbedder
    store: LanceMemoryStore
    shared: SharedMemory
    recall_log: SqlRecallLog
    jobs: Background


async def start_memory(stack: AsyncExitStack, settings: Settings, app: App) -> MemoryParts | None:
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
    await upgrade_stored_memories(app, uri, options)
    store = await stack.enter_async_context(
        await LanceMemoryStore.open(uri, embedder, storage_options=options))
    shared = await stack.enter_async_context(
        await SharedMemory.open(uri, embedder, storage_options=options,
                                writer_lock=scaleout.writer_lock(app, "shared-memory"),
                                heads=SqlChainHeads(app.database)))  # the head outside LanceDB
    parts = MemoryParts(embedder, store, shared, SqlRecallLog(app.database),
                         await stack.enter_async_context(Background(name="memory")))
    app.memory_jobs = parts.jobs
    app.memory_admin = MemoryAdmin(
        store, shared=shared, recall_log=parts.recall_log,
        bots={n: BotInfo(n, b.trust_level, tuple(b.trust_groups)) for n, b in bots.items()},
    )
    return parts


async def upgrade_stored_memories(app: App, uri: str, options: dict[str, str] | None) -> None:
    """Rewrite old user keys and place pre-scope facts (``persistence/vectors/rekey.py``).

    Before the stores open (the shared store reads its chain head on open);
    under the shared-memory writer lock when workers share one table.
    """
    from persistence.vectors.rekey import upgrade_memory
    from persistence.vectors.tables import connect

    async def place(bot: str, user: str, at: datetime) -> tuple[str, str]:
        return await learned_in(app.database, bot, user, at)

    lock = scaleout.writer_lock(app, "shared-memory")
    async with lock() if lock is not None else contextlib.nullcontext():
        await upgrade_memory(await connect(uri, options), place,
                             heads=SqlChainHeads(app.database))


def bot_memory(parts: MemoryParts | None, settings: Settings, bot_name: str,
                chain: FallbackChain, usage: ReplyObserver | None) -> BotMemory | None:
    bot = settings.bots[bot_name]
    if parts is None or not bot.memory.enabled:
        return None
    m = bot.memory
    config = MemoryConfig(
        bot=bot_name, top_k=m.top_k, min_score=m.min_score, extract=m.extract,
        extract_with_local=m.extract_with_local, trust_groups=tuple(bot.trust_groups),
        recall_across_chats=m.recall_across_chats,
        local_providers=frozenset(n for n, p in settings.providers.items() if p.kind == "local"),
    )
    return BotMemory(config, store=parts.store, embedder=parts.embedder, jobs=parts.jobs,
                     shared=parts.shared, chain=chain, recall_log=parts.recall_log,
                     usage=usage)  # extraction tokens are recorded and budgeted too
