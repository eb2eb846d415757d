"""Ports: what the engine needs from the outside, one Protocol each.

``persistence/`` implements the storage ports, ``engine/providers/`` the
Provider port. The engine depends on these Protocols only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from engine.types import (
    Capabilities,
    ChainHead,
    Chunk,
    CompletionRequest,
    Fact,
    Failure,
    IncomingMessage,
    IntegrityReport,
    RecallRecord,
    Reply,
    Role,
    StoredFile,
    StoredMessage,
    TrustLevel,
    Usage,
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


@runtime_checkable
class Transcriber(Protocol):
    """Speech to text, offered by some providers (``transcription_model``).

    ``transcribe`` returns the words heard (possibly empty) and raises only
    ``engine.errors.ProviderError`` subclasses.
    """

    name: str

    async def transcribe(self, audio: bytes, *, filename: str, mime_type: str) -> str: ...


class ChainRun(Protocol):
    """One streamed completion of a chain: iterate the chunks, then read the
    results (final once the chunks are exhausted)."""

    def __aiter__(self) -> AsyncIterator[Chunk]: ...
    @property
    def served_by(self) -> str | None: ...
    @property
    def model(self) -> str | None: ...
    @property
    def failures(self) -> tuple[Failure, ...]: ...
    @property
    def usage(self) -> Usage: ...
    @property
    def looped(self) -> bool:
        """The answer was stopped because it repeated itself."""
        ...
    @property
    def text(self) -> str:
        """The answer so far; a loop cut back to its first turn."""
        ...


class Chain(Protocol):
    """What the reply pipeline and memory extraction need of a fallback chain
    (``engine.providers.fallback.FallbackChain``); ``skip`` may pass over a
    provider for this run only, with a reason."""

    @property
    def capabilities(self) -> Capabilities: ...
    @property
    def providers(self) -> Sequence[Provider]: ...

    def run(
        self, request: CompletionRequest, *,
        skip: Callable[[Provider, CompletionRequest], str | None] | None = None,
    ) -> ChainRun: ...


class ConversationStore(Protocol):
    """Conversation history per (bot, platform, chat)."""

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
        user_name: str = "",
    ) -> int:
        """Commit one message durably and return its id.

        ``user_name`` is the speaker's display name (group history shows it).
        """
        ...

    async def history(self, bot: str, chat: str, limit: int = 50, *,
                      platform: str | None = None) -> list[StoredMessage]:
        """The last ``limit`` messages of a chat, oldest first.

        A conversation is (bot, platform, chat): the same chat id on two
        platforms is two conversations. ``platform=None`` (admin tools only):
        the chat id on any platform.
        """
        ...


class Embedder(Protocol):
    """Text to unit-length vectors (cosine = dot product).

    Implementations never block the event loop (the model runs in a worker
    thread) and load the model once, shared by every bot.
    """

    model_name: str
    dimension: int

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text to be stored, in order. An empty input returns []."""
        ...

    async def embed_query(self, text: str) -> list[float]:
        """The vector of a search's question, comparable with ``embed``'s by dot
        product; it may come from a faster, slightly less exact model."""
        ...


Progress = Callable[[int, int], None]
"""``progress(done, total)``: called as a long operation advances (import, reembed)."""


