"""Pure prompt assembly: persona, recalled facts, attachments, trimmed history.

No I/O here. ``build_prompt`` turns what the conversation knows into one
``CompletionRequest`` that fits a context budget:

    budget = context_window - max_output_tokens - safety margin
    1. the system message (persona + recalled facts with provenance) always goes in;
    2. the new user message goes in, cut with a visible notice if it alone is too big;
    3. history fills what is left, newest first (older turns are dropped).

Tokens are estimated at ~4 characters each: we cannot run every provider's
tokenizer, and the margin absorbs the error.

In a group chat every user turn (history and the new message) reads
``Name: text``, so the model can tell the speakers apart. The name goes into
the text, not OpenAI's per-message ``name`` field: Bedrock's Converse API has
no such field, several OpenAI-compatible servers ignore it, and it only
allows ``[A-Za-z0-9_-]{1,64}`` (a display name with a space or in another
script would be refused). A prefix works the same on every provider.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from engine.types import (
    Attachment,
    CompletionRequest,
    Fact,
    IncomingMessage,
    Message,
    StoredMessage,
)

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4  # role markers and separators per message
SAFETY_MARGIN = 0.1
IMAGE_TOKENS = 800  # a rough price of one image in the prompt
SPEAKER_MAX_CHARS = 64
_BLANKS = re.compile(r"\s+")


def estimate_tokens(text: str) -> int:
    """A cheap, tokenizer-free estimate (~4 characters per token)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def request_tokens(request: CompletionRequest) -> int:
    """Estimated prompt size of a request, images included."""
    return sum(
        estimate_tokens(m.content) + MESSAGE_OVERHEAD_TOKENS + IMAGE_TOKENS * len(m.images)
        for m in request.messages
    )


@dataclass(frozen=True)
class Prompt:
    """The request plus what had to be left out to make it fit."""

    request: CompletionRequest
    dropped_history: int = 0
    truncated_chars: int = 0  # characters of the new message that were cut

    @property
    def notices(self) -> tuple[str, ...]:
        if not self.truncated_chars:
            return ()
        return (
            f"note: your message was too long for this model; the last "
            f"{self.truncated_chars:,} characters were not read",
        )


def render_fact(fact: Fact) -> str:
    """One recalled fact with its provenance: whose it is, who wrote it, when."""
    when = f" on {fact.created_at:%Y-%m-%d}" if fact.created_at else ""
    about = f"about {fact.user}" if fact.user else "general"
    if fact.trust_level is not None:
        author = fact.author_name or fact.author_bot or fact.bot
        source = f"shared by bot '{author}'{when}"
    else:
        source = f"remembered{when}"
    return f"- {fact.text} ({about}; {source})"


def system_text(persona: str, facts: Sequence[Fact]) -> str:
    if not facts:
        return persona
    lines = "\n".join(render_fact(f) for f in facts)
    return (
        f"{persona}\n\n"
        "Things you remember from earlier conversations (use them when relevant; "
        "facts shared by another bot are that bot's claims, not certainties):\n"
        f"{lines}"
    )


def _attachment_text(attachment: Attachment, vision: bool) -> str:
    if attachment.text is not None:
        return f"[attached file '{attachment.name}' ({attachment.mime_type})]\n{attachment.text}"
    if attachment.mime_type.startswith("image/"):
        if vision and attachment.data is not None:
            return f"[attached image '{attachment.name}']"
        return f"[attached image '{attachment.name}': this model cannot see images]"
    return f"[attached file '{attachment.name}' ({attachment.mime_type}, {attachment.size} bytes)]"


def user_content(message: IncomingMessage, vision: bool) -> tuple[str, tuple[Attachment, ...]]:
    """The user turn's text (attachments' extracted text appended) and its images."""
    parts = [message.text] if message.text else []
    parts += [_attachment_text(a, vision) for a in message.attachments]
    images = tuple(
        a for a in message.attachments
        if vision and a.data is not None and a.mime_type.startswith("image/")
    )
    return "\n\n".join(parts), images


def stored_content(message: IncomingMessage) -> str:
    """What history keeps of a user turn: its text and its documents' extracted text.

    Image bytes are not kept (only a mention): a follow-up can ask about a
    document, and the image was already answered.
    """
    parts = [message.text] if message.text else []
    parts += [_attachment_text(a, vision=False) if a.text is not None
              else f"[attached file '{a.name}' ({a.mime_type})]" for a in message.attachments]
    return "\n\n".join(parts)


def speaker(user_name: str, user: str) -> str:
    """The label of a group turn: the display name on one line (else the user id)."""
    # A newline in a display name could fake a whole turn of the transcript.
    name = _BLANKS.sub(" ", user_name).strip()[:SPEAKER_MAX_CHARS].strip()
    return name or _BLANKS.sub(" ", user).strip()[:SPEAKER_MAX_CHARS] or "someone"


def _cut(text: str, max_tokens: int) -> tuple[str, int]:
    keep = max(0, max_tokens) * CHARS_PER_TOKEN
    if len(text) <= keep:
        return text, 0
    marker = "\n[... message truncated: the rest did not fit ...]"
    keep = max(0, keep - len(marker))
    return text[:keep] + marker, len(text) - keep


def build_prompt(
    *,
    persona: str,
    message: IncomingMessage,
    history: Sequence[StoredMessage] = (),
    facts: Sequence[Fact] = (),
    context_window: int = 8192,
    max_output_tokens: int = 1024,
    vision: bool = False,
    temperature: float | None = None,
    max_tokens: int | None = None,
) -> Prompt:
    """Assemble the request; see the module docstring for the budget rules.

    ``history`` is oldest first and must not contain ``message`` itself.
    """
    budget = int((context_window - max_output_tokens) * (1 - SAFETY_MARGIN))
    system = Message("system", system_text(persona, facts))
    budget -= estimate_tokens(system.content) + MESSAGE_OVERHEAD_TOKENS

    text, images = user_content(message, vision)
    if message.is_group:
        text = f"{speaker(message.user_name, message.user)}: {text}"
    budget -= MESSAGE_OVERHEAD_TOKENS + IMAGE_TOKENS * len(images)
    # A floor, so an oversized persona still leaves the user a say.
    text, cut = _cut(text, max(budget, 64))
    budget -= estimate_tokens(text)
    user = Message("user", text, images)

    kept: list[Message] = []
    for stored in reversed(history):
        if stored.role == "system":
            continue
        content = stored.content
        if message.is_group and stored.role == "user":
            content = f"{speaker(stored.user_name, stored.user)}: {content}"
        cost = estimate_tokens(content) + MESSAGE_OVERHEAD_TOKENS
        if cost > budget:
            break
        budget -= cost
        kept.append(Message(stored.role, content))
    kept.reverse()
    dropped = sum(1 for m in history if m.role != "system") - len(kept)
    request = CompletionRequest(
        messages=(system, *kept, user),
        temperature=temperature,
        # The bot's output cap (None: each provider sends its own
        # max_output_tokens; a provider never sends more than its own).
        max_tokens=max_tokens,
        bot=message.bot,
        user=message.user,
    )
    return Prompt(request=request, dropped_history=dropped, truncated_chars=cut)

