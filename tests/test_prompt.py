"""Prompt assembly is pure: check the budget rules and what reaches the model."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.footer import footer
from engine.prompt import build_prompt, estimate_tokens, render_fact, request_tokens
from engine.types import Attachment, Fact, Failure, IncomingMessage, StoredMessage


def msg(text: str, attachments: tuple[Attachment, ...] = ()) -> IncomingMessage:
    return IncomingMessage(platform="terminal", bot="b", chat="c", user="u", text=text,
                           attachments=attachments)


def turn(i: int, role: str = "user", size: int = 40) -> StoredMessage:
    return StoredMessage(id=i, bot="b", chat="c", role=role,  # type: ignore[arg-type]
                         content=f"{i}:" + "x" * size)


def test_history_is_dropped_oldest_first_to_fit() -> None:
    history = [turn(i, "user" if i % 2 == 0 else "assistant", size=400) for i in range(40)]
    prompt = build_prompt(persona="P", message=msg("now"), history=history,
                          context_window=2048, max_output_tokens=512)
    kept = prompt.request.messages[1:-1]
    assert 0 < len(kept) < 40 and prompt.dropped_history == 40 - len(kept)
    assert [m.content for m in kept] == [h.content for h in history[-len(kept):]]
    assert request_tokens(prompt.request) <= 2048 - 512
    assert prompt.request.messages[-1].content == "now"
    assert prompt.notices == ()


def test_a_message_too_big_alone_is_cut_with_a_notice() -> None:
    prompt = build_prompt(persona="P", message=msg("y" * 100_000),
                          history=[turn(1)], context_window=4096, max_output_tokens=512)
    user = prompt.request.messages[-1]
    assert len(prompt.request.messages) == 2  # no room for history either
    assert "message truncated" in user.content
    assert prompt.truncated_chars > 80_000
    assert "too long" in prompt.notices[0]
    assert request_tokens(prompt.request) <= 4096 - 512


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), max_size=30), text=st.integers(0, 50_000),
       window=st.integers(1024, 32_768))
def test_prompt_always_fits_the_budget(sizes: list[int], text: int, window: int) -> None:
    history = [turn(i, size=s) for i, s in enumerate(sizes)]
    prompt = build_prompt(persona="You are kind.", message=msg("z" * text), history=history,
                          context_window=window, max_output_tokens=512)
    assert request_tokens(prompt.request) <= window - 512
    assert prompt.request.messages[0].role == "system"
    assert prompt.request.messages[-1].role == "user"


def test_facts_carry_provenance() -> None:
    own = Fact(id="1", text="Likes tea", bot="b", user="u",
               created_at=datetime(2026, 1, 2, tzinfo=UTC))
    shared = Fact(id="2", text="Office in Lyon", bot="scribe", trust_level="trusted",
                  author_bot="scribe", author_name="Scribe Bot")
    assert render_fact(own) == "- Likes tea (about u; remembered on 2026-01-02)"
    assert render_fact(shared) == "- Office in Lyon (general; shared by bot 'Scribe Bot')"
    prompt = build_prompt(persona="P", message=msg("q"), facts=[own, shared])
    system = prompt.request.messages[0].content
    assert system.startswith("P\n\nThings you remember")
    assert render_fact(own) in system and render_fact(shared) in system


def test_attachments_text_and_images() -> None:
    doc = Attachment(name="notes.txt", mime_type="text/plain", size=5, text="hello")
    image = Attachment(name="cat.png", mime_type="image/png", size=3, data=b"png")
    blind = build_prompt(persona="P", message=msg("see", (doc, image)), vision=False)
    user = blind.request.messages[-1]
    assert "[attached file 'notes.txt' (text/plain)]\nhello" in user.content
    assert "this model cannot see images" in user.content and user.images == ()
    seeing = build_prompt(persona="P", message=msg("see", (doc, image)), vision=True)
    assert seeing.request.messages[-1].images == (image,)


def test_request_carries_who_asked_but_no_output_limit() -> None:
    request = build_prompt(persona="P", message=msg("q"), temperature=0.2).request
    assert (request.bot, request.user, request.temperature) == ("b", "u", 0.2)
    assert request.max_tokens is None


def test_estimate() -> None:
    assert estimate_tokens("") == 0 and estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2


def test_footer_lines() -> None:
    failures = (Failure("primary", "rate_limited", "rate limited"),
                Failure("second", "timeout", "timed out before first token"))
    assert footer("on_failover", served_by="backup", model="gpt-4o-mini",
                  failures=failures) == (
        "-- served by backup (gpt-4o-mini); primary failed: rate limited; "
        "second failed: timed out before first token")
    assert footer("never", served_by="b", model="m", failures=failures,
                  notices=("note",)) == "-- note"
    assert footer("always", served_by=None, model=None) == ""