class MemoryStore(Protocol):
    """A bot's own long-term memories: one table per bot, never shared.

    Every method takes the bot id; bot and user ids are arbitrary platform
    strings (quotes included) and are never spliced into a query unescaped.
    ``Fact.user`` is whom a fact is about, "" = general. Superseded facts
    stay as history: ``search`` skips them, ``list_facts(..., history=True)``
    shows them. Storage failures raise ``StorageError``; a table written with
    another embedding model raises ``EmbeddingMismatch`` until reembedded.
    """

    async def add(self, fact: Fact) -> Fact:
        """Store one fact; returns it with ``id`` (new uuid if "") and ``created_at`` set."""
        ...

    async def add_many(
        self, facts: Sequence[Fact], *, progress: Progress | None = None
    ) -> list[Fact]:
        """Store many facts of one bot (embedded in batches); same contract as ``add``."""
        ...

    async def get(self, bot: str, fact_id: str) -> Fact | None: ...

    async def list_facts(
        self, bot: str, *, user: str | None = None, history: bool = False,
        limit: int = 100, offset: int = 0,
    ) -> list[Fact]:
        """Newest first. ``user=None``: every user; ``history``: include superseded."""
        ...

    async def search(
        self, bot: str, query: str, *, users: Sequence[str], limit: int = 5,
        min_score: float | None = None, vector: Sequence[float] | None = None,
        chats: Mapping[str, Sequence[str] | None] | None = None,
    ) -> list[Fact]:
        """Best matches about one of ``users`` (and only them), best first.

        Pass the speaker and "" for general facts; ``users=[]`` returns [].
        ``chats``: for a user named there with a sequence, only facts whose
        ``Fact.chat`` is in it (where they may be recalled); None: any chat.
        ``Fact.score`` is the cosine similarity to the query (ranking may
        also use full-text relevance). ``vector``: the query's embedding if
        the caller has it already (saves embedding twice). Superseded facts
        are never returned.
        """
        ...

    async def supersede(self, bot: str, old_id: str, new_id: str) -> None:
        """Mark ``old_id`` as replaced by ``new_id`` (kept as history)."""
        ...

    async def promote(self, bot: str, fact_id: str) -> bool:
        """Make a learned fact bot-wide (``chat`` = ""); False if it did not exist."""
        ...

    async def delete(self, bot: str, fact_id: str) -> bool:
        """Forget one fact for good; False if it did not exist."""
        ...

    async def delete_user(self, bot: str, user: str) -> int:
        """Forget everything about one user; returns how many facts."""
        ...

    async def count(self, bot: str, *, history: bool = True) -> int: ...

    def iterate(self, bot: str) -> AsyncIterator[Fact]:
        """Every fact of a bot, history included, in batches (export)."""
        ...

    async def reembed(self, bot: str, *, progress: Progress | None = None) -> int:
        """Rewrite every vector with the current model; returns rows rewritten."""
        ...

    async def drop_bot(self, bot: str) -> None:
        """Delete a bot's table (its shared facts are orphaned by the shared store)."""
        ...

    async def bots(self) -> list[str]:
        """Bot ids that have a memory table."""
        ...


class SharedMemoryStore(Protocol):
    """Memories shared between bots, always filtered by the reader's trust.

    A reader bot sees: ``public`` facts; ``trusted`` facts whose
    ``trust_group`` is one of ``groups`` (the reader's trust groups); and its
    own ``private`` facts. ``users`` limits whom the facts are about (pass
    the speaker and "" for general; [] = none: fail closed). Every row's
    write hash is checked on read: a row that fails is excluded, logged and
    counted in ``tampered_reads``. Writes are serialized by one writer, so
    concurrent publishers never lose a write and the hash chain stays linear.
    """

    tampered_reads: int

    async def publish(
        self, fact: Fact, level: TrustLevel, group: str = "", *, author_name: str = ""
    ) -> Fact:
        """Share a fact written by ``fact.bot``; returns it with id, created_at, trust set.

        ``level == "trusted"`` requires a non-empty ``group``.
        """
        ...

    async def search(
        self, reader_bot: str, groups: Sequence[str], query: str, *,
        users: Sequence[str], limit: int = 5, min_score: float | None = None,
        vector: Sequence[float] | None = None,
    ) -> list[Fact]:
        """Best visible matches, best first; ``Fact.score`` is cosine similarity."""
        ...

    async def list_facts(
        self, reader_bot: str, groups: Sequence[str], *, users: Sequence[str] | None,
        limit: int = 100, offset: int = 0,
    ) -> list[Fact]:
        """Visible facts, newest first. ``users=None`` (admin listing only): any user."""
        ...

    async def get(self, reader_bot: str, groups: Sequence[str], fact_id: str) -> Fact | None:
        """One fact if the reader may see it (any user), else None."""
        ...

    async def orphan_bot(self, bot: str) -> int:
        """Mark every fact authored by ``bot`` orphaned (bot deleted); returns how many."""
        ...

    async def verify(self) -> IntegrityReport:
        """Walk the whole hash chain: edited rows and deleted rows."""
        ...

    async def count(self) -> int:
        """All rows, regardless of trust (for status pages)."""
        ...

    async def reembed(self, *, progress: Progress | None = None) -> int: ...

    async def forget_user(self, user: str, *, actor: str) -> int:
        """Delete every fact about ``user`` (any bot); a tombstone records what, when
        and by whom (no text), so the chain still verifies. Returns rows deleted."""
        ...


