"""Who a memory belongs to, and where it may be recalled.

The user key
  A person is stored everywhere (memories, shared memories, history, usage,
  files, the recall log) under one string, ``platform:id``: ``telegram:7``,
  ``slack:U024BE7LH``, ``discord:80351110224678912``, ``terminal:local``.
  ``user_key`` is the only function that builds it: every adapter calls it.
  ``parse_user`` reads what an operator typed (the CLI, ``/memory list``, a
  JSON Lines import): ``telegram:7`` is taken as is; a bare id (``7``) means
  the platform the command came from (``/memory list 7`` typed on Telegram is
  ``telegram:7``) and is refused where no platform is implied (the CLI, an
  import), because ``7`` on Telegram and ``7`` on Discord are two people.
  ``telegram:telegram:7``, the twice-prefixed form stored before this was
  fixed (and so in old exports), is read as ``telegram:7``.

Where a learned fact may be recalled (``Fact.chat``; "" = bot-wide)
  - learned in a private chat (DM): the fact belongs to that person
    (``user`` = their key, even a "general" fact) and its ``chat`` is the DM:
    it is recalled for them only, and not in a group (a group reply is read by
    everyone there);
  - learned in a group: about the speaker -> ``user`` = speaker, general ->
    ``user`` = ""; ``chat`` = that group: recalled in that group only;
  - bot-wide facts (``chat`` = ""): only admins make them (``memory add``,
    ``memory import``, ``memory promote``).
  ``recall_across_chats`` (per bot) widens groups to the speaker's facts from
  anywhere and general facts from every group of the bot; even then nobody
  ever recalls another person's DM facts (their ``user`` is that person).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from engine.errors import AdminError
from engine.types import Fact, IncomingMessage

PLATFORMS = ("telegram", "slack", "discord", "terminal")


def user_key(platform: str, user_id: str | int) -> str:
    """The stored form of a person: ``platform:id`` ("" for an unknown speaker)."""
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}")
    uid = str(user_id).strip()
    return f"{platform}:{uid}" if uid else ""


def normalize_key(key: str) -> str:
    """``telegram:telegram:7`` (the old twice-prefixed form) -> ``telegram:7``; else unchanged."""
    platform, sep, rest = key.partition(":")
    while sep and platform in PLATFORMS and rest.startswith(platform + ":"):
        rest = rest[len(platform) + 1:]
    return f"{platform}:{rest}" if sep and platform in PLATFORMS else key


def parse_user(text: str, platform: str | None = None) -> str:
    """An operator's ``platform:id`` (or bare id on ``platform``) as the stored key.

    "" stays "" (general). Raises ``AdminError`` for a bare id with no
    platform to imply, and for an unknown platform prefix.
    """
    text = text.strip()
    if not text:
        return ""
    prefix, sep, rest = text.partition(":")
    if sep and prefix in PLATFORMS:
        if not rest.strip():
            raise AdminError(f"user '{text}' has no id after '{prefix}:'")
        return normalize_key(text)
    if platform in PLATFORMS:
        return user_key(platform, text)
    raise AdminError(
        f"user '{text}' does not say its platform: write platform:id, "
        f"e.g. telegram:{text} ({', '.join(PLATFORMS)})")


def place_of(message: IncomingMessage) -> str:
    """The chat a fact learned from ``message`` belongs to.

    A Slack thread's chat is ``channel/thread``; what is said in a thread is
    said in its channel (everyone there can read it), so the channel.
    """
    if message.platform == "slack":
        return message.chat.partition("/")[0]
    return message.chat


@dataclass(frozen=True)
class RecallScope:
    """Which facts one message may recall: user -> allowed chats (None = any chat).

    ``users`` is what the store filters on; ``allows`` is the rule, checked
    again on every fact the stores return (fail closed).
    """

    chats: Mapping[str, tuple[str, ...] | None]

    @property
    def users(self) -> list[str]:
        return list(self.chats)

    def allows(self, fact: Fact) -> bool:
        if fact.user not in self.chats:
            return False
        allowed = self.chats[fact.user]
        # Shared facts are published by an admin: bot-wide by construction.
        return allowed is None or fact.trust_level is not None or fact.chat in allowed


def recall_scope(message: IncomingMessage, *, across_chats: bool = False) -> RecallScope:
    """What ``message`` may recall (see the module docstring)."""
    speaker, here = message.user, place_of(message)
    chats: dict[str, tuple[str, ...] | None] = {}
    if not message.is_group:
        if speaker:
            chats[speaker] = None  # a person's own facts, wherever they were learned
        # general: bot-wide ones, and (widened) those learned in the bot's groups
        chats[""] = None if across_chats else ("",)
    elif across_chats:
        if speaker:
            chats[speaker] = None
        chats[""] = None
    else:
        if speaker:
            chats[speaker] = ("", here)
        chats[""] = ("", here)
    return RecallScope(chats)


def learned_place(message: IncomingMessage, about_speaker: bool) -> tuple[str, str] | None:
    """(user, chat) a fact learned from ``message`` is stored under; None: not stored."""
    here = place_of(message)
    if not message.is_group:
        # A DM is one person's: even a "general" fact there is theirs.
        return (message.user, here) if message.user else None
    if about_speaker:
        return (message.user, here) if message.user else None
    return ("", here)
