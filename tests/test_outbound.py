"""The splitter and the outbound scheduler, against a fake network-facing sender.

The fake sender enforces the limits it declares (like a platform does) and
can be scripted to answer 429 / time out; the scheduler under test is real.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.chat.outbound import (
    DeliveryError,
    DeliveryTimeout,
    Limits,
    MemoryBudget,
    Outbound,
    RetryAfter,
)
from adapters.chat.splitting import split_markdown, utf16_len
from engine.types import Reply

# ---------------------------------------------------------------- splitter


def test_short_text_is_one_part() -> None:
    assert split_markdown("hello", 100) == ["hello"]
    assert split_markdown("", 100) == [""]


def test_splits_at_paragraphs() -> None:
    text = "a" * 50 + "\n\n" + "b" * 50 + "\n\n" + "c" * 50
    parts = split_markdown(text, 110)
    assert parts == ["a" * 50 + "\n\n" + "b" * 50, "c" * 50]


def test_code_fence_is_closed_and_reopened() -> None:
    code = "\n".join(f"line {i} = {i * i}" for i in range(60))
    text = "Here:\n\n```python\n" + code + "\n```\n\nDone."
    parts = split_markdown(text, 200)
    assert len(parts) > 2
    for part in parts:
        assert len(part) <= 200
        # every part has balanced fences, so each renders as code
        assert sum(1 for ln in part.split("\n") if ln.startswith("```")) % 2 == 0
    assert parts[1].startswith("```python\n")
    for line in code.split("\n"):  # no line of code is cut in two
        assert any(line in p.split("\n") for p in parts)


def test_prefers_a_break_outside_the_fence() -> None:
    text = "intro paragraph " * 3 + "\n\n```\n" + "x\n" * 30 + "```\n\ntail"
    parts = split_markdown(text, 70)
    assert parts[0] == "intro paragraph " * 3


def test_no_tiny_first_message_before_a_long_fence() -> None:
    code = "\n".join(f"line {i}" for i in range(100))
    parts = split_markdown("Here:\n\n```py\n" + code + "\n```", 200)
    assert parts[0].startswith("Here:\n\n```py\nline 0") and parts[0].endswith("\n```")
    assert len(parts[0]) > 150


def test_hard_cut_of_one_long_word() -> None:
    parts = split_markdown("z" * 250, 100)
    assert all(len(p) <= 100 for p in parts) and "".join(parts) == "z" * 250


def test_utf16_measure() -> None:
    text = "😀" * 100  # 200 UTF-16 units
    parts = split_markdown(text, 64, measure=utf16_len)
    assert all(utf16_len(p) <= 64 for p in parts) and "".join(parts) == text


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(alphabet="abc de\n", min_size=0, max_size=80),
            st.sampled_from(["```py\n", "\n```\n", "\n\n", "```\n"]),
        ),
        max_size=40,
    ),
    st.integers(min_value=40, max_value=300),
)
def test_split_properties(chunks: list[str], limit: int) -> None:
    text = "".join(chunks)
    parts = split_markdown(text, limit)
    assert all(len(p) <= limit for p in parts)
    # nothing but break characters and fence markers (closed/reopened) changes
    def squash(s: str) -> str:
        return "".join(s.replace("```py", "").replace("```", "").split())

    assert squash("".join(parts)) == squash(text)



def test_split_is_stable_under_growth() -> None:
    text = ("word " * 30 + "\n\n") * 10
    first = split_markdown(text, 300)[0]
    assert split_markdown(text + "more words " * 50, 300)[0] == first


# ------------------------------------------------------------- scheduler


class FakeSender:
    """A fake of the network-facing sender that enforces its own limits."""

    def __init__(self, limits: Limits, script: list[str] | None = None) -> None:
        self.scope = "test"
        self.limits = limits
        # one step per call: "ok", "429", "timeout", "timeout-applied", "gone", "deleted"
        self.script = list(script or [])
        self.messages: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.last_op: dict[str, float] = {}
        self.violations = 0

    def _check(self, chat: str, interval: float) -> None:
        now = time.monotonic()
        # Our limits keep a margin over the platform's (1.1 s vs 1 s); these
        # limits are 30x tighter, so allow half an interval of scheduling jitter
        # (a shared machine under load). Without a shared budget, concurrent
        # replies would fire at the same instant and still be caught.
        if now - self.last_op.get(chat, -1e9) < interval * 0.5:
            self.violations += 1
            raise RetryAfter(interval)
        self.last_op[chat] = now

    def _next(self) -> str:
        return self.script.pop(0) if self.script else "ok"

    async def send(self, chat: str, text: str, reply_to: str | None = None) -> str:
        step = self._next()
        self.calls.append(("send", text))
        if step == "429":
            raise RetryAfter(0.05)
        if step == "gone":
            raise DeliveryError("chat not found")
        self._check(chat, self.limits.dm_interval_s)
        mid = str(len(self.messages) + 1)
        self.messages[mid] = text
        return mid

    async def edit(self, chat: str, message_id: str, text: str) -> None:
        step = self._next()
        self.calls.append(("edit", text))
        if step == "429":
            raise RetryAfter(0.05)
        if step == "timeout":
            raise DeliveryTimeout("no answer")
        if step == "deleted":  # a user deleted the message being edited
            self.messages.pop(message_id, None)
            raise DeliveryError("message to edit not found")
        if step == "timeout-applied":  # the edit landed but the answer was lost
            self.messages[message_id] = text
            raise DeliveryTimeout("no answer")
        self._check(chat, self.limits.dm_interval_s)
        self.messages[message_id] = text


FAST = Limits(max_len=120, dm_interval_s=0.03, group_interval_s=0.05)
ROOMY = Limits(max_len=1000, dm_interval_s=0.03, group_interval_s=0.05)


async def _deltas(
    words: list[str], footer: str = "", gap: float = 0.0
) -> AsyncIterator[str | Reply]:
    for w in words:
        yield w
        if gap:
            await asyncio.sleep(gap)
    yield Reply(text="".join(words), served_by="p", footer=footer)


async def test_streams_by_edits_and_final_has_footer() -> None:
    sender = FakeSender(ROOMY)
    words = [f"w{i} " for i in range(40)]
    out = await Outbound(sender).stream("c", _deltas(words, "— via p", 0.003), is_group=False)
    assert out.final_landed and out.sends == 1 and out.edits >= 1
    assert sender.messages[out.message_ids[0]] == "".join(words) + "\n\n— via p"
    assert sender.violations == 0
    # coalescing: far fewer operations than deltas
    assert out.sends + out.edits < len(words)


async def test_retry_after_loses_and_duplicates_nothing() -> None:
    sender = FakeSender(FAST, script=["ok", "429", "429", "ok", "429"])
    words = [f"w{i} " for i in range(20)]
    out = await Outbound(sender).stream("c", _deltas(words, gap=0.005), is_group=False)
    assert out.retries >= 2 and out.final_landed
    assert list(sender.messages.values()) == ["".join(words)]


async def test_timed_out_edit_never_makes_a_second_copy() -> None:
    sender = FakeSender(FAST, script=["ok", "timeout-applied", "timeout", "ok"])
    words = [f"w{i} " for i in range(10)]
    out = await Outbound(sender).stream("c", _deltas(words, gap=0.01), is_group=False)
    assert out.final_landed
    assert [kind for kind, _ in sender.calls].count("send") == 1
    assert list(sender.messages.values()) == ["".join(words)]


async def test_long_reply_is_split_into_messages() -> None:
    sender = FakeSender(FAST)
    paragraphs = [f"paragraph {i} " + "x" * 40 for i in range(8)]
    text = "\n\n".join(paragraphs)

    async def items() -> AsyncIterator[str | Reply]:
        for i in range(0, len(text), 25):
            yield text[i : i + 25]
        yield Reply(text=text, served_by="p")

    out = await Outbound(sender).stream("c", items(), is_group=True)
    shown = [sender.messages[m] for m in out.message_ids]
    assert len(shown) > 1 and all(len(s) <= FAST.max_len for s in shown)
    assert "\n\n".join(shown) == text


async def test_permanent_failure_gives_up_cleanly() -> None:
    sender = FakeSender(FAST, script=["gone"])
    out = await Outbound(sender).stream("c", _deltas(["hi"]), is_group=False)
    assert not out.final_landed and out.message_ids == []


async def test_empty_reply_shows_placeholder() -> None:
    sender = FakeSender(FAST)
    out = await Outbound(sender).stream("c", _deltas([]), is_group=False)
    assert out.final_landed and list(sender.messages.values()) == ["(empty reply)"]


async def test_budget_is_shared_by_concurrent_replies_in_one_chat() -> None:
    sender = FakeSender(FAST)
    outbound = Outbound(sender, MemoryBudget())
    results = await asyncio.gather(*[
        outbound.stream("same", _deltas([f"reply {n} ", "more ", "text"], gap=0.01),
                        is_group=False)
        for n in range(5)
    ])
    assert sender.violations == 0
    assert sorted(sender.messages[r.message_ids[0]] for r in results) == sorted(
        f"reply {n} more text" for n in range(5))


@pytest.mark.parametrize("seconds", [0.0, 0.2])
async def test_budget_hold_delays_next_slot(seconds: float) -> None:
    budget = MemoryBudget()
    await budget.penalize("k", seconds)
    wait = await budget.reserve("k", 0.01)
    assert (wait > 0.1) == (seconds > 0.1)


async def test_deleted_message_is_posted_anew_with_the_final_text() -> None:
    sender = FakeSender(FAST, script=["ok", "deleted"])
    words = [f"w{i} " for i in range(6)]
    out = await Outbound(sender).stream("c", _deltas(words, gap=0.01), is_group=False)
    assert out.final_landed and len(out.message_ids) == 1
    assert list(sender.messages.values()) == ["".join(words)]


async def test_final_shorter_than_the_stream_blanks_surplus_messages() -> None:
    """A provider failure after a long partial answer: the Reply's text is the
    short explanation; stale parts must not stay on screen."""
    on_screen = asyncio.Event()

    class WatchedSender(FakeSender):
        async def send(self, chat: str, text: str, reply_to: str | None = None) -> str:
            mid = await super().send(chat, text, reply_to)
            if len(self.messages) >= 3:  # the partial answer is on screen, in 3 parts
                on_screen.set()
            return mid

    sender = WatchedSender(FAST)
    partial = ("x" * 50 + "\n\n") * 6

    async def items() -> AsyncIterator[str | Reply]:
        yield partial
        await on_screen.wait()
        yield Reply(text="Sorry, every provider failed.", served_by=None, error="all_failed")

    out = await Outbound(sender).stream("c", items(), is_group=False)
    shown = [sender.messages[m] for m in out.message_ids]
    assert len(shown) == 3 and shown[0] == "Sorry, every provider failed."
    assert set(shown[1:]) == {"…"}


async def test_typing_is_shown_until_the_first_text() -> None:
    typed: list[str] = []

    class TypingSender(FakeSender):
        async def typing(self, chat: str) -> None:
            typed.append(chat)

    async def slow_first_token() -> AsyncIterator[str | Reply]:
        yield "   "  # whitespace: nothing to show yet, and no second typing call
        await asyncio.sleep(0.1)
        yield "hello"
        yield Reply(text="   hello", served_by="p")

    sender = TypingSender(FAST)
    out = await Outbound(sender, typing_after_s=0.05).stream(
        "c", slow_first_token(), is_group=False)
    assert out.final_landed and typed == ["c"]
    assert list(sender.messages.values()) == ["   hello"]
    # a complete text at once (a command's answer) shows no typing at all
    await Outbound(sender, typing_after_s=0.05).send_text("d", "done", is_group=False)
    assert typed == ["c"]
