"""Admin slash commands, the same on every platform.

``COMMANDS`` is the spec each platform registers (Telegram setMyCommands,
Slack slash commands, Discord app commands). ``Commands.run(caller, name,
args)`` parses the text arguments, checks the caller, delegates to
``engine.admin`` (``memory``, ``bot``) and returns Markdown for the platform to send:

    /memory list [user] | search <query> | forget <id> | why
    /provider status
    /files list | delete <id>
    /usage
    /bot persona [new persona]
    /help
    /reset                       (anyone in a DM; admins in groups)
    /forget me [confirm]         (anyone, about themselves)

Only configured admins (``admins = [...]``, raw platform ids or
``platform:id``) or platform admins (when the adapter says so: a Slack
workspace admin under ``trust_workspace_admins``, a Discord server
Administrator under ``trust_guild_admins``) may run them; others get a polite
refusal, and unknown commands a list of what exists. ``/help``, ``/reset``
and ``/forget`` are open to everyone. ``/forget me`` says what it would
delete and asks for ``/forget me confirm`` within five minutes
(``engine.admin.people``). ``answers_privately(name)``: whether the answer
shows someone's data, so a platform without private replies in groups
(Telegram) must send it to the caller's DM instead. Nothing here raises to
the platform: every error becomes a short message.

A platform admin who is not a configured admin is SCOPED: read-only (no
``/memory forget``, ``/files delete``, persona change, nor ``/usage``, which
spans every platform), and reading only its own platform's data: memories
about its platform's users (none when the adapter limits it to some chats: a
Discord server, since memories are per person, not per server), files
uploaded in its chats (``Caller.platform_chats``) or on its platform.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime

from engine.admin.bot import FileAdmin, PersonaAdmin, ProviderAdmin
from engine.admin.memory import MemoryAdmin
from engine.admin.people import ForgetRequests, PeopleAdmin
from engine.conversation import reset_chat
from engine.errors import BoternityError
from engine.memory.scope import parse_user
from engine.ports import ConversationStore
from engine.types import Fact

log = logging.getLogger(__name__)

UsageReport = Callable[[str], Awaitable[str]]  # bot -> Markdown summary


@dataclass(frozen=True)
class CommandSpec:
    name: str
    description: str  # <= 100 chars (Discord's and Slack's limit)
    usage: str


COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec("memory", "Long-term memory: list, search, forget, why",
                "list [user] | search <query> | forget <id> | why"),
    CommandSpec("provider", "Provider status: breakers, last error, who served",
                "status"),
    CommandSpec("files", "Stored attachments: list or delete", "list | delete <id>"),
    CommandSpec("usage", "Token usage and costs", ""),
    CommandSpec("bot", "Bot settings: show or change the persona", "persona [new persona]"),
    CommandSpec("help", "What the commands do", ""),
    CommandSpec("reset", "Start this chat's conversation afresh", ""),
    CommandSpec("forget", "Erase what this bot keeps about you", "me [confirm]"),
)
_BY_NAME = {spec.name: spec for spec in COMMANDS}
REFUSAL = "Sorry, only this bot's admins can use /{name}."
READ_ONLY = ("Sorry, as a {platform} admin you can read this bot's {platform} data; "
             "{what} is for the admins named in the bot's configuration.")
OPEN = frozenset({"help", "reset", "forget"})  # anyone may run these (each checks its own rule)
PUBLIC_ANSWERS = frozenset({"help", "start", "reset"})  # show nobody's data


def answers_privately(name: str) -> bool:
    """Whether ``/name``'s answer may show someone's data (send it to the caller only)."""
    return name.lower().lstrip("/") not in PUBLIC_ANSWERS


@dataclass(frozen=True)
class Caller:
    """Who runs a command, where."""

    platform: str
    chat: str
    user: str  # raw platform id
    is_platform_admin: bool = False
    # What a platform admin may read: these chats (a Discord server's channels),
    # or, when None, everything of its platform (a Slack app serves one workspace).
    platform_chats: frozenset[str] | None = None
    is_group: bool = True  # a DM says so; unknown counts as a group (the stricter rule)


def parse(text: str) -> tuple[str, str] | None:
    """``"/memory@MyBot search cats"`` -> ``("memory", "search cats")``; None if no command."""
    text = text.strip()
    if not text.startswith("/") or len(text) < 2:
        return None
    head, _, rest = text[1:].partition(" ")
    name = head.split("@", 1)[0].lower()
    return (name, rest.strip()) if name else None


def is_command(text: str) -> bool:
    parsed = parse(text)
    return parsed is not None and parsed[0] in _BY_NAME


class Commands:
    """The admin commands of one bot on one platform (see the module docstring)."""

    def __init__(
        self,
        *,
        bot: str,
        admins: Collection[str] = (),
        memory: MemoryAdmin | None = None,
        providers: ProviderAdmin | None = None,
        files: FileAdmin | None = None,
        persona: PersonaAdmin | None = None,
        usage: UsageReport | None = None,
        people: PeopleAdmin | None = None,
        history: ConversationStore | None = None,
        forget_requests: ForgetRequests | None = None,
    ) -> None:
        self.bot = bot
        self.admins = frozenset(admins)
        self.memory = memory
        self.providers = providers
        self.files = files
        self.persona = persona
        self.usage = usage
        self.people = people
        self.history = history
        self.forget_requests = forget_requests or ForgetRequests()

    def is_admin(self, caller: Caller) -> bool:
        return caller.is_platform_admin or self._configured(caller)

    def _configured(self, caller: Caller) -> bool:
        return bool({caller.user, f"{caller.platform}:{caller.user}"} & self.admins)

    def _scoped(self, caller: Caller) -> bool:
        """A platform admin only: read-only, its own platform's data (module docstring)."""
        return caller.is_platform_admin and not self._configured(caller)

    def _read_only(self, caller: Caller, what: str) -> str:
        return READ_ONLY.format(platform=caller.platform.capitalize(), what=what)

    def _mine(self, caller: Caller, facts: list[Fact], limit: int) -> list[Fact]:
        """A scoped caller's share of ``facts``: about users of its platform."""
        if not self._scoped(caller):
            return facts[:limit]
        return [f for f in facts if f.user.startswith(f"{caller.platform}:")][:limit]

    async def run(self, caller: Caller, name: str, args: str) -> str:
        """Run one command; always returns a message (Markdown) for the caller."""
        name = name.lower().lstrip("/")
        if name not in _BY_NAME:
            known = ", ".join(f"/{spec.name}" for spec in COMMANDS)
            return f"Unknown command /{name[:40]}. Available: {known}."
        if name == "help":
            return self.help()
        if name not in OPEN and not self.is_admin(caller):
            log.info("refused /%s from %s:%s", name, caller.platform, caller.user)
            return REFUSAL.format(name=name)
        try:
            words = shlex.split(args)
        except ValueError:
            words = args.split()
        try:
            handler = getattr(self, f"_{name}")
            result: str = await handler(caller, words, args)
            return result
        except BoternityError as exc:
            return f"/{name}: {exc}"
        except Exception:
            log.exception("/%s failed", name)
            return f"/{name} failed unexpectedly; the details are in the bot's log."

    def help(self) -> str:
        def line(s: CommandSpec) -> str:
            return f"- `/{s.name}{' ' + s.usage if s.usage else ''}`: {s.description}"

        return "\n".join(["Admin commands:", *(line(s) for s in COMMANDS if s.name not in OPEN),
                          "For everyone:", *(line(s) for s in COMMANDS if s.name in OPEN)])

    @staticmethod
    def _usage_of(name: str) -> str:
        return f"Usage: `/{name} {_BY_NAME[name].usage}`"

    # --- one method per command: (caller, words, raw args) -> Markdown ---

    async def _memory(self, caller: Caller, words: list[str], raw: str) -> str:
        if self.memory is None:
            return "Long-term memory is not enabled for this bot."
        sub = words[0].lower() if words else ""
        scoped = self._scoped(caller)
        if scoped and sub in ("list", "search") and caller.platform_chats is not None:
            return self._read_only(caller, "reading memories (they are kept per person, "
                                           "not per server)")
        more = 500 if scoped else 0  # scoped: read past the others' facts, then filter
        if sub == "list":
            # A bare id means a user of the platform the command came from.
            user = parse_user(words[1], caller.platform) if len(words) > 1 else None
            facts = await self.memory.list_facts(self.bot, user=user, limit=20 + more)
            return _facts("Memories", self._mine(caller, facts, 20))
        if sub == "search" and len(words) > 1:
            query = raw.split(None, 1)[1]
            found = await self.memory.search(self.bot, query, limit=10 + more)
            return _facts(f"Memories matching “{query[:80]}”", self._mine(caller, found, 10))
        if scoped and sub == "forget":
            return self._read_only(caller, "forgetting")
        if sub == "forget" and len(words) == 2:
            done = await self.memory.forget(self.bot, words[1])
            return f"Forgot memory `{words[1]}`." if done else f"No memory `{words[1]}`."
        if sub == "why":
            record = await self.memory.why(self.bot, caller.chat)
            if record is None or not record.facts:
                return "The last reply here used no memories."
            lines = [f"The last reply here recalled {len(record.facts)} memories:"]
            lines += [f"- `{f.id}` ({f.score:.2f}, {f.source}"
                      f"{', by ' + f.author_bot if f.author_bot else ''}): {f.text}"
                      for f in record.facts]
            return "\n".join(lines)
        return self._usage_of("memory")

    async def _provider(self, caller: Caller, words: list[str], raw: str) -> str:
        if words[:1] not in ([], ["status"]):
            return self._usage_of("provider")
        if self.providers is None:
            return "Provider status is not available."
        rows, last = self.providers.status(self.bot)
        lines = ["Providers (in fallback order):"]
        for row in rows:
            name = row.pop("name", "?")
            detail = ", ".join(f"{k}: {_short(v)}" for k, v in row.items() if v not in (None, ""))
            lines.append(f"- **{name}**: {detail}")
        if last is None:
            lines.append("No reply served since the bot started.")
        else:
            who = f"{last.served_by} ({last.model})" if last.served_by else "nobody"
            lines.append(f"Last reply ({last.at:%H:%M:%S} UTC) served by {who}.")
            # Admins get the provider's own (scrubbed) words; users only saw a fixed sentence.
            lines += [f"- failed first: {f.provider}: {f.reason}"
                      + (f" ({f.detail})" if f.detail else "") for f in last.failures]
        return "\n".join(lines)

    async def _files(self, caller: Caller, words: list[str], raw: str) -> str:
        if self.files is None:
            return "File storage is not enabled for this bot."
        sub = words[0].lower() if words else "list"
        scoped = self._scoped(caller)
        if sub == "list":
            stored = await self.files.list(self.bot, limit=500 if scoped else 20)
            if scoped:  # its platform's files, from its chats
                stored = [f for f in stored if f.platform == caller.platform and (
                    caller.platform_chats is None or f.chat in caller.platform_chats)][:20]
            if not stored:
                return "No stored files."
            return "Stored files (newest first):\n" + "\n".join(
                f"- `{f.id}` {f.name} ({f.mime_type}, {_size(f.size)}, from {f.uploader})"
                for f in stored)
        if scoped and sub == "delete":
            return self._read_only(caller, "deleting files")
        if sub == "delete" and len(words) == 2:
            if not words[1].isdigit():
                return "A file id is a number (see `/files list`)."
            done = await self.files.delete(self.bot, int(words[1]))
            return f"Deleted file `{words[1]}`." if done else f"No file `{words[1]}`."
        return self._usage_of("files")

    async def _usage(self, caller: Caller, words: list[str], raw: str) -> str:
        if self._scoped(caller):
            return self._read_only(caller, "usage (it spans every platform)")
        if self.usage is None:
            return "Usage accounting is not available yet."
        return await self.usage(self.bot)

    async def _bot(self, caller: Caller, words: list[str], raw: str) -> str:
        if not words or words[0].lower() != "persona" or self.persona is None:
            return self._usage_of("bot") if self.persona else "Persona is not available."
        new = raw.split(None, 1)[1] if len(words) > 1 else ""
        if not new:
            return f"Persona:\n> {self.persona.get(self.bot)}"
        if self._scoped(caller):  # the persona speaks on every platform
            return self._read_only(caller, "changing the persona")
        self.persona.set(self.bot, new)
        return "Persona changed for this running bot (the config file still has the old one)."

    async def _reset(self, caller: Caller, words: list[str], raw: str) -> str:
        if caller.is_group and not self.is_admin(caller):
            return "In a group only this bot's admins can use /reset (it changes what " \
                   "everyone here sees)."
        if self.history is None:
            return "This bot keeps no conversation history."
        return await reset_chat(self.history, bot=self.bot, chat=caller.chat,
                                platform=caller.platform)

    async def _forget(self, caller: Caller, words: list[str], raw: str) -> str:
        if [w.lower() for w in words[:1]] != ["me"] or len(words) > 2 or (
                len(words) == 2 and words[1].lower() != "confirm"):
            return self._usage_of("forget")
        if self.people is None:
            return "Forgetting is not available for this bot."
        user = f"{caller.platform}:{caller.user}"
        if len(words) == 1:
            held = await self.people.show(user, [self.bot])
            self.forget_requests.ask(self.bot, user)
            shared = (" Shared facts other bots hold about you go too."
                      if self.people.shared is not None else "")
            return (f"I keep about you: {held.describe()}.{shared} To delete all of it "
                    "for good, send `/forget me confirm` within 5 minutes.")
        if not self.forget_requests.confirm(self.bot, user):
            return "Send `/forget me` first; then `/forget me confirm` within 5 minutes."
        done = await self.people.forget(user, [self.bot], actor=user)
        log.info("forgot %s on request (bot %s): %d rows", user, self.bot, done.total)
        shared = ("" if done.shared is not None else
                  " Shared memory was not touched (it is not set up for forgetting).")
        return f"Done: I deleted {done.describe()}.{shared}"


def _facts(title: str, facts: list[Fact]) -> str:
    if not facts:
        return f"{title}: none."
    return f"{title}:\n" + "\n".join(
        f"- `{f.id}` {f.text}" + (f" (about {f.user})" if f.user else "") for f in facts)


def _short(value: object) -> str:
    if isinstance(value, datetime):
        return f"{value:%H:%M:%S}"
    text = str(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n} {unit}"
        n //= 1024
    return f"{n} GB"
