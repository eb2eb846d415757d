"""One person's data: show, export and forget, the same for every caller.

``PeopleAdmin`` is the one service behind ``/forget me`` (every platform),
``boternity user show|export|forget`` and the admin API. ``user`` is the
stored key exactly (``telegram:42``); ``bots`` limits the bots looked at
(default: every configured bot).

What a person is held in, and what ``forget`` deletes:

- their memories in each bot's table (facts about them, history included);
- shared facts about them (every bot), through the optional ``shared``
  store's ``forget_user`` (a tombstoned deletion that keeps the hash chain
  verifiable); without it the count says "not configured";
- their messages, and in their DMs the bot's answers too, their files, the
  recall log of their chats and every recalled fact about them, their key on
  usage rows (``records``: ``persistence.sql.erasure.SqlErasure``).

``show`` counts, ``export`` returns everything as one JSON-able dict.
``ForgetRequests`` is the "say what, then confirm within a few minutes" step
of the chat command.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.admin.memory import fact_record
from engine.errors import AdminError
from engine.ports import MemoryStore
from engine.types import Fact

MAX_FACTS = 1_000_000  # per bot and person: far above anything a person tells a bot
CONFIRM_WINDOW_S = 300.0  # "/forget me confirm" must follow within five minutes

# (reader bot, user) -> the shared facts about ``user`` that bot may read
SharedFacts = Callable[[str, str], Awaitable[list[Fact]]]


class PersonRecords(Protocol):
    """The relational side: messages, files, recall log, usage rows."""

    async def person(self, bots: Sequence[str], user: str) -> dict[str, Any]: ...

    async def forget_person(self, bots: Sequence[str], user: str,
                            fact_ids: Collection[str] = ()) -> dict[str, int]: ...


class SharedForget(Protocol):
    """What forgetting needs of the shared memory (``SharedMemory.forget_user``)."""

    async def forget_user(self, user: str, *, actor: str) -> int: ...


@dataclass(frozen=True)
class Held:
    """How much is held about one person (or was deleted), per kind."""

    memories: int = 0
    shared: int | None = None  # None: shared memory not configured for forgetting
    messages: int = 0
    files: int = 0
    recall_log: int = 0
    usage_rows: int = 0

    @property
    def total(self) -> int:
        return (self.memories + (self.shared or 0) + self.messages + self.files
                + self.recall_log + self.usage_rows)

    def describe(self) -> str:
        """One line for people: "3 memories, 12 messages, 1 file, ..."."""
        parts = [_n(self.memories, "memory", "memories"), _n(self.messages, "message"),
                 _n(self.files, "file"), _n(self.recall_log, "recall record")]
        if self.shared:
            parts.insert(1, _n(self.shared, "shared fact"))
        if self.usage_rows:
            parts.append(_n(self.usage_rows, "usage row"))
        return ", ".join(parts)


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else many or one + 's'}"


@dataclass
class PeopleAdmin:
    """Show, export and forget one person (see the module docstring)."""

    bots: Sequence[str]
    records: PersonRecords
    memory: MemoryStore | None = None
    shared: SharedForget | None = None  # SharedMemory.forget_user (tombstoned deletion)
    shared_facts: SharedFacts | None = None  # show and export what the bots can read

    async def _shared_about(self, bots: Sequence[str], user: str) -> list[Fact]:
        if self.shared_facts is None:
            return []
        found: dict[str, Fact] = {}
        for bot in bots:
            found.update((f.id, f) for f in await self.shared_facts(bot, user))
        return list(found.values())

    def _bots(self, bots: Sequence[str] | None) -> list[str]:
        chosen = list(self.bots if bots is None else bots)
        unknown = [b for b in chosen if b not in self.bots]
        if unknown:
            known = ", ".join(sorted(self.bots)) or "none"
            raise AdminError(f"unknown bot '{unknown[0]}' (configured: {known})")
        return chosen

    @staticmethod
    def _user(user: str) -> str:
        user = user.strip()
        if not user or ":" not in user:
            raise AdminError("name a person as PLATFORM:ID, e.g. telegram:42")
        return user

    async def _facts(self, bots: Sequence[str], user: str) -> list[Fact]:
        if self.memory is None:
            return []
        found: list[Fact] = []
        for bot in bots:  # filtered in the store, history included
            found += await self.memory.list_facts(bot, user=user, history=True,
                                                  limit=MAX_FACTS)
        return found

    async def show(self, user: str, bots: Sequence[str] | None = None) -> Held:
        chosen, user = self._bots(bots), self._user(user)
        data = await self.records.person(chosen, user)
        return Held(
            memories=len(await self._facts(chosen, user)),
            shared=len(await self._shared_about(chosen, user)) if self.shared_facts else None,
            messages=len(data["messages"]), files=len(data["files"]),
            recall_log=len(data["recall_log"]), usage_rows=int(data["usage_rows"]),
        )

    async def export(self, user: str, bots: Sequence[str] | None = None) -> dict[str, Any]:
        """Everything held about ``user``, JSON-able (shared: what these bots may read)."""
        chosen, user = self._bots(bots), self._user(user)
        data = await self.records.person(chosen, user)
        facts = await self._facts(chosen, user)
        shared = await self._shared_about(chosen, user)
        return {"user": user, "bots": chosen,
                "memories": [{"bot": f.bot, **fact_record(f)} for f in facts],
                "shared_memories": [{"author_bot": f.author_bot, "trust_level": f.trust_level,
                                     **fact_record(f)} for f in shared], **data}

    async def forget(self, user: str, bots: Sequence[str] | None = None, *,
                     actor: str) -> Held:
        """Delete everything held about ``user``; returns what was deleted."""
        chosen, user = self._bots(bots), self._user(user)
        ids = [f.id for f in await self._facts(chosen, user)]
        memories = 0
        if self.memory is not None:
            for bot in chosen:
                memories += await self.memory.delete_user(bot, user)
        shared = (await self.shared.forget_user(user, actor=actor)
                  if self.shared is not None else None)
        counts = await self.records.forget_person(chosen, user, ids)
        return Held(memories=memories, shared=shared, **counts)


@dataclass
class ForgetRequests:
    """Pending ``/forget me`` requests: confirmed only within ``window_s``."""

    window_s: float = CONFIRM_WINDOW_S
    clock: Callable[[], float] = time.monotonic
    _asked: dict[tuple[str, str], float] = field(default_factory=dict)

    def ask(self, bot: str, user: str) -> None:
        self._asked[(bot, user)] = self.clock()

    def confirm(self, bot: str, user: str) -> bool:
        """True once, if ``ask`` came less than ``window_s`` ago."""
        asked = self._asked.pop((bot, user), None)
        return asked is not None and self.clock() - asked <= self.window_s
