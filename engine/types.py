"""Engine value types: frozen dataclasses shared by every layer.

ORM rows and SDK objects never leave their layer; these do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

Platform = Literal["terminal", "telegram", "slack", "discord"]
Role = Literal["system", "user", "assistant"]
FooterMode = Literal["on_failover", "always", "never"]
TrustLevel = Literal["public", "trusted", "private"]


@dataclass(frozen=True)
class Attachment:
    """A file that came with a message, already stored by the FileStore.

    ``text`` holds extracted text for documents (within the size budget);
    ``data`` holds image bytes for providers with vision, else None.
    """

    name: str
    mime_type: str
    size: int
    sha256: str = ""
    text: str | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class IncomingMessage:
    """One user message, normalized by an adapter."""

    platform: Platform
    bot: str
    chat: str
    user: str
    text: str
    message_id: str = ""
    user_name: str = ""
    is_group: bool = False
    reply_to: str | None = None
    attachments: tuple[Attachment, ...] = ()


@dataclass(frozen=True)
class Message:
    """One turn of a prompt sent to a provider."""

    role: Role
    content: str
    images: tuple[Attachment, ...] = ()


@dataclass(frozen=True)
class CompletionRequest:
    """What a provider is asked to complete."""

    messages: tuple[Message, ...]
    temperature: float | None = None
    max_tokens: int | None = None
    json_mode: bool = False
    # Who asked: read by the chain's skip rules (per-bot and per-user budgets).
    # Never sent to a provider.
    bot: str = ""
    user: str = ""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False


@dataclass(frozen=True)
class Chunk:
    """One streamed piece: text, or (usually last) the usage the provider reported."""

    text: str = ""
    usage: Usage | None = None


@dataclass(frozen=True)
class Capabilities:
    streaming: bool = True
    vision: bool = False
    tools: bool = False
    context_window: int = 8192
    max_output_tokens: int = 1024


def output_cap(request: CompletionRequest, capabilities: Capabilities) -> int:
    """The output limit a provider sends: the request's, never above its own."""
    if request.max_tokens is None:
        return capabilities.max_output_tokens
    return min(request.max_tokens, capabilities.max_output_tokens)


@dataclass(frozen=True)
class Failure:
    """A provider that failed while serving one reply, and why (footer-ready)."""

    provider: str
    kind: str
    reason: str
    detail: str = ""  # the provider's own words, scrubbed: for the log and admins only


@dataclass(frozen=True)
class Reply:
    """The final result of one ``Conversation.reply``.

    ``text`` is the answer without footer; ``footer`` is what adapters append
    (empty when the bot's footer mode says none). ``error`` is set when no
    provider served; then ``text`` is the user-facing explanation.
    """

    text: str
    served_by: str | None
    model: str | None = None
    failures: tuple[Failure, ...] = ()
    usage: Usage = field(default_factory=Usage)
    latency_s: float = 0.0
    recalled_ids: tuple[str, ...] = ()
    footer: str = ""
    error: str | None = None

    @property
    def full_text(self) -> str:
        return f"{self.text}\n\n{self.footer}" if self.footer else self.text


@dataclass(frozen=True)
class StoredMessage:
    """A message from conversation history."""

    id: int
    bot: str
    chat: str
    role: Role
    content: str
    user: str = ""
    created_at: datetime | None = None
    served_by: str | None = None
    user_name: str = ""  # the speaker's display name when stored ("" = unknown)


@dataclass(frozen=True)
class Fact:
    """A long-term memory. ``user`` is whom it is about; "" means general.

    ``chat`` is where a learned fact may be recalled ("" = bot-wide, what
    only admins make; see ``engine/memory/scope.py``).
    """

    id: str
    text: str
    bot: str
    user: str = ""
    category: str = "general"
    importance: float = 0.5
    created_at: datetime | None = None
    superseded_by: str | None = None
    score: float = 0.0
    # free-form JSON text carried from import (e.g. where the fact came from)
    metadata: str = ""
    # shared memory only (``trust_level`` is None for a bot's own memories);
    # ``bot`` and ``author_bot`` are then both the author's id
    trust_level: TrustLevel | None = None
    trust_group: str = ""
    author_bot: str = ""
    author_name: str = ""
    orphaned: bool = False  # the author bot was deleted; the fact stays
    chat: str = ""  # per-bot memories only: the chat it was learned in ("" = bot-wide)


@dataclass(frozen=True)
class IntegrityReport:
    """What ``SharedMemoryStore.verify`` found walking the hash chain.

    ``tampered``: ids whose content no longer matches their write hash.
    ``missing``: places where the chain breaks (rows deleted outside the
    API), described as "after <id>" / "at head". ``ok`` when both are empty.
    """

    checked: int
    tampered: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.tampered and not self.missing


@dataclass(frozen=True)
class RecalledFact:
    """One memory that went into a prompt, as ``boternity memory why`` shows it."""

    id: str
    score: float
    text: str
    source: Literal["own", "shared"] = "own"
    user: str = ""
    author_bot: str = ""


@dataclass(frozen=True)
class RecallRecord:
    """Which memories were recalled for the last reply in one (bot, chat)."""

    bot: str
    chat: str
    message_id: str
    query: str
    facts: tuple[RecalledFact, ...]
    created_at: datetime | None = None


@dataclass(frozen=True)
class StoredFile:
    """An attachment kept in per-bot file storage (metadata; bytes live on disk)."""

    id: int
    bot: str
    platform: str
    chat: str
    uploader: str
    name: str
    mime_type: str
    size: int
    sha256: str
    created_at: datetime | None = None


@dataclass(frozen=True)
class ChainHead:
    """The last link of a hash chain, kept outside the chained table (``ChainHeadStore``).

    ``pending_*``: a write announced before it lands (0 / "" when none); the
    next writer promotes it when the table holds it, else drops it.
    """

    seq: int
    hash: str
    pending_seq: int = 0
    pending_hash: str = ""
