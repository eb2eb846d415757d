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
the author a bot) and asks ``Gate.decide``; the gate keeps only the per-chat
bot-turn counters.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

GroupMode = Literal["mention", "always", "never"]
Decision = Literal["answer", "not_addressed", "channel_muted", "from_bot", "bot_loop", "self"]


@dataclass(frozen=True)
class GateConfig:
    """Plain values from ``PlatformSettings`` (one per bot and platform)."""

    group_reply: Literal["mention", "always"] = "mention"
    channels: dict[str, GroupMode] = field(default_factory=dict)
    reply_to_bots: bool = False
    max_bot_turns: int = 3


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

    _MAX_CHATS = 10_000  # bounded memory for the loop-guard counters

    def __init__(self, config: GateConfig) -> None:
        self.config = config
        self._bot_turns: OrderedDict[str, int] = OrderedDict()

    def decide(self, facts: Facts) -> Decision:
        if facts.from_self:
            return "self"
        if facts.is_group:
            mode = self.config.channels.get(facts.chat, self.config.group_reply)
            if mode == "never":
                return "channel_muted"
            if mode == "mention" and not facts.addressed:
                return "not_addressed"
        if not facts.from_bot:
            self._bot_turns.pop(facts.chat, None)  # a human spoke: loop guard resets
            return "answer"
        if not self.config.reply_to_bots:
            return "from_bot"
        turns = self._bot_turns.get(facts.chat, 0)
        if turns >= self.config.max_bot_turns:
            return "bot_loop"
        self._bot_turns[facts.chat] = turns + 1
        self._bot_turns.move_to_end(facts.chat)
        if len(self._bot_turns) > self._MAX_CHATS:
            self._bot_turns.popitem(last=False)
        return "answer"

    def allows(self, facts: Facts) -> bool:
        return self.decide(facts) == "answer"
