"""Who gets an answer: the same rules on every platform.

- Direct messages: always.
- Groups: per channel (``channels = {"<id>": "always" | "mention" | "never"}``)
  else the bot's ``group_reply``: ``"mention"`` answers only when the bot is
  addressed (mentioned, replied to, or called by command), ``"always"``
  answers every message.
- Other bots: ignored unless ``reply_to_bots``; then at most
  ``max_bot_turns`` answers to bots in a row per chat (the loop guard), reset
  by any human message in that chat. Our own messages are never answered.

A platform adapter computes the facts (is it a DM, was the bot mentioned, is
the author a bot) and asks ``await Gate.decide``; the gate keeps only the
per-chat bot-turn counters, in a ``BotTurns``: ``MemoryTurns`` in one
process, or ``GateConfig.turns`` (``persistence.redis.state.RedisBotTurns``)
so several workers count one chat's bot turns together.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal, Protocol

log = logging.getLogger(__name__)

GroupMode = Literal["mention", "always", "never"]
Decision = Literal["answer", "not_addressed", "channel_muted", "from_bot", "bot_loop", "self"]


class BotTurns(Protocol):
    """The loop guard's counters: answers to bots in a row, per chat."""

    async def take(self, chat: str, limit: int) -> bool:
        """Count one more bot turn in ``chat`` unless ``limit`` are counted (then False)."""
        ...

    async def reset(self, chat: str) -> None:
        """A human spoke in ``chat``: the count starts again."""
        ...


class MemoryTurns:
    """``BotTurns`` for one process (bounded: the least recent chats are forgotten)."""

    _MAX_CHATS = 10_000

    def __init__(self) -> None:
        self._turns: OrderedDict[str, int] = OrderedDict()

    async def take(self, chat: str, limit: int) -> bool:
        turns = self._turns.get(chat, 0)
        if turns >= limit:
            return False
        self._turns[chat] = turns + 1
        self._turns.move_to_end(chat)
        if len(self._turns) > self._MAX_CHATS:
            self._turns.popitem(last=False)
        return True

    async def reset(self, chat: str) -> None:
        self._turns.pop(chat, None)


@dataclass(frozen=True)
class GateConfig:
    """Plain values from ``PlatformSettings`` (one per bot and platform), and
    where the loop guard counts (None: in this process)."""

    group_reply: Literal["mention", "always"] = "mention"
    channels: dict[str, GroupMode] = field(default_factory=dict)
    reply_to_bots: bool = False
    max_bot_turns: int = 3
    turns: BotTurns | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Facts:
    """What the adapter knows about one incoming event."""

    chat: str
    is_group: bool
    addressed: bool = False  # mentioned, replied to, or a command
    from_bot: bool = False
    from_self: bool = False


class Gate:
    """Decides whether a message is answered (see the module docstring)."""

    def __init__(self, config: GateConfig) -> None:
        self.config = config
        self._turns: BotTurns = config.turns or MemoryTurns()

    async def decide(self, facts: Facts) -> Decision:
        if facts.from_self:
            return "self"
        if facts.is_group:
            mode = self.config.channels.get(facts.chat, self.config.group_reply)
            if mode == "never":
                return "channel_muted"
            if mode == "mention" and not facts.addressed:
                return "not_addressed"
        if not facts.from_bot:
            if self.config.reply_to_bots:  # only then is anything counted
                await self._turns.reset(facts.chat)  # a human spoke: loop guard resets
            return "answer"
        if not self.config.reply_to_bots:
            return "from_bot"
        if not await self._turns.take(facts.chat, self.config.max_bot_turns):
            log.info("loop guard: %d bot turns in a row in %s; not answering",
                     self.config.max_bot_turns, facts.chat)
            return "bot_loop"
        return "answer"

    async def allows(self, facts: Facts) -> bool:
        return await self.decide(facts) == "answer"
