"""One outbound scheduler for every platform: stream a reply by send + edits.

A platform implements ``MessageSender`` (a thin layer over its SDK) and
declares its ``Limits``; ``Outbound(sender, budget).stream(chat, items, ...)``
does the rest, the same way everywhere:

- the first message is sent as soon as text arrives, then edited as deltas
  stream in, coalesced: each send or edit takes the next free slot of a
  per-chat ``RateBudget`` (shared by sends and edits, and by every reply in
  that chat), so a fast model never exceeds the platform's limits;
- a ``RetryAfter`` from the sender (429, flood control) pushes the budget's
  slots back and the SAME content is tried again later: nothing lost, nothing
  duplicated (what is shown is only recorded after the peer confirmed it);
- a ``DeliveryTimeout`` on an edit is retried as an edit, never as a new
  message, and a timed-out send is sent again only if the sender's
  ``find_sent`` did not find it: a slow peer cannot produce a second copy;
- the final text (``Reply.full_text``: answer plus footer, in groups too)
  always lands, after whatever waits the peer asks for;
- text longer than ``Limits.max_len`` is split on paragraph or line breaks,
  never inside a code fence (see ``adapters.chat.splitting``); each part is its
  own message.

The sender receives Markdown and renders it for its platform
(``adapters.chat.render``); the splitter measures the Markdown source, which the
renderers only shorten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from adapters.chat.splitting import Measure, split_markdown, utf16_len
from engine.types import Reply

log = logging.getLogger(__name__)

CURSOR = " ▌"  # shown while a reply is still streaming
TYPING_EVERY_S = 4.5  # Telegram shows a chat action for 5 s
EMPTY_REPLY = "(empty reply)"


class DeliveryError(Exception):
    """A send or edit failed for good (chat gone, message deleted, forbidden)."""


class RetryAfter(DeliveryError):
    """The peer rate-limited us; try again after ``seconds``."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"rate limited, retry after {seconds:.1f}s")
        self.seconds = max(float(seconds), 0.0)


class DeliveryTimeout(DeliveryError):
    """The peer did not answer in time: the operation may or may not have landed."""


@dataclass(frozen=True)
class Limits:
    """A platform's message limits, as minimum gaps between operations.

    ``dm_interval_s`` / ``group_interval_s``: between two operations (send or
    edit) in one chat. ``scope_interval_s``: between any two operations of
    one bot (Telegram: ~30 messages/s overall; Discord: 50 requests/s).
    ``scope_edit_interval_s``: between two edits anywhere in the scope
    (Slack chat.update is Tier 3, ~50/min per workspace).
    """

    max_len: int
    dm_interval_s: float
    group_interval_s: float
    scope_interval_s: float = 0.0
    scope_edit_interval_s: float = 0.0
    utf16: bool = False

    @property
    def measure(self) -> Measure:
        return utf16_len if self.utf16 else len


# Published limits, with a margin (the peers' clocks and ours differ).
TELEGRAM = Limits(
    max_len=4096, dm_interval_s=1.1, group_interval_s=3.1, scope_interval_s=1 / 25, utf16=True
)
DISCORD = Limits(max_len=2000, dm_interval_s=1.0, group_interval_s=1.0, scope_interval_s=1 / 45)
SLACK = Limits(
    # 40,000 is the text limit; a section block holds 3,000, so stay there.
    max_len=3000, dm_interval_s=1.0, group_interval_s=1.0, scope_edit_interval_s=1.25
)


class MessageSender(Protocol):
    """What a platform gives the scheduler.

    ``scope`` names the rate-limit scope (``"telegram:<bot>"``, a Slack team).
    ``send`` posts Markdown ``text`` (rendered by the sender) and returns the
    new message id; ``edit`` replaces a message's text (an edit to identical
    text is a success). Both raise ``RetryAfter`` on 429/flood control,
    ``DeliveryTimeout`` when the peer did not answer, ``DeliveryError`` when
    it refused for good. A sender whose platform supports idempotent sends
    (Discord's ``enforce_nonce``) should use it: a timed-out send is retried.
    Optional: ``async typing(chat)`` shows a typing indicator; the scheduler
    calls it every few seconds until the first text arrives. Optional:
    ``async find_sent(chat, text, since)``: the id of our message showing
    ``text`` posted since ``since`` (epoch s) or None, asked after a timed-out send.
    """

    scope: str
    limits: Limits

    async def send(self, chat: str, text: str, reply_to: str | None = None) -> str: ...

    async def edit(self, chat: str, message_id: str, text: str) -> None: ...


class RateBudget(Protocol):
    """Paced slots per key (a chat, a bot, a workspace), GCRA-style.

    ``reserve`` atomically books the next slot of ``key`` (at most ``burst``
    back to back, then one per ``interval_s``) and returns the seconds to
    wait for it. ``penalize`` pushes the key's next slot to at least
    ``seconds`` from now (the peer said retry_after). ``MemoryBudget`` serves
    one process; ``persistence.redis.state.RedisRateBudget`` shares the
    slots between workers.
    """

    async def reserve(self, key: str, interval_s: float, burst: int = 1) -> float: ...

    async def penalize(self, key: str, seconds: float) -> None: ...


