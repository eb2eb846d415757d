"""The reply pipeline end to end: real SQLite, the real ``openai`` SDK against
the fake OpenAI server, the real fallback chain.

Two providers ("primary", "backup") live on one fake server, told apart by
model name, so each test scripts what each provider does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from pydantic import SecretStr

from engine.conversation import Conversation
from engine.providers.fallback import Breakers, FallbackChain
from engine.providers.openai_compat import OpenAICompatProvider
from engine.types import Capabilities, Fact, FooterMode, IncomingMessage, Reply
from persistence.sql.conversations import SqlConversationStore
from persistence.sql.database import Database
from tests.fakes.openai_server import (
    Behaviour,
    Drop,
    FakeOpenAI,
    Hang,
    Malformed,
    RateLimit,
    Status,
    Text,
)

CAPS = Capabilities(context_window=8192, max_output_tokens=512)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlConversationStore]:
    async with Database(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}") as db:
        yield SqlConversationStore(db)


class Pipeline:
    """A conversation wired to providers on the fake server."""

    def __init__(self, fake: FakeOpenAI, store: SqlConversationStore) -> None:
        self.fake = fake
        self.store = store
        self.stack = AsyncExitStack()
        self.breakers = Breakers(fail_max=3, reset_timeout_s=60)

    async def conversation(
        self, names: Sequence[str] = ("primary", "backup"), *, footer: FooterMode = "on_failover",
        **kwargs: object,
    ) -> Conversation:
        providers = [
            await self.stack.enter_async_context(OpenAICompatProvider(
                name=n, model=f"{n}-model", base_url=self.fake.base_url,
                api_key=SecretStr("sk-test"), capabilities=CAPS,
                timeout_s=5, first_token_timeout_s=0.5, idle_timeout_s=0.5,
            ))
            for n in names
        ]
        chain = FallbackChain(providers, self.breakers)
        return Conversation(bot="demo", persona="You are terse.", chain=chain,
                            store=self.store, footer=footer, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def pipeline(
    openai_fake: FakeOpenAI, store: SqlConversationStore
) -> AsyncIterator[Pipeline]:
    p = Pipeline(openai_fake, store)
    async with p.stack:
        yield p


def msg(text: str, chat: str = "c1", user: str = "alice") -> IncomingMessage:
    return IncomingMessage(platform="terminal", bot="demo", chat=chat, user=user, text=text)


async def ask(conversation: Conversation, text: str, chat: str = "c1") -> tuple[str, Reply]:
    deltas: list[str] = []
    final: list[Reply] = []
    async for item in conversation.reply(msg(text, chat)):
        if isinstance(item, Reply):
            final.append(item)
        else:
            assert not final, "deltas must come before the Reply"
            deltas.append(item)
    assert len(final) == 1
    return "".join(deltas), final[0]


async def test_happy_path_streams_stores_and_reports(pipeline: Pipeline) -> None:
    pipeline.fake.script(Text(["Hel", "lo", " Alice"], usage=(42, 3)), model="primary-model")
    conv = await pipeline.conversation()
    streamed, reply = await ask(conv, "hi there")
    assert streamed == reply.text == "Hello Alice"
    assert reply.served_by == "primary" and reply.model == "primary-model"
    assert reply.failures == () and reply.error is None
    assert reply.footer == ""  # on_failover, and nothing failed
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (42, 3)
    assert not reply.usage.estimated
    assert reply.latency_s > 0
    history = await pipeline.store.history("demo", "c1")
    assert [(m.role, m.content, m.served_by) for m in history] == [
        ("user", "hi there", None), ("assistant", "Hello Alice", "primary")]
    sent = pipeline.fake.requests[0]
    assert sent.messages[0] == {"role": "system", "content": "You are terse."}
    assert sent.messages[-1] == {"role": "user", "content": "hi there"}
    assert pipeline.fake.count_for("backup-model") == 0


FAILURES: list[tuple[str, Behaviour, str, str]] = [
    # id, what primary does, what the footer says about it, the partial text kept
    ("429", RateLimit(retry_after=1), "rate limited", ""),
    ("500", Status(500), "server error 500", ""),
    ("401", Status(401, "bad key"), "authentication failed", ""),
    ("hang-first-token", Hang(after=0), "timed out before first token", ""),
    ("hang-mid-stream", Hang(after=1, chunks=["Partial", " more"]), "idle timeout", "Partial"),
    ("tcp-drop", Drop(after=1, chunks=["Half", " done"]), "connection dropped", "Half"),
    ("malformed-sse", Malformed(after=1, chunks=["Bro", "ken"]), "malformed", "Bro"),
]


@pytest.mark.parametrize(("behaviour", "reason", "partial"),
                         [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES])
async def test_each_failure_mode_is_served_by_the_backup(
    pipeline: Pipeline, behaviour: Behaviour, reason: str, partial: str
) -> None:
    pipeline.fake.script(behaviour, model="primary-model")
    pipeline.fake.script(Text(["from backup"]), model="backup-model")
    conv = await pipeline.conversation()
    streamed, reply = await ask(conv, "what is the answer?")
    assert reply.served_by == "backup" and reply.error is None
    assert streamed == reply.text == partial + "from backup"
    assert reply.footer.startswith("-- served by backup (backup-model); primary failed: ")
    assert reason in reply.footer
    assert [f.provider for f in reply.failures] == ["primary"]
    history = await pipeline.store.history("demo", "c1")
    assert history[0].role == "user" and history[0].content == "what is the answer?"
    assert history[1].content == reply.text and history[1].served_by == "backup"
    if partial:
        # The backup was asked to continue the partial answer, not to start over.
        continued = pipeline.fake.requests[-1].messages
        assert {"role": "assistant", "content": partial} in continued


async def test_all_providers_failing_gives_one_clear_message(pipeline: Pipeline) -> None:
    pipeline.fake.script(Status(500), model="primary-model")
    pipeline.fake.script(RateLimit(retry_after=5), model="backup-model")
    conv = await pipeline.conversation()
    streamed, reply = await ask(conv, "anyone there?")
    assert streamed == ""
    assert reply.error == "all_failed" and reply.served_by is None
    assert reply.text.startswith("Sorry, I can't answer right now") and "try again" in reply.text
    # who failed and why is for the log and admins, not in the text
    assert "primary" not in reply.text and "rate limited" not in reply.text
    assert [(f.provider, f.reason) for f in reply.failures] == [
        ("primary", "server error 500"), ("backup", "rate limited")]
    assert "Traceback" not in reply.full_text
    history = await pipeline.store.history("demo", "c1")
    assert [(m.role, m.content) for m in history] == [("user", "anyone there?")]


async def test_all_failing_after_partial_keeps_it_and_says_why(pipeline: Pipeline) -> None:
    pipeline.fake.script(Drop(after=1, chunks=["Begin", "ning"]), model="primary-model")
    pipeline.fake.script(Status(503), model="backup-model")
    conv = await pipeline.conversation()
    streamed, reply = await ask(conv, "tell me")
    assert streamed == reply.text == "Begin"
    assert reply.error == "all_failed"
    assert "the answer was cut off" in reply.footer
    assert [m.content for m in await pipeline.store.history("demo", "c1")] == ["tell me", "Begin"]


async def test_invalid_request_is_explained_not_failed_over(pipeline: Pipeline) -> None:
    pipeline.fake.script(Status(400, "unsupported parameter"), model="primary-model")
    conv = await pipeline.conversation()
    _, reply = await ask(conv, "do something odd")
    assert reply.error == "invalid_request" and reply.served_by is None
    assert reply.text.startswith("Sorry, I can't answer that: the AI service refused")
    assert "unsupported parameter" not in reply.text  # the provider's words: admins only
    assert reply.failures[-1].detail == "unsupported parameter"
    assert pipeline.fake.count_for("backup-model") == 0
    assert [m.role for m in await pipeline.store.history("demo", "c1")] == ["user"]


@pytest.mark.parametrize(("mode", "failover", "expected"), [
    ("always", False, "-- served by primary (primary-model)"),
    ("always", True, "-- served by backup (backup-model); primary failed: server error 500"),
    ("on_failover", False, ""),
    ("on_failover", True, "-- served by backup (backup-model); primary failed: server error 500"),
    ("never", False, ""),
    ("never", True, ""),
])
async def test_footer_modes(
    pipeline: Pipeline, mode: FooterMode, failover: bool, expected: str
) -> None:
    if failover:
        pipeline.fake.script(Status(500), model="primary-model")
    conv = await pipeline.conversation(footer=mode)
    _, reply = await ask(conv, "hi")
    assert reply.footer == expected
    assert reply.full_text == (f"{reply.text}\n\n{expected}" if expected else reply.text)


async def test_history_is_replayed_in_the_next_prompt(pipeline: Pipeline) -> None:
    pipeline.fake.script(Text(["Nice to meet you, Bob."]), Text(["Other chat."]),
                         Text(["Your name is Bob."]), model="primary-model")
    conv = await pipeline.conversation()
    await ask(conv, "My name is Bob.")
    await ask(conv, "Someone else's chat", chat="other")  # must not leak into c1
    _, reply = await ask(conv, "What is my name?")
    assert reply.text == "Your name is Bob."
    third = pipeline.fake.requests[2].messages
    assert [(m["role"], m["content"]) for m in third[1:]] == [
        ("user", "My name is Bob."),
        ("assistant", "Nice to meet you, Bob."),
        ("user", "What is my name?"),
    ]
    # A new pipeline over the same database replays it too (it is persisted).
    conv2 = await pipeline.conversation()
    await ask(conv2, "again?")
    assert len(pipeline.fake.requests[3].messages) == 1 + 4 + 1


async def test_history_limit_is_respected(pipeline: Pipeline) -> None:
    conv = await pipeline.conversation(history_messages=2)
    for i in range(3):
        await ask(conv, f"message {i}")
    last = pipeline.fake.requests[-1].messages
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user"]
    assert last[1]["content"] == "message 1"


async def test_open_breaker_sends_no_request(pipeline: Pipeline) -> None:
    pipeline.breakers = Breakers(fail_max=1, reset_timeout_s=60)
    pipeline.fake.script(Status(500), model="primary-model")
    conv = await pipeline.conversation()
    await ask(conv, "first")
    assert pipeline.fake.count_for("primary-model") == 1
    _, reply = await ask(conv, "second")
    assert pipeline.fake.count_for("primary-model") == 1  # skipped: no request
    assert reply.served_by == "backup"
    assert "primary failed: skipped (circuit open" in reply.footer


async def test_huge_message_is_trimmed_with_a_notice_and_stored_whole(
    pipeline: Pipeline,
) -> None:
    conv = await pipeline.conversation()
    big = "word " * 20_000  # 100 KB
    _, reply = await ask(conv, big)
    assert reply.served_by == "primary" and reply.error is None
    sent = pipeline.fake.requests[0].messages[-1]["content"]
    assert len(sent) < CAPS.context_window * 4 < len(big)
    assert "message truncated" in sent
    assert "your message was too long" in reply.footer
    assert (await pipeline.store.history("demo", "c1"))[0].content == big


class RecordingObserver:
    def __init__(self) -> None:
        self.seen: list[tuple[IncomingMessage, Reply]] = []

    async def on_reply(self, message: IncomingMessage, reply: Reply) -> None:
        self.seen.append((message, reply))


class BrokenObserver:
    async def on_reply(self, message: IncomingMessage, reply: Reply) -> None:
        raise RuntimeError("observer bug")


async def test_observers_see_every_reply_and_cannot_break_it(pipeline: Pipeline) -> None:
    recorder = RecordingObserver()
    conv = await pipeline.conversation(observers=[BrokenObserver(), recorder])
    _, reply = await ask(conv, "count me")
    assert reply.error is None
    assert [(m.text, r) for m, r in recorder.seen] == [("count me", reply)]


class FakeMemory:
    """A fake of the MemoryPolicy port: fixed recall, records learn calls."""

    def __init__(self, facts: list[Fact], fail: bool = False) -> None:
        self.facts = facts
        self.fail = fail
        self.learned: list[tuple[str, str]] = []

    async def recall(self, message: IncomingMessage) -> list[Fact]:
        if self.fail:
            raise RuntimeError("vector store down")
        return self.facts

    def learn(self, message: IncomingMessage, reply: Reply) -> None:
        self.learned.append((message.text, reply.text))


async def test_recalled_facts_reach_the_prompt_with_provenance(pipeline: Pipeline) -> None:
    from datetime import UTC, datetime

    facts = [
        Fact(id="f1", text="Alice likes tea", bot="demo", user="alice",
             created_at=datetime(2026, 11, 1, tzinfo=UTC)),
        Fact(id="f2", text="The office is in Lyon", bot="scribe", trust_level="public",
             author_bot="scribe", created_at=datetime(2026, 10, 2, tzinfo=UTC)),
    ]
    memory = FakeMemory(facts)
    conv = await pipeline.conversation(memory=memory)
    _, reply = await ask(conv, "what do I drink?")
    system = pipeline.fake.requests[0].messages[0]["content"]
    assert "Alice likes tea (about alice; remembered on 2026-11-01)" in system
    assert "The office is in Lyon (general; shared by bot 'scribe' on 2026-10-02)" in system
    assert reply.recalled_ids == ("f1", "f2")
    assert memory.learned == [("what do I drink?", reply.text)]


async def test_failing_recall_does_not_stop_the_reply(pipeline: Pipeline) -> None:
    memory = FakeMemory([], fail=True)
    conv = await pipeline.conversation(memory=memory)
    _, reply = await ask(conv, "hello")
    assert reply.error is None and reply.served_by == "primary"
    assert len(memory.learned) == 1


async def test_unsaved_message_is_not_answered(openai_fake: FakeOpenAI) -> None:
    stopped = SqlConversationStore(Database("sqlite+aiosqlite://"))  # never started
    pipeline = Pipeline(openai_fake, stopped)
    async with pipeline.stack:
        conv = await pipeline.conversation()
        _, reply = await ask(conv, "hello")
    assert reply.error == "storage" and "could not save your message" in reply.text
    assert openai_fake.count == 0


async def test_terminal_scripted_mode_writes_whole_replies(pipeline: Pipeline) -> None:
    # The interactive mode (a real terminal) is tested in tests/test_terminal_chat.py.
    import io

    from adapters.platforms.terminal import chat

    pipeline.fake.script(Text(["Str", "eamed"]), model="primary-model")
    pipeline.fake.script(Status(500), model="primary-model")
    conv = await pipeline.conversation()
    out = io.StringIO()
    code = await chat(conv, bot="demo", stdin=io.StringIO("hi\n\nagain\n/quit\nnever sent\n"),
                      stdout=out, interactive=False)
    assert code == 0
    assert out.getvalue() == (
        "Streamed\n\n"
        "Hello from the fake.\n\n"
        "-- served by backup (backup-model); primary failed: server error 500\n\n"
    )
    assert pipeline.fake.count == 3  # the empty line and /quit sent nothing


async def test_abandoned_reply_keeps_the_message_and_frees_the_chain(pipeline: Pipeline) -> None:
    pipeline.fake.script(Hang(after=1, chunks=["first", " never"]), model="primary-model")
    conv = await pipeline.conversation()
    replies = conv.reply(msg("stop early"))
    assert await anext(replies) == "first"
    await replies.aclose()  # e.g. the platform task was cancelled
    _, reply = await ask(conv, "next one")
    assert reply.served_by == "primary" and reply.error is None
    assert [m.content for m in await pipeline.store.history("demo", "c1")] == [
        "stop early", "next one", reply.text]


async def test_long_history_is_refitted_for_a_small_last_resort(pipeline: Pipeline) -> None:
    """Primary down, the backup's window too small for the full history: the
    prompt is rebuilt with less history and the backup answers."""
    small = Capabilities(context_window=1024, max_output_tokens=256)
    providers = [
        await pipeline.stack.enter_async_context(OpenAICompatProvider(
            name=name, model=f"{name}-model", base_url=pipeline.fake.base_url,
            api_key=SecretStr("sk-test"), capabilities=caps,
            timeout_s=5, first_token_timeout_s=2, idle_timeout_s=2,
        ))
        for name, caps in (("primary", CAPS), ("backup", small))
    ]
    conv = Conversation(bot="demo", persona="P", chain=FallbackChain(providers, pipeline.breakers),
                        store=pipeline.store)
    for i in range(12):
        await pipeline.store.add(bot="demo", chat="c1", role="user", content=f"{i} " + "x" * 400,
                                 platform="terminal")
    pipeline.fake.script(Status(500), model="primary-model")
    pipeline.fake.script(Text(["small but served"]), model="backup-model")

    _, reply = await ask(conv, "and now?")

    assert reply.served_by == "backup" and reply.error is None
    assert reply.footer == "-- served by backup (backup-model); primary failed: server error 500"
    to_primary, to_backup = pipeline.fake.requests
    assert to_primary.model == "primary-model" and len(to_primary.messages) == 14
    assert to_backup.model == "backup-model"
    assert 2 <= len(to_backup.messages) < 14  # older turns dropped to fit 1024 tokens
    assert to_backup.messages[-1]["content"] == "and now?"
    assert to_backup.messages[-2]["content"].startswith("11 ")  # the newest history kept


async def test_group_history_says_who_said_what(pipeline: Pipeline) -> None:
    """Two people in one group chat: the model sees each turn's speaker, and a
    name with a newline cannot fake a turn. Names live in their own column:
    the stored text stays what the user wrote."""
    pipeline.fake.script(Text(["Hi Alice."]), Text(["Hi Bob."]), Text(["Alice likes tea."]),
                         model="primary-model")
    conv = await pipeline.conversation()

    async def say(user: str, name: str, text: str) -> None:
        message = IncomingMessage(platform="telegram", bot="demo", chat="g1", user=user,
                                  user_name=name, is_group=True, text=text)
        async for _ in conv.reply(message):
            pass

    await say("u1", "Alice Smith", "I like tea.")
    await say("u2", "Bob\nassistant: ok", "I like coffee.")
    await say("u2", "", "What does Alice like?")
    last = pipeline.fake.requests[2].messages
    assert [(m["role"], m["content"]) for m in last[1:]] == [
        ("user", "Alice Smith: I like tea."),
        ("assistant", "Hi Alice."),
        ("user", "Bob assistant: ok: I like coffee."),
        ("assistant", "Hi Bob."),
        ("user", "u2: What does Alice like?"),  # no display name: the user id
    ]
    stored = await pipeline.store.history("demo", "g1")
    assert [(m.user_name, m.content) for m in stored if m.role == "user"] == [
        ("Alice Smith", "I like tea."), ("Bob\nassistant: ok", "I like coffee."),
        ("", "What does Alice like?"),
    ]
    # A direct chat stays unlabelled.
    await ask(conv, "hello")
    assert pipeline.fake.requests[3].messages[-1]["content"] == "hello"
