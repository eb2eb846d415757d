"""What the admin API and the console read and change, as plain JSON-ready dicts.

``Sources`` receives the engine's admin objects (``engine/admin/``) from the
composition root; both the JSON API (``api.py``) and the pages
(``pages.py``) call it, so each answer is computed in one place. Parts that
start after the HTTP server (memory, usage) are given as callables read at
request time; a part that is not configured raises ``AdminError`` with a
message fit to show.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from engine.admin.conversations import ConversationAdmin
from engine.admin.live import Connections, ProviderBoard, ReplyLog
from engine.admin.memory import MemoryAdmin
from engine.errors import AdminError
from engine.types import Fact, StoredFile
from engine.usage import UsageStore, day_start


class Files(Protocol):
    """The file store as the console needs it (``persistence.sql.files``)."""

    async def recent(self, bot: str, *, chat: str | None = None,
                     limit: int = 20) -> list[StoredFile]: ...
    async def get(self, bot: str, file_id: int) -> StoredFile | None: ...
    async def delete(self, bot: str, file_id: int) -> bool: ...
    def path(self, stored: StoredFile) -> Path: ...


def plain(value: Any) -> Any:
    """Dataclasses, datetimes and tuples to JSON-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    return value


def fact_dict(fact: Fact) -> dict[str, Any]:
    out: dict[str, Any] = plain(fact)
    return out


@dataclass
class Sources:
    """Everything the console shows (see module docstring)."""

    worker: str  # which process answered (per-process numbers say so)
    board: ProviderBoard
    replies: ReplyLog
    connections: Connections
    chains: Mapping[str, Sequence[str]]  # bot -> provider names, in order
    conversations: ConversationAdmin
    files: Callable[[], Files | None]
    memory: Callable[[], MemoryAdmin | None]
    usage: Callable[[], UsageStore | None]
    shared_state: Callable[[str], Any] | None = None  # async (provider) -> Redis hash

    # --- providers and bots -------------------------------------------------
    async def providers(self) -> list[dict[str, Any]]:
        rows = []
        for state in self.board.states():
            row = plain(state)
            if self.shared_state is not None:
                row["shared"] = await self.shared_state(state.name)
            rows.append(row)
        return rows

    def reset(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = plain(self.board.reset(name))
        return out

    async def bots(self) -> dict[str, Any]:
        connections = await self.connections.poll()
        return {
            "bots": [{"name": bot, "chain": list(chain),
                      "platforms": [plain(c) for c in connections
                                    if c.name.endswith(f":{bot}")]}
                     for bot, chain in self.chains.items()],
            "platforms": [plain(c) for c in connections],
        }

    def recent(self, limit: int = 50, bot: str | None = None) -> list[dict[str, Any]]:
        return [plain(e) for e in self.replies.recent(min(max(limit, 1), 1000), bot=bot)]

    async def overview(self) -> dict[str, Any]:
        today = await self.usage_days(1)
        return {
            "worker": self.worker,
            **self.replies.summary(),
            "per_minute": self.replies.per_minute(60),
            "latencies": [e.latency_s for e in reversed(self.replies.recent(200))
                          if e.served_by],
            "cost_today_usd": round(sum(r["cost_usd"] for r in today), 6),
            **await self.bots(),
        }

    # --- usage ----------------------------------------------------------------
    async def usage_days(self, days: int = 14) -> list[dict[str, Any]]:
        store = self.usage()
        if store is None:
            raise AdminError("usage accounting is not configured")
        if not 1 <= days <= 366:
            raise AdminError("days must be 1 to 366")
        since = day_start(datetime.now(UTC)) - timedelta(days=days - 1)
        return [plain(line) for line in await store.summary(since=since)]

    async def usage_chart(self, days: int = 14) -> dict[str, Any]:
        """Cost per day for each bot/provider: ``{"days": [...], "series": {label: [...]}}``."""
        rows = await self.usage_days(days)
        first = (datetime.now(UTC) - timedelta(days=days - 1)).date()
        labels = [(first + timedelta(days=i)).isoformat() for i in range(days)]
        series: dict[str, list[float]] = defaultdict(lambda: [0.0] * days)
        for row in rows:
            where = labels.index(row["day"]) if row["day"] in labels else None
            if where is not None:
                series[f"{row['bot']}/{row['provider']}"][where] += row["cost_usd"]
        return {"days": labels, "series": dict(series), "rows": rows}

    # --- memory -------------------------------------------------------------
    def _memory(self) -> MemoryAdmin:
        admin = self.memory()
        if admin is None:
            raise AdminError("long-term memory is not enabled")
        return admin

    async def memory_users(self, bot: str) -> list[str]:
        return await self._memory().users(bot)

    async def memory_list(self, bot: str, user: str | None, *, history: bool = True,
                          limit: int = 100) -> list[dict[str, Any]]:
        facts = await self._memory().list_facts(bot, user=user, history=history, limit=limit)
        return [fact_dict(f) for f in facts]

    async def memory_search(self, bot: str, query: str, user: str | None
                            ) -> list[dict[str, Any]]:
        if not query.strip():
            raise AdminError("type something to search for")
        return [fact_dict(f) for f in await self._memory().search(bot, query, user=user)]

    async def memory_forget(self, bot: str, fact_id: str) -> bool:
        return await self._memory().forget(bot, fact_id)

    async def memory_why(self, bot: str, chat: str | None) -> dict[str, Any] | None:
        record = await self._memory().why(bot, chat or None)
        return plain(record) if record is not None else None

    async def shared(self, bot: str, *, verify: bool = False) -> dict[str, Any]:
        admin = self._memory()
        facts = [fact_dict(f) for f in await admin.shared_list(bot, limit=200)]
        out: dict[str, Any] = {"facts": facts, "verify": None}
        if verify:
            report = await admin.verify()
            tampered = set(report.tampered)
            for fact in facts:
                fact["tampered"] = fact["id"] in tampered
            out["verify"] = {**plain(report), "ok": report.ok}
        return out

    # --- files ----------------------------------------------------------------
    def _files(self) -> Files:
        store = self.files()
        if store is None:
            raise AdminError("file storage is not configured")
        return store

    async def file_list(self, bot: str, limit: int = 100) -> list[dict[str, Any]]:
        self._known(bot)
        return [plain(f) for f in await self._files().recent(bot, limit=min(limit, 1000))]

    async def file_get(self, bot: str, file_id: int) -> tuple[StoredFile, Path] | None:
        self._known(bot)
        store = self._files()
        found = await store.get(bot, file_id)
        return (found, store.path(found)) if found is not None else None

    async def file_delete(self, bot: str, file_id: int) -> bool:
        self._known(bot)
        return await self._files().delete(bot, file_id)

    def _known(self, bot: str) -> None:
        if bot not in self.chains:
            raise AdminError(f"unknown bot '{bot}'")