class MemoryBudget:
    """``RateBudget`` for one process (GCRA on the monotonic clock)."""

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}  # theoretical arrival time per key
        self._ops = 0

    async def reserve(self, key: str, interval_s: float, burst: int = 1) -> float:
        now = time.monotonic()
        tat = max(self._tat.get(key, now), now)
        wait = max(tat - (max(burst, 1) - 1) * interval_s - now, 0.0)
        self._tat[key] = tat + interval_s
        self._ops += 1
        if self._ops % 1024 == 0:  # forget idle chats
            self._tat = {k: v for k, v in self._tat.items() if v > now}
        return wait

    async def penalize(self, key: str, seconds: float) -> None:
        until = time.monotonic() + seconds
        self._tat[key] = max(self._tat.get(key, 0.0), until)


@dataclass
class Delivery:
    """What ``Outbound.stream`` did: message ids and the figures for the report."""

    message_ids: list[str] = field(default_factory=list)
    sends: int = 0
    edits: int = 0
    retries: int = 0
    first_visible_s: float | None = None
    final_landed: bool = False
    reply: Reply | None = None


@dataclass
class _Draft:
    text: str = ""
    final: bool = False
    reply: Reply | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    typed_at: float = float("-inf")
    created: float = field(default_factory=time.monotonic)


