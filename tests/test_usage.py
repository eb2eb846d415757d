"""Token and cost accounting, budgets and the usage report.

The pipeline tests run the real ``Conversation`` and ``FallbackChain`` with
the real Bedrock provider (aioboto3 against the fake Bedrock) and the real
OpenAI-compatible provider (openai SDK against the fake OpenAI server), with
usage rows in real SQLite; the store tests also run on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from engine.conversation import Conversation
from engine.providers.bedrock import BedrockProvider
from engine.providers.fallback import Breakers, FallbackChain
from engine.providers.openai_compat import OpenAICompatProvider
from engine.types import Capabilities, CompletionRequest, IncomingMessage, Message, Reply, Usage
from engine.usage import Budget, Price, UsageAccounting, UsageRecord, usage_report
from persistence.sql.conversations import SqlConversationStore
from persistence.sql.database import Database
from persistence.sql.usage import SqlUsageStore
from tests.fakes.bedrock_server import Behaviour, FakeBedrock
from tests.fakes.openai_server import FakeOpenAI, Status, Text

AWS = Price(input_per_mtok=3.0, output_per_mtok=15.0)
CHEAP = Price(input_per_mtok=0.15, output_per_mtok=0.6)
PRICES = {"aws": AWS, "cheap": CHEAP, "free": Price()}
CAPS = Capabilities(context_window=32_000, max_output_tokens=512)
NOON = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)

# One test calls main() in-process, which configures logging process-wide.
pytestmark = pytest.mark.usefixtures("restore_logging")


class Clock:
    """A settable clock, so days and budgets can be tested without waiting."""

    def __init__(self, now: datetime = NOON) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_price_cost() -> None:
    assert AWS.cost(Usage(prompt_tokens=1_000, completion_tokens=2_000)) == \
        pytest.approx(0.003 + 0.03)
    assert Price().cost(Usage(10**6, 10**6)) == 0
    assert AWS.costly and not Price().costly


class Rig:
    """One bot ``demo`` whose chain is built per test from aws / cheap / free."""

    def __init__(self, bedrock: FakeBedrock, openai: FakeOpenAI, db: Database) -> None:
        self.bedrock, self.openai, self.db = bedrock, openai, db
        self.clock = Clock()
        self.store = SqlUsageStore(db)
        self.stack = AsyncExitStack()
        self.breakers = Breakers(fail_max=10)

    async def conversation(
        self, names: tuple[str, ...] = ("aws", "cheap"), budget: Budget | None = None,
        bot: str = "demo",
    ) -> tuple[Conversation, UsageAccounting]:
        accounting = UsageAccounting(self.store, prices=PRICES,
                                     budgets={bot: budget or Budget()}, clock=self.clock)
        providers: list[BedrockProvider | OpenAICompatProvider] = []
        for name in names:
            if name == "aws":
                providers.append(await self.stack.enter_async_context(BedrockProvider(
                    name="aws", model="anthropic.claude-test", capabilities=CAPS,
                    endpoint_url=self.bedrock.url, timeout_s=10,
                    first_token_timeout_s=10, idle_timeout_s=10)))
            else:
                providers.append(await self.stack.enter_async_context(OpenAICompatProvider(
                    name=name, model=f"{name}-model", base_url=self.openai.base_url,
                    api_key=SecretStr("sk-test"), capabilities=CAPS, timeout_s=10)))
        chain = FallbackChain(providers, self.breakers, skip=accounting.skip)
        store = SqlConversationStore(self.db)
        conversation = Conversation(bot=bot, persona="Be terse.", chain=chain, store=store,
                                    observers=[accounting])
        return conversation, accounting


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    async with Database(f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}") as database:
        yield database


@pytest.fixture
async def rig(
    bedrock_fake: FakeBedrock, openai_fake: FakeOpenAI, db: Database
) -> AsyncIterator[Rig]:
    r = Rig(bedrock_fake, openai_fake, db)
    async with r.stack:
        yield r


async def say(conversation: Conversation, text: str, user: str = "alice",
              bot: str = "demo") -> Reply:
    message = IncomingMessage(platform="terminal", bot=bot, chat="c1", user=user, text=text)
    items = [item async for item in conversation.reply(message)]
    final = items[-1]
    assert isinstance(final, Reply)
    return final


async def test_every_reply_gets_a_row_and_costs_add_up(rig: Rig) -> None:
    conversation, _ = await rig.conversation()
    rig.bedrock.push(
        Behaviour(input_tokens=1200, output_tokens=300),  # reported by Bedrock
        Behaviour(usage=False),  # not reported: estimated
        Behaviour(mode="error", error="ThrottlingException"),  # fails over to cheap
    )
    rig.openai.script(Text(chunks=("Cheap", " answer"), usage=(900, 40)))
    replies = [await say(conversation, f"question {i}") for i in range(3)]

    assert [r.served_by for r in replies] == ["aws", "aws", "cheap"]
    lines = await rig.store.summary(since=NOON - timedelta(days=1))
    by_provider = {line.provider: line for line in lines}
    aws, cheap = by_provider["aws"], by_provider["cheap"]
    assert (aws.replies, cheap.replies) == (2, 1)
    assert aws.estimated_replies == 1 and cheap.estimated_replies == 0
    # Reported numbers are kept exactly; the estimate is ~4 characters per token.
    estimated = replies[1].usage
    assert estimated.estimated and estimated.completion_tokens == \
        -(-len("Hello from Bedrock") // 4)
    assert aws.prompt_tokens == 1200 + estimated.prompt_tokens
    assert aws.completion_tokens == 300 + estimated.completion_tokens
    assert (cheap.prompt_tokens, cheap.completion_tokens) == (900, 40)
    # Cost charged to whoever served, at its own prices; the total adds up.
    assert aws.cost_usd == pytest.approx(AWS.cost(replies[0].usage) + AWS.cost(estimated))
    assert cheap.cost_usd == pytest.approx(CHEAP.cost(Usage(900, 40)))
    report = await usage_report(rig.store, days=1, now=NOON)
    assert f"total cost: ${aws.cost_usd + cheap.cost_usd:.4f}" in report
    assert "~" in report.splitlines()[1 + [line.provider for line in lines].index("aws")]


async def test_a_reply_nobody_served_costs_nothing(rig: Rig) -> None:
    conversation, _ = await rig.conversation(("cheap",))
    rig.openai.script(Status(500))
    reply = await say(conversation, "hello?")
    assert reply.error == "all_failed"
    assert await rig.store.summary(since=NOON - timedelta(days=1)) == []


async def test_bot_budget_skips_the_costly_provider_and_says_so(rig: Rig) -> None:
    conversation, _ = await rig.conversation(("aws", "free"),
                                             budget=Budget(bot_usd_per_day=0.001))
    rig.bedrock.push(Behaviour(input_tokens=1000, output_tokens=100))  # $0.0045
    first = await say(conversation, "expensive question")
    assert first.served_by == "aws" and first.footer == ""

    second = await say(conversation, "another one", user="bob")
    assert second.served_by == "free"
    assert rig.bedrock.count == 1  # no request was sent to the costly provider
    assert "aws skipped: over the bot's daily budget ($0.001)" in second.footer
    assert second.failures[0].kind == "skipped"

    # A new UTC day starts at zero.
    rig.clock.now = NOON + timedelta(days=1)
    third = await say(conversation, "next day")
    assert third.served_by == "aws"


async def test_user_budget_only_stops_that_user(rig: Rig) -> None:
    conversation, _ = await rig.conversation(("aws", "free"),
                                             budget=Budget(user_usd_per_day=0.001))
    rig.bedrock.push(Behaviour(input_tokens=1000, output_tokens=100))
    assert (await say(conversation, "one", user="alice")).served_by == "aws"
    over = await say(conversation, "two", user="alice")
    assert over.served_by == "free"
    assert "over your daily budget" in over.footer
    assert (await say(conversation, "three", user="bob")).served_by == "aws"


async def test_free_providers_are_never_skipped(rig: Rig) -> None:
    conversation, _ = await rig.conversation(("free",), budget=Budget(bot_usd_per_day=0))
    assert (await say(conversation, "hi")).served_by == "free"
    assert (await say(conversation, "again")).served_by == "free"


def record(at: datetime, bot: str, provider: str, prompt: int, completion: int,
           *, estimated: bool = False, user: str = "u") -> UsageRecord:
    price = PRICES.get(provider, Price())
    return UsageRecord(at=at, bot=bot, provider=provider, prompt_tokens=prompt,
                       completion_tokens=completion, estimated=estimated, user=user,
                       cost_usd=price.cost(Usage(prompt, completion)))


async def test_store_groups_per_day_bot_provider(database_url: str) -> None:
    async with Database(database_url) as database:
        store = SqlUsageStore(database)
        yesterday = NOON - timedelta(days=1)
        for rec in (
            record(NOON, "demo", "aws", 100, 10),
            record(NOON, "demo", "aws", 200, 20, estimated=True, user="v"),
            record(NOON, "demo", "cheap", 50, 5),
            record(NOON, "other", "aws", 1, 1),
            record(yesterday, "demo", "aws", 1000, 100),
            record(NOON - timedelta(days=9), "demo", "aws", 7, 7),
        ):
            await store.add(rec)

        week = await store.summary(since=NOON - timedelta(days=6))
        assert [(line.day, line.bot, line.provider, line.replies) for line in week] == [
            (date(2026, 11, 24), "demo", "aws", 1),
            (date(2026, 11, 25), "demo", "aws", 2),
            (date(2026, 11, 25), "demo", "cheap", 1),
            (date(2026, 11, 25), "other", "aws", 1),
        ]
        today_demo_aws = week[1]
        assert (today_demo_aws.prompt_tokens, today_demo_aws.completion_tokens) == (300, 30)
        assert today_demo_aws.estimated_replies == 1
        assert today_demo_aws.cost_usd == pytest.approx(AWS.cost(Usage(300, 30)))

        only_other = await store.summary(since=NOON - timedelta(days=6), bot="other")
        assert [line.bot for line in only_other] == ["other"]

        spent = await store.spent(bot="demo", since=datetime(2026, 11, 25, tzinfo=UTC))
        assert spent == pytest.approx({"u": AWS.cost(Usage(100, 10)) + CHEAP.cost(Usage(50, 5)),
                                       "v": AWS.cost(Usage(200, 20))})


async def test_report_text(db: Database) -> None:
    store = SqlUsageStore(db)
    assert await usage_report(store, days=3, now=NOON) == \
        "No usage recorded in the last 3 day(s)."
    await store.add(record(NOON, "demo", "aws", 1_000_000, 0, estimated=True))
    await store.add(record(NOON - timedelta(days=2), "demo", "cheap", 1_000_000, 1_000_000))
    text = await usage_report(store, days=1, now=NOON)
    lines = text.splitlines()
    assert lines[1].split() == ["2026-11-25", "demo", "aws", "1", "~1000000", "~0", "3.0000"]
    assert "total cost: $3.0000 over the last 1 day(s)" in text
    assert "estimated" in lines[-1]
    three_days = await usage_report(store, days=3, now=NOON)
    assert "cheap" in three_days and "total cost: $3.7500" in three_days
    assert "cheap" not in await usage_report(store, bot="nobody", days=3, now=NOON)


# --- wiring: the composition root records usage; `boternity usage` prints it ---

def write_config(tmp_path: Path, bedrock: FakeBedrock, openai: FakeOpenAI) -> Path:
    path = tmp_path / "boternity.toml"
    path.write_text(f"""
