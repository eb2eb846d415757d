"""Long-term memory, wired: the embedding model, the LanceDB stores, the recall
log and the extraction queue, started only when a bot has memory enabled.

Part of the composition root. lancedb, pyarrow and fastembed take seconds to
import and load, so each piece opens on its first use, in a worker thread:

- the embedding model at the first ``embed`` (listing, exporting, forgetting
  and verifying memories never embed), and its query model at the first
  search (adding, importing and reembedding only store);
- each LanceDB store at its first call (``memory why`` reads only the SQL
  recall log, so it never opens LanceDB);
- the SQL recall log at its first call (``LazyRecallLog``);
- and a bot's recall opens nothing while the memory directory holds no table
  (the demo, whose local model never extracts facts, never pays for memory).

``start_memory(..., lazy=False)`` (``boternity run``) opens everything at
start instead: a service should fail at start on a bad ``memory_uri``, and its
first reply should not wait for the model.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Generator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from adapters.wiring import scaleout
from adapters.wiring.app import App, imported
from adapters.wiring.settings import Settings
from engine.admin.memory import BotInfo, MemoryAdmin
from engine.background import Background
from engine.memory.policy import BotMemory, MemoryConfig
from engine.ports import MemoryStore, RecallLog, ReplyObserver, SharedMemoryStore
from engine.providers.fallback import FallbackChain
from engine.types import Fact, IncomingMessage, RecallRecord, Reply
from persistence.sql.chain_heads import SqlChainHeads
from persistence.sql.provenance import learned_in
from persistence.vectors.embeddings import DIMENSION, MODEL_NAME, FastEmbedder

T = TypeVar("T")


class Once(Generic[T]):
    """Opens one resource at the first ``get()``; concurrent callers share it."""

    def __init__(self, opener: Callable[[], Awaitable[T]]) -> None:
        self._opener = opener
        self._lock = asyncio.Lock()
        self.value: T | None = None

    async def get(self) -> T:
        if self.value is None:
            async with self._lock:
                if self.value is None:
                    self.value = await self._opener()
        return self.value


class _Call:
    """One call forwarded to a store opened on demand: awaited, or iterated
    (``iterate`` is an async generator)."""

    def __init__(self, once: Once[Any], name: str, *args: Any, **kwargs: Any) -> None:
        self._once, self._name, self._args, self._kwargs = once, name, args, kwargs

    async def _method(self) -> Any:
        return getattr(await self._once.get(), self._name)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._result().__await__()

    async def _result(self) -> Any:
        return await (await self._method())(*self._args, **self._kwargs)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._items()

    async def _items(self) -> AsyncIterator[Any]:
        async for item in (await self._method())(*self._args, **self._kwargs):
            yield item


class Deferred:
    """A memory store that opens at its first method call (see module docstring)."""

    def __init__(self, once: Once[Any]) -> None:
        self.once = once

    def __getattr__(self, name: str) -> Callable[..., _Call]:
        if name.startswith("_"):
            raise AttributeError(name)
        return functools.partial(_Call, self.once, name)


class LazyEmbedder:
    """The shared embedder, loaded at the first ``embed``."""

    model_name = MODEL_NAME
    dimension = DIMENSION

    def __init__(self, load: Callable[[], Awaitable[FastEmbedder]]) -> None:
        self.once = Once(load)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return await (await self.once.get()).embed(texts)

    async def embed_query(self, text: str) -> list[float]:
        return await (await self.once.get()).embed_query(text)

    async def warm(self) -> None:
        """Load the model and its query model now (both load at first use otherwise)."""
        await (await self.once.get()).warm()


@dataclass
class MemoryParts:
    embedder: LazyEmbedder
    store: MemoryStore
    shared: SharedMemoryStore
    recall_log: RecallLog
    jobs: Background
    stores: tuple[Once[Any], Once[Any]]  # own and shared LanceDB stores
    local_dir: Path | None  # the LanceDB directory; None for an object store URI

    @property
    def opened(self) -> bool:
        return any(once.value is not None for once in self.stores)

    async def open_all(self) -> None:
        await self.embedder.warm()  # with the query model: a reply's question needs it
        for once in self.stores:
            await once.get()
        if isinstance(self.recall_log, LazyRecallLog):
            await self.recall_log.once.get()  # a recall is recorded: needed too

    def may_have_tables(self) -> bool:
        """False only when the local memory directory surely holds no table yet."""
        if self.opened or self.local_dir is None:
            return True
        try:
            return any(p.suffix == ".lance" for p in self.local_dir.iterdir())
        except FileNotFoundError:
            return False


async def _enter(upgraded: Once[bool], stack: AsyncExitStack, module: str, cls: str,
                 *args: Any, **kwargs: Any) -> Any:
    await upgraded.get()
    # The import of lancedb and pyarrow takes about a second: not on the event loop.
    store_class = getattr(await imported(module), cls)
    return await stack.enter_async_context(await store_class.open(*args, **kwargs))


async def start_memory(stack: AsyncExitStack, settings: Settings, app: App, *,
                       lazy: bool = False) -> MemoryParts | None:
    """The embedding model, the LanceDB stores, the recall log and the extraction queue.

    Entered after the providers, so on exit the extraction queue drains
    first (while stores and providers are still open), then the stores close
    (a store opened later, on demand, still closes after the queue drained).
    """
    bots = settings.bots
    if not any(bot.memory.enabled for bot in bots.values()):
        return None
    storage = settings.storage
    threads = max(b.memory.embedding_threads for b in bots.values())
    embedder = LazyEmbedder(functools.partial(FastEmbedder.load, storage.data_dir,
                                              threads=threads))
    uri, options = storage.resolved_memory_uri(), scaleout.memory_storage_options(settings)
    stores = await stack.enter_async_context(AsyncExitStack())
    # Stored memories are upgraded once, before either store opens (the shared
    # store reads its chain head on open).
    upgraded: Once[bool] = Once(functools.partial(upgrade_stored_memories, app, uri, options))
    own: Once[Any] = Once(functools.partial(
        _enter, upgraded, stores, "persistence.vectors.memory", "LanceMemoryStore", uri,
        embedder, storage_options=options, cache_mb=storage.memory_cache_mb))
    shared: Once[Any] = Once(functools.partial(
        _enter, upgraded, stores, "persistence.vectors.shared", "SharedMemory", uri, embedder,
        storage_options=options, writer_lock=scaleout.writer_lock(app, "shared-memory"),
        heads=SqlChainHeads(app.database),  # the chain head outside LanceDB
        cache_mb=storage.memory_cache_mb))
    parts = MemoryParts(
        embedder, cast(MemoryStore, Deferred(own)), cast(SharedMemoryStore, Deferred(shared)),
        LazyRecallLog(app.database) if lazy else await _open_recall_log(app.database),
        await stack.enter_async_context(Background(name="memory")),
        (own, shared), None if "://" in uri else Path(uri))
    if not lazy:
        await parts.open_all()
        app.ready_checks["lancedb"] = scaleout.lancedb_check(await own.get())
    app.memory_jobs = parts.jobs
    app.memory_admin = MemoryAdmin(
        parts.store, shared=parts.shared, recall_log=parts.recall_log,
        bots={n: BotInfo(n, b.trust_level, tuple(b.trust_groups)) for n, b in bots.items()},
    )
    return parts


class LazyRecallLog:
    """The SQL recall log, imported at its first call: it loads SQLAlchemy's
    PostgreSQL dialect, which a chat that recalls nothing never needs."""

    def __init__(self, database: Any) -> None:
        self.once: Once[RecallLog] = Once(functools.partial(_open_recall_log, database))

    async def record(self, record: RecallRecord) -> None:
        await (await self.once.get()).record(record)

    async def last(self, bot: str, chat: str) -> RecallRecord | None:
        return await (await self.once.get()).last(bot, chat)

    async def chats(self, bot: str, *, limit: int = 20) -> list[RecallRecord]:
        return await (await self.once.get()).chats(bot, limit=limit)

    async def scrub(self, bot: str, fact_ids: Collection[str]) -> int:
        return await (await self.once.get()).scrub(bot, fact_ids)


async def _open_recall_log(database: Any) -> RecallLog:
    module = await imported("persistence.sql.recall_log")
    return cast(RecallLog, module.SqlRecallLog(database))


async def upgrade_stored_memories(app: App, uri: str, options: dict[str, str] | None) -> bool:
    """Rewrite old user keys and place pre-scope facts (``persistence/vectors/rekey.py``).

    Before the stores open (the shared store reads its chain head on open);
    under the shared-memory writer lock when workers share one table.
    """
    # lancedb and pyarrow take about a second to import: not on the event loop.
    await imported("persistence.vectors.rekey")
    if app.redis is None:
        await imported("filelock")  # the writer lock below is a file lock
    from persistence.vectors.rekey import upgrade_memory
    from persistence.vectors.tables import connect

    async def place(bot: str, user: str, at: datetime) -> tuple[str, str]:
        return await learned_in(app.database, bot, user, at)

    async with scaleout.writer_lock(app, "shared-memory")():
        await upgrade_memory(await connect(uri, options), place,
                             heads=SqlChainHeads(app.database))
    return True


class LazyRecall:
    """A bot's ``MemoryPolicy`` that opens nothing to recall from an empty memory."""

    def __init__(self, inner: BotMemory, parts: MemoryParts) -> None:
        self.inner = inner
        self._parts = parts

    async def recall(self, message: IncomingMessage) -> list[Fact]:
        if not self._parts.opened and not await asyncio.to_thread(self._parts.may_have_tables):
            return []  # no table to search: no embedding model, no LanceDB
        return await self.inner.recall(message)

    def learn(self, message: IncomingMessage, reply: Reply) -> None:
        self.inner.learn(message, reply)  # a fact to write opens the store then


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