class Outbound:
    """Streams replies for one ``MessageSender`` (see the module docstring).

    ``max_failures``: consecutive failed operations (timeouts, permanent
    errors) after which a reply is abandoned and logged; rate limits do not
    count, they are waited out (up to ``max_wait_s`` each).
    """

    def __init__(
        self,
        sender: MessageSender,
        budget: RateBudget | None = None,
        *,
        max_failures: int = 6,
        max_wait_s: float = 300.0,
        cursor: str = CURSOR,
        typing_after_s: float = 0.5,
    ) -> None:
        self.sender = sender
        self.budget: RateBudget = budget or MemoryBudget()
        self.max_failures = max_failures
        self.max_wait_s = max_wait_s
        self.cursor = cursor
        self.typing_after_s = typing_after_s

    async def stream(
        self,
        chat: str,
        items: AsyncIterator[str | Reply],
        *,
        is_group: bool,
        reply_to: str | None = None,
    ) -> Delivery:
        """Show ``items`` (text deltas, then one ``Reply``) in ``chat``."""
        draft = _Draft()
        pump = asyncio.create_task(self._pump(items, draft))
        try:
            return await self._deliver(chat, draft, is_group=is_group, reply_to=reply_to)
        finally:
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def send_text(self, chat: str, text: str, *, is_group: bool,
                        reply_to: str | None = None) -> Delivery:
        """Send a complete text (command answers), through the same budget."""

        async def once() -> AsyncIterator[str | Reply]:
            yield Reply(text=text, served_by=None)

        return await self.stream(chat, once(), is_group=is_group, reply_to=reply_to)

    @staticmethod
    async def _pump(items: AsyncIterator[str | Reply], draft: _Draft) -> None:
        try:
            async for item in items:
                if isinstance(item, Reply):
                    draft.text, draft.reply = item.full_text, item
                    break
                draft.text += item
                draft.changed.set()
        except Exception:
            # The engine promises not to raise; if it does, show what we have.
            log.exception("reply stream failed")
            draft.text += "\n\n(reply interrupted)"
        draft.final = True
        draft.changed.set()

    def _parts(self, draft: _Draft) -> tuple[list[str], bool]:
        final = draft.final
        text = draft.text if draft.text.strip() else (EMPTY_REPLY if final else "")
        if not text:
            return [], final
        limits = self.sender.limits
        room = limits.max_len - (0 if final else len(self.cursor))
        parts = split_markdown(text, room, measure=limits.measure)
        if not final:
            parts[-1] += self.cursor
        return parts, final

    def _keys(self, chat: str, is_group: bool, edit: bool) -> dict[str, float]:
        limits, scope = self.sender.limits, self.sender.scope
        keys = {f"out:{scope}:chat:{chat}": (
            limits.group_interval_s if is_group else limits.dm_interval_s)}
        if limits.scope_interval_s:
            keys[f"out:{scope}:all"] = limits.scope_interval_s
        if edit and limits.scope_edit_interval_s:
            keys[f"out:{scope}:edits"] = limits.scope_edit_interval_s
        return keys

    async def _typing_until_text(self, chat: str, draft: _Draft) -> None:
        """Show "typing..." (if the sender can) until the first text arrives.

        A slow first token (a local model reads the whole prompt first) would
        otherwise look like silence. Only after ``typing_after_s`` (a command
        answer or a fast model needs none), then every few seconds; best
        effort: failures are ignored.
        """
        typing = getattr(self.sender, "typing", None)
        while not draft.changed.is_set():
            now = time.monotonic()
            due = max(draft.created + self.typing_after_s, draft.typed_at + TYPING_EVERY_S)
            if typing is not None and now >= due:
                draft.typed_at = now
                with contextlib.suppress(Exception):
                    await typing(chat)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(due - now if typing is not None else None):
                    await draft.changed.wait()

    async def _acquire(self, key: str, interval: float) -> bool:
        """Wait for a slot of ``key``; True if we had to wait.

        A slot we wake up for much too late (the loop was busy) is stale:
        using it would bunch us with the tasks whose slots follow, so book a
        fresh one (at most twice; then go).
        """
        waited = False
        for _ in range(3):
            wait = await self.budget.reserve(key, interval)
            if wait <= 0:
                return waited
            waited = True
            due = time.monotonic() + wait
            await asyncio.sleep(wait)  # pacing: the wait is the point
            if time.monotonic() - due <= interval:
                return waited
        return waited

    async def _find_sent(self, chat: str, text: str, since: float) -> tuple[str, str] | None:
        """(id, text) of a timed-out send that landed; None: send it again."""
        find = getattr(self.sender, "find_sent", None)
        with contextlib.suppress(DeliveryError):
            if find is not None and (found := await find(chat, text, since)) is not None:
                return str(found), text
        return None

    @staticmethod
    def _next_op(parts: list[str], shown: list[str]) -> int | None:
        for i, part in enumerate(parts):
            if i >= len(shown) or shown[i] != part:
                return i
        return None

    async def _deliver(
        self, chat: str, draft: _Draft, *, is_group: bool, reply_to: str | None
    ) -> Delivery:
        out = Delivery()
        shown: list[str] = []  # what each sent message shows, confirmed by the peer
        started = time.monotonic()
        failures = 0
        unsure: tuple[str, float] | None = None  # a send that timed out: (text, when)
        while True:
            parts, final = self._parts(draft)
            # A final text shorter than the stream (an error replaced it):
            # blank the surplus messages rather than leave stale text.
            if final and len(parts) < len(shown):
                parts += ["…"] * (len(shown) - len(parts))
            index = self._next_op(parts, shown)
            if index is None:
                if final:
                    out.final_landed, out.reply = True, draft.reply
                    return out
                draft.changed.clear()
                if out.message_ids:
                    await draft.changed.wait()
                else:
                    await self._typing_until_text(chat, draft)
                continue
            is_edit = index < len(out.message_ids)
            keys = self._keys(chat, is_group, is_edit)
            waited = False
            # Longest interval first, one after the other: the short (bot-wide)
            # slot is booked right before we act, so executions stay paced.
            for key, interval in sorted(keys.items(), key=lambda kv: -kv[1]):
                waited = await self._acquire(key, interval) or waited
            if waited:
                # Coalesce: whatever arrived while we waited goes out now.
                parts, final = self._parts(draft)
                if final and len(parts) < len(shown):
                    parts += ["…"] * (len(shown) - len(parts))
                index = self._next_op(parts, shown)
                if index is None:
                    continue
                is_edit = index < len(out.message_ids)
            if unsure is not None and not is_edit:  # did the timed-out send land?
                landed, unsure = await self._find_sent(chat, *unsure), None
                if landed is not None:
                    out.sends += 1
                    out.message_ids.append(landed[0])
                    shown.append(landed[1])
                    continue
            text = parts[index]
            asked = time.time()
            try:
                if is_edit:
                    await self.sender.edit(chat, out.message_ids[index], text)
                    out.edits += 1
                    shown[index] = text
                else:
                    first = not out.message_ids
                    mid = await self.sender.send(chat, text, reply_to if first else None)
                    out.sends += 1
                    out.message_ids.append(mid)
                    shown.append(text)
                    if first:
                        out.first_visible_s = time.monotonic() - started
                failures = 0
                # Pace the chat from when the peer answered, not from when we
                # asked: a request delayed on the way (a busy loop, a slow
                # network) cannot then land too close to the next one.
                chat_key = next(iter(keys))
                await self.budget.penalize(chat_key, keys[chat_key])
            except RetryAfter as exc:
                out.retries += 1
                log.info("%s: rate limited in %s, waiting %.1fs", self.sender.scope, chat,
                         exc.seconds)
                for key in keys:
                    await self.budget.penalize(key, min(exc.seconds, self.max_wait_s))
            except DeliveryTimeout:
                # Retried as the same operation (an edit stays an edit).
                unsure = None if is_edit else (text, asked)
                out.retries += 1
                failures += 1
                if failures >= self.max_failures:
                    log.error("%s: giving up on a reply in %s after %d timeouts",
                              self.sender.scope, chat, failures)
                    return out
            except DeliveryError as exc:
                out.retries += 1
                failures += 1
                log.warning("%s: delivery to %s failed: %s", self.sender.scope, chat, exc)
                if failures >= self.max_failures or not is_edit:
                    return out
                # The message is gone (deleted?): post this part anew.
                out.message_ids, shown = out.message_ids[:index], shown[:index]