[storage]
data_dir = "{tmp_path / 'data'}"

[providers.aws]
kind = "bedrock"
model = "anthropic.claude-test"
endpoint_url = "{bedrock.url}"
price_input_per_mtok = 3.0
price_output_per_mtok = 15.0

[providers.backup]
kind = "openai_compatible"
model = "backup-model"
base_url = "{openai.base_url}"

[bots.demo]
chain = ["aws", "backup"]
budget_usd_per_day = 0.001

[bots.demo.memory]
enabled = false
""", encoding="utf-8")
    return path


async def test_app_records_usage_and_cli_prints_it(
    bedrock_fake: FakeBedrock, openai_fake: FakeOpenAI, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import asyncio

    from adapters.cli.main import main
    from adapters.wiring.build import build_app
    from adapters.wiring.settings import load_settings

    config = write_config(tmp_path, bedrock_fake, openai_fake)
    bedrock_fake.push(Behaviour(input_tokens=1000, output_tokens=100))
    async with build_app(load_settings(config, dotenv=None)) as app:
        first = await say(app.conversations["demo"], "hello")
        second = await say(app.conversations["demo"], "again")
    # An unknown bot is refused before anything starts.
    code = await asyncio.to_thread(main, ["--config", str(config), "--env-file", "",
                                          "usage", "--bot", "nobody"])
    assert code == 2 and "bots.nobody: no such bot (configured: demo)" in capsys.readouterr().err
    assert (first.served_by, second.served_by) == ("aws", "backup")
    assert "aws skipped: over the bot's daily budget" in second.footer

    code = await asyncio.to_thread(main, ["--config", str(config), "--env-file", "",
                                          "usage", "--days", "1"])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert ["demo", "aws", "1", "1000", "100", f"{AWS.cost(Usage(1000, 100)):.4f}"] == \
        rows[1][1:]
    assert rows[2][1:4] == ["demo", "backup", "1"]
    assert f"total cost: ${AWS.cost(Usage(1000, 100)):.4f}" in out


async def test_usage_admin_report(db: Database) -> None:
    from engine.admin.bot import UsageAdmin
    from engine.errors import AdminError

    admin = UsageAdmin(SqlUsageStore(db))
    await admin.store.add(record(datetime.now(UTC), "demo", "aws", 10, 10))
    text = await admin.report("demo", days=1)
    assert text.startswith("```\nday") and text.endswith("```")
    assert "demo" in text
    with pytest.raises(AdminError):
        await admin.report(days=0)


async def test_budget_is_shared_between_processes(rig: Rig) -> None:
    # Two processes on one database: B sees what A spent (cache disabled here;
    # by default within spent_cache_s).
    conversation, _ = await rig.conversation(("aws", "free"),
                                             budget=Budget(bot_usd_per_day=0.001))
    rig.bedrock.push(Behaviour(input_tokens=1000, output_tokens=100))
    assert (await say(conversation, "spend")).served_by == "aws"
    other = UsageAccounting(rig.store, prices=PRICES,
                            budgets={"demo": Budget(bot_usd_per_day=0.001)},
                            clock=rig.clock, spent_cache_s=0)
    aws = conversation.chain.providers[0]  # type: ignore[attr-defined]
    request = CompletionRequest(messages=(Message("user", "hi"),), bot="demo", user="zed")
    assert await other.skip(aws, request) == "over the bot's daily budget ($0.001)"
    # Another bot's budget is its own.
    assert await other.skip(aws, CompletionRequest(messages=(), bot="else")) is None


async def test_only_priced_providers_over_budget_explains_why(rig: Rig) -> None:
    conversation, _ = await rig.conversation(("aws",), budget=Budget(bot_usd_per_day=0.001))
    rig.bedrock.push(Behaviour(input_tokens=1000, output_tokens=100))
    assert (await say(conversation, "spend")).served_by == "aws"
    refused = await say(conversation, "more")
    assert refused.error == "all_failed" and refused.served_by is None
    assert "over the bot's daily budget ($0.001)" in refused.text
    assert rig.bedrock.count == 1
    lines = await rig.store.summary(since=NOON - timedelta(days=1))
    assert [line.replies for line in lines] == [1]  # the refused reply cost nothing


async def test_extraction_is_reported_apart_from_replies(database_url: str) -> None:
    """Background memory work is recorded as "extraction": its own table in the
    report, not counted as replies, but still part of the cost and the budget."""
    async with Database(database_url) as database:
        store = SqlUsageStore(database)
        accounting = UsageAccounting(store, prices=PRICES, clock=Clock())
        message = IncomingMessage(platform="terminal", bot="demo", chat="c", user="u", text="x")
        served = Reply(text="ok", served_by="aws", model="m", usage=Usage(1000, 100))
        await accounting.on_reply(message, served)
        for _ in range(2):
            await accounting.extraction.on_reply(message, served)

        lines = await store.summary(since=NOON - timedelta(days=1))
        assert [(line.provider, line.kind, line.replies) for line in lines] == [
            ("aws", "extraction", 2), ("aws", "reply", 1)]
        rows = (await usage_report(store, days=1, now=NOON)).splitlines()
        assert rows[0].split()[3] == "replies"
        assert rows[1].split() == ["2026-11-25", "demo", "aws", "1", "1000", "100",
                                   f"{AWS.cost(Usage(1000, 100)):.4f}"]
        assert rows[2] == "memory extraction (background, not replies):"
        assert rows[3].split()[3] == "calls"
        assert rows[4].split()[1:6] == ["demo", "aws", "2", "2000", "200"]
        cost = AWS.cost(Usage(1000, 100))
        assert rows[5] == (f"total cost: ${3 * cost:.4f} over the last 1 day(s) "
                           f"(memory extraction: ${2 * cost:.4f})")
        # Both kinds count against the daily budget.
        spent = await store.spent(bot="demo", since=NOON - timedelta(hours=1))
        assert spent == pytest.approx({"u": 3 * cost})
