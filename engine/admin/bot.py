"""The other admin operations of a bot, platform-neutral: provider status, files,
persona and usage (``/provider status``, ``/files``, ``/bot persona``, ``/usage``).

Each is a small class that receives its dependencies in its constructor;
platform commands only parse arguments and render results. Errors are
``AdminError`` (``engine.errors``) with a message fit to show to an admin.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from engine.errors import AdminError
from engine.ports import FileStore
from engine.types import Failure, IncomingMessage, Reply, StoredFile
from engine.usage import UsageStore, usage_report


@dataclass(frozen=True)
class LastServed:
    """Who served the last reply of a bot, and what failed on the way."""

    served_by: str | None
    model: str | None
    failures: tuple[Failure, ...]
    error: str | None
    at: datetime


class LastReplies:
    """A ``ReplyObserver`` that remembers each bot's last reply (for ``/provider status``)."""

    def __init__(self) -> None:
        self._last: dict[str, LastServed] = {}

    async def on_reply(self, message: IncomingMessage, reply: Reply) -> None:
        self._last[message.bot] = LastServed(
            reply.served_by, reply.model, reply.failures, reply.error, datetime.now(UTC))

    def last(self, bot: str) -> LastServed | None:
        return self._last.get(bot)


class StatusSource(Protocol):
    """A fallback chain as ``/provider status`` sees it."""

    def status(self) -> Sequence[Any]: ...


@dataclass
class ProviderAdmin:
    """Provider status per bot: each chain's breakers plus the last reply's server."""

    chains: Mapping[str, StatusSource]
    last: LastReplies

    def status(self, bot: str) -> tuple[list[dict[str, Any]], LastServed | None]:
        if bot not in self.chains:
            raise AdminError(f"unknown bot '{bot}'")
        rows = [_as_dict(row) for row in self.chains[bot].status()]
        return rows, self.last.last(bot)


def _as_dict(row: Any) -> dict[str, Any]:
    if isinstance(row, Mapping):
        return dict(row)
    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        return dataclasses.asdict(row)
    return {k: v for k, v in vars(row).items() if not k.startswith("_")}


@dataclass
class FileAdmin:
    """Stored attachments of a bot: list and delete."""

    files: FileStore

    async def list(self, bot: str, *, chat: str | None = None, limit: int = 20) -> list[StoredFile]:
        return await self.files.recent(bot, chat=chat, limit=limit)

    async def delete(self, bot: str, file_id: int) -> bool:
        return await self.files.delete(bot, file_id)


class HasPersona(Protocol):
    persona: str


@dataclass
class PersonaAdmin:
    """Show or change a bot's persona for this process (the config file stays the truth)."""

    conversations: Mapping[str, HasPersona]

    def get(self, bot: str) -> str:
        if bot not in self.conversations:
            raise AdminError(f"unknown bot '{bot}'")
        return self.conversations[bot].persona

    def set(self, bot: str, persona: str) -> str:
        persona = persona.strip()
        if not persona or len(persona) > 4000:
            raise AdminError("a persona is 1 to 4000 characters")
        self.get(bot)
        self.conversations[bot].persona = persona
        return persona


@dataclass
class UsageAdmin:
    """``/usage``: tokens and cost per bot, provider and day (``engine.usage``).

    ``report`` returns Markdown: the aligned table inside a code fence, so
    chat platforms keep its columns.
    """

    store: UsageStore

    async def report(self, bot: str | None = None, *, days: int = 7) -> str:
        if not 1 <= days <= 366:
            raise AdminError("days must be 1 to 366")
        return f"```\n{await usage_report(self.store, bot=bot, days=days)}\n```"
