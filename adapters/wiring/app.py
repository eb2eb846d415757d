"""What a running Boternity holds: the ``App`` that the composition root fills.

``adapters/wiring/build.py`` (``build_app``) creates it and fills it in
order; the scale-out part (``scaleout.py``) and the platform part
(``platforms.py``) read and extend it. It lives in its own module so that
those parts import it without importing ``build_app`` (no import circle).
Adapters outside ``wiring/`` receive the parts they need, never the ``App``;
the CLI reads it to run one command.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Types only: importing them here would load aiohttp, prometheus, the
    # engine and SQLAlchemy for every command, before it knows what it needs.
    from adapters.chat.dedupe import Dedupe
    from adapters.chat.handler import Inflight
    from adapters.chat.outbound import RateBudget
    from adapters.ops.metrics import Metrics
    from adapters.ops.server import Check, OpsServer
    from adapters.wiring.settings import Settings
    from engine.admin.memory import MemoryAdmin
    from engine.background import Background
    from engine.conversation import Conversation
    from engine.memory.policy import BotMemory
    from engine.ports import ConversationStore, Provider, ReplyObserver
    from engine.providers.fallback import Breakers, FallbackChain
    from engine.usage import UsageAccounting
    from persistence.sql.database import Database

# One import at a time: two threads importing lancedb at once (the own and the
# shared store opening together) made one see it partially initialized.
_IMPORTING = threading.Lock()


def _import(module: str) -> ModuleType:
    with _IMPORTING:
        return importlib.import_module(module)


async def imported(module: str) -> ModuleType:
    """``module``, imported in a worker thread: the provider SDKs, aiohttp,
    Redis and LanceDB take 0.1-1.2 s each to import, time the event loop
    must not spend (start-up work of the wiring, or memory opened mid-chat)."""
    return await asyncio.to_thread(_import, module)


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
    # scale-out and ops (wiring/scaleout.py): None = one process, in-memory defaults
    metrics: Metrics | None = None
    redis: Any = None  # persistence.redis.state.RedisState when [storage] redis_url is set
    budget: RateBudget | None = None  # shared per-chat pacing: give it to every Outbound
    dedupe: Dedupe | None = None  # shared event claims: give it to every platform adapter
    inflight: Inflight | None = None  # replies in flight: give it to every Handler
    ready_checks: dict[str, Check] = field(default_factory=dict)  # /readyz; platforms add theirs
    ops: OpsServer | None = None