class ChainHeadStore(Protocol):
    """Where a hash chain's head lives, apart from the chained table (SQL in the app),
    so deleting the newest rows or the whole table is caught by a fresh ``verify``."""

    async def get(self, name: str) -> ChainHead | None: ...

    async def put(self, name: str, head: ChainHead) -> None: ...


class RecallLog(Protocol):
    """Which memories each (bot, chat)'s last reply used (for ``memory why``).

    Persisted, so an admin command in another process can read it.
    """

    async def record(self, record: RecallRecord) -> None: ...

    async def last(self, bot: str, chat: str) -> RecallRecord | None: ...

    async def chats(self, bot: str, *, limit: int = 20) -> list[RecallRecord]:
        """The most recent records of a bot, newest first (to find a chat id)."""
        ...

    async def scrub(self, bot: str, fact_ids: Collection[str]) -> int:
        """Remove forgotten facts from every record of a bot; returns records changed."""
        ...


class MemoryPolicy(Protocol):
    """What the reply pipeline asks of long-term memory (``engine/memory/policy.py``).

    ``recall`` runs before the reply (it may return [] on any storage trouble:
    a reply never fails because memory did). ``learn`` schedules fact
    extraction in the background and returns at once: the reply never waits.
    """

    async def recall(self, message: IncomingMessage) -> list[Fact]: ...

    def learn(self, message: IncomingMessage, reply: Reply) -> None: ...


class ReplyObserver(Protocol):
    """Told about every finished reply (usage accounting, metrics, ...).

    ``Conversation`` awaits each observer after the final ``Reply`` was
    yielded; an observer's exception is logged and never reaches the user.
    """

    async def on_reply(self, message: IncomingMessage, reply: Reply) -> None: ...


class Replier(Protocol):
    """One bot's reply pipeline, as adapters see it (``engine.Conversation``).

    Yields text deltas (``str``) as they stream, then exactly one ``Reply``
    as the last item. Never raises for provider trouble: that ends up in
    ``Reply.error`` with a user-facing text.
    """

    def reply(self, message: IncomingMessage) -> AsyncIterator[str | Reply]: ...


class FileStore(Protocol):
    """Per-bot attachment storage (``persistence/sql/files.py``).

    ``save`` streams ``chunks`` to disk, content-addressed by SHA-256 (the
    same bytes are stored once per bot), and records the metadata. It raises
    ``FileRejected`` (a message fit for the user) for a file over the
    per-file or per-bot cap, an empty file or a name that sanitizes to
    nothing; a rejected file leaves nothing behind. ``path`` says where a
    stored file's bytes are, for readers (``adapters/chat/documents.py``
    turns them into what a prompt can carry).
    """

    async def save(
        self,
        *,
        bot: str,
        platform: str,
        chat: str,
        uploader: str,
        name: str,
        mime_type: str,
        chunks: AsyncIterator[bytes],
        declared_size: int | None = None,
    ) -> StoredFile: ...

    async def recent(
        self, bot: str, *, chat: str | None = None, limit: int = 50
    ) -> list[StoredFile]:
        """The newest files of a bot (optionally of one chat), newest first."""
        ...

    async def delete(self, bot: str, file_id: int) -> bool:
        """Forget one file (bytes go when no other record shares them)."""
        ...

    def path(self, stored: StoredFile) -> Path:
        """Where the bytes of ``stored`` are on disk."""
        ...
