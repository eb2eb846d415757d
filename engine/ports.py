"""Ports: what the engine needs from the outside, one Protocol each.

``persistence/`` implements the storage ports, ``engine/providers/`` the
Provider port. The engine depends on these Protocols only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from engine.types import (
    Capabilities,
    Chunk,
    CompletionRequest,
    Fact,
    IncomingMessage,
    Reply,
    Role,
    StoredMessage,
    TrustLevel,
)


@runtime_checkable
class Provider(Protocol):
    """An LLM that streams a completion.

    ``stream`` yields text chunks and, when the peer reports it, one chunk with
    usage. It raises only ``engine.errors.ProviderError`` subclasses, possibly
    after some chunks were already yielded (a mid-stream failure).
    """

    name: str
    model: str
    capabilities: Capabilities

    def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]: ...


class ConversationStore(Protocol):
    """Conversation history per (bot, chat)."""

    async def add(
        self,
        *,
        bot: str,
        chat: str,
        role: Role,
        content: str,
        user: str = "",
        platform: str = "",
        served_by: str | None = None,
    ) -> int:
        """Commit one message durably and return its id."""
        ...

    async def history(self, bot: str, chat: str, limit: int = 50) -> list[StoredMessage]:
        """The last ``limit`` messages of a chat, oldest first."""
        ...


class Embedder(Protocol):
    """Text to unit-length vectors. Implementations never block the event loop."""

    model_name: str
    dimension: int

    async def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


class MemoryStore(Protocol):
    """A bot's own long-term memories (one table per bot)."""

    async def add(self, fact: Fact) -> Fact: ...

    async def search(
        self, bot: str, query: str, *, users: Sequence[str], limit: int = 5
    ) -> list[Fact]:
        """Nearest memories about one of ``users`` ("" = general), best first."""
        ...


class SharedMemoryStore(Protocol):
    """Memories shared between bots, always filtered by the reader's trust."""

    async def publish(self, fact: Fact, level: TrustLevel, group: str = "") -> Fact: ...

    async def search(
        self, reader_bot: str, groups: Sequence[str], query: str, *,
        users: Sequence[str], limit: int = 5,
    ) -> list[Fact]: ...


class MemoryPolicy(Protocol):
    """What the reply pipeline asks of long-term memory (``engine/memory.py``).

    ``recall`` runs before the reply (it may return [] on any storage trouble:
    a reply never fails because memory did). ``learn`` schedules fact
    extraction in the background and returns at once: the reply never waits.
    """

    async def recall(self, message: IncomingMessage) -> list[Fact]: ...

    def learn(self, message: IncomingMessage, reply: Reply) -> None: ...


class Replier(Protocol):
    """One bot's reply pipeline, as adapters see it (``engine.Conversation``).

    Yields text deltas (``str``) as they stream, then exactly one ``Reply``
    as the last item. Never raises for provider trouble: that ends up in
    ``Reply.error`` with a user-facing text.
    """

    def reply(self, message: IncomingMessage) -> AsyncIterator[str | Reply]: ...
