"""Conversation admin, platform-neutral: list a bot's chats, read one, reset one.

``ConversationAdmin`` receives a ``ChatHistory`` (the SQL conversation store
implements it) and the configured bot names; errors are ``AdminError``.
A reset deletes the chat's stored history, so the bot answers that chat
afresh; long-term memories stay (forget them in the memory admin).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from engine.errors import AdminError
from engine.types import StoredMessage


@dataclass(frozen=True)
class ChatSummary:
    chat: str
    messages: int
    last_at: datetime | None


class ChatHistory(Protocol):
    async def history(self, bot: str, chat: str, limit: int = 50) -> list[StoredMessage]: ...
    async def chats(self, bot: str, *, limit: int = 100) -> list[ChatSummary]: ...
    async def clear(self, bot: str, chat: str) -> int: ...


@dataclass
class ConversationAdmin:
    store: ChatHistory
    bots: Collection[str]

    def _bot(self, bot: str) -> None:
        if bot not in self.bots:
            raise AdminError(f"unknown bot '{bot}'")

    async def chats(self, bot: str, *, limit: int = 100) -> list[ChatSummary]:
        self._bot(bot)
        return await self.store.chats(bot, limit=min(max(limit, 1), 1000))

    async def read(self, bot: str, chat: str, *, limit: int = 200) -> list[StoredMessage]:
        self._bot(bot)
        return await self.store.history(bot, chat, limit=min(max(limit, 1), 2000))

    async def reset(self, bot: str, chat: str) -> int:
        self._bot(bot)
        return await self.store.clear(bot, chat)
