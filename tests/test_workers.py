"""Scale-out end to end: several workers sharing PostgreSQL and Redis.

The process tests start real ``boternity run`` subprocesses (Slack in HTTP
Events mode, a port each) against the real PostgreSQL and Redis of this
machine, the fake Slack Web API and the fake OpenAI server of this test
process. The test itself plays Slack's side of the load balancer: it signs
each event and POSTs it to a worker of its choice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from adapters.chat.gate import GateConfig
from adapters.platforms.discord import DiscordAdapter, DiscordConfig
from tests.cluster import REDIS_URL, Cluster, RedisProxy, drop_database, fresh_database
from tests.conftest import BotPipeline
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.openai_server import Status, Text, start_openai_fake
from tests.fakes.slack_server import FakeSlack


async def test_discord_worker_identifies_with_its_shard(bot_pipeline: BotPipeline) -> None:
    async with FakeDiscord(channels=(830000000000000009,)) as fake:
        config = DiscordConfig(
            bot="demo", token=SecretStr("discord-test-token"),
            data_dir=bot_pipeline.tmp_path / "data", gate=GateConfig(),
            api_base_url=fake.api_base, gateway_url=fake.gateway_url, ready_timeout_s=10,
            shard_ids=(1,), shard_count=2)
        adapter = DiscordAdapter(config, replier=bot_pipeline.conversation,
                                 files=bot_pipeline.files)
        async with adapter:
            identify: dict[str, Any] | None = fake.identify
            assert identify is not None
            assert identify["shard"] == [1, 2]  # this worker: shard 1 of 2
            assert adapter.client.shard_count == 2


# --- several worker processes: PostgreSQL + Redis + fake Slack + fake providers ---

ANSWER = ("Workers", " share", " the load.")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Any]]:
    """Fakes, a fresh PostgreSQL database and two workers, shared by the tests below
    (starting workers is the slow part); the kill test runs last."""
    try:
        database_url, db_name = await fresh_database()
        probe = aioredis.from_url(REDIS_URL)
        await probe.ping()
        await probe.aclose()
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"needs PostgreSQL and Redis on 127.0.0.1 ({type(exc).__name__})")
    tmp = tmp_path_factory.mktemp("workers")
    try:
        async with start_openai_fake(default=Text(ANSWER)) as openai_fake, \
                FakeSlack() as slack_fake:  # Slack's limits, enforced with 429s
            # A 5 s lease: short for the kill test, long enough that a live worker
            # starved of CPU by a busy test machine still renews in time.
            async with Cluster(2, tmp, openai_fake.base_url, slack_fake.api_base,
                               database_url, lease_s=5.0) as cluster:
                yield {"cluster": cluster, "openai": openai_fake, "slack": slack_fake,
                       "db": database_url.replace("+asyncpg", "")}
    finally:
        await drop_database(db_name)


def _final(slack: FakeSlack, channel: str) -> list[str]:
    """The complete answers shown in a channel (no streaming cursor)."""
    return [m.text for m in slack.in_channel(channel) if "▌" not in m.text]


async def _rows(db: str) -> list[tuple[str, str, str]]:
    connection = await asyncpg.connect(db)
    try:
        rows = await connection.fetch("SELECT chat, role, content FROM messages ORDER BY id")
    finally:
        await connection.close()
    return [(r["chat"], r["role"], r["content"]) for r in rows]


@pytest.mark.asyncio(loop_scope="module")
async def test_burst_with_retries_answered_exactly_once(env: dict[str, Any]) -> None:
    cluster: Cluster = env["cluster"]
    slack: FakeSlack = env["slack"]
    openai_fake = env["openai"]
    before = openai_fake.count
    channels = [f"DBURST{i:03d}" for i in range(8)]
    events = [cluster.event(c, f"question {i}") for i, c in enumerate(channels)]
    # Each event reaches one worker, and Slack's retry of it reaches the other
    # (Slack retries after 3 s without a 200; a load balancer may pick anyone).
    statuses = await asyncio.gather(*(
        cluster.post(i % 2, e) for i, e in enumerate(events)), *(
        cluster.post((i + 1) % 2, e, retry=1) for i, e in enumerate(events)))
    assert set(statuses) == {200}
    await slack.wait_for(lambda: all(_final(slack, c) for c in channels), within_s=60)
    assert slack.rate_limited == 0  # the workers' shared pacing kept Slack's limits
    for channel in channels:
        shown = slack.in_channel(channel)
        assert len(shown) == 1, (channel, [m.texts for m in shown], _takeovers(cluster))
        assert shown[0].text.startswith("Workers share the load.")
    assert openai_fake.count - before == 8  # each message went to a model once
    rows = [r for r in await _rows(env["db"]) if r[0] in channels]
    assert sorted(r[2] for r in rows if r[1] == "user") == sorted(
        f"question {i}" for i in range(8))
    assert sum(r[1] == "assistant" for r in rows) == 8
    replies = [_sum(await cluster.metrics(w), "boternity_replies_total") for w in range(2)]
    assert sum(replies) == 8  # which worker wins each claim is a race: either is right


def _takeovers(cluster: Cluster) -> list[str]:
    return [line for w in cluster.workers for line in cluster.log(w).splitlines()
            if "taking over" in line]


def _sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                total += sample.value
    return total


@pytest.mark.asyncio(loop_scope="module")
async def test_two_workers_share_one_channels_rate_limit(env: dict[str, Any]) -> None:
    cluster: Cluster = env["cluster"]
    slack: FakeSlack = env["slack"]
    limited_before = slack.rate_limited
    channel = "DSAME01"
    # One busy channel, its messages spread over both workers: Slack allows one
    # post per second there, and each worker alone would keep that pace, but
    # only the shared budget keeps the two of them together within it.
    for i in range(4):
        await cluster.post(i % 2, cluster.event(channel, f"one of many {i}"))
    await slack.wait_for(lambda: len(_final(slack, channel)) == 4, within_s=60)
    assert slack.rate_limited == limited_before  # not one 429 (the fake enforces 1/s)
    assert len(slack.in_channel(channel)) == 4


@pytest.mark.asyncio(loop_scope="module")
async def test_breaker_opened_by_one_worker_is_honoured_by_the_others(
    env: dict[str, Any]
) -> None:
    cluster: Cluster = env["cluster"]
    slack: FakeSlack = env["slack"]
    openai_fake = env["openai"]
    openai_fake.script(Status(500), Status(500), model="primary-model")
    primary_before = openai_fake.count_for("primary-model")
    # Worker 0 meets two failures (fail_max = 2): its breaker opens, in Redis too.
    for i in range(2):
        channel = f"DBRK0{i}"
        await cluster.post(0, cluster.event(channel, "are you there?"))
        await slack.wait_for(lambda c=channel: bool(_final(slack, c)), within_s=30)
        assert "backup" in _final(slack, channel)[0]
    assert openai_fake.count_for("primary-model") - primary_before == 2
    # Worker 1 never calls the dead provider again: it goes straight to backup.
    channels = [f"DBRK1{i}" for i in range(3)]
    for channel in channels:
        await cluster.post(1, cluster.event(channel, "still there?"))
    await slack.wait_for(lambda: all(_final(slack, c) for c in channels), within_s=30)
    assert openai_fake.count_for("primary-model") - primary_before == 2
    for channel in channels:
        assert "backup" in _final(slack, channel)[0]
    text = await cluster.metrics(1)
    assert _sum(text, "boternity_breaker_state", provider="primary") == 2  # open


@pytest.mark.asyncio(loop_scope="module")
async def test_the_loop_guard_counts_a_chats_bot_turns_across_workers(
    env: dict[str, Any]
) -> None:
    cluster: Cluster = env["cluster"]
    slack: FakeSlack = env["slack"]
    channel = "DLOOP01"
    # Another bot talks to ours, its messages spread over both workers; the
    # guard allows two answers in a row (max_bot_turns = 2), not two per worker.
    for i in range(4):
        await cluster.post(i % 2, cluster.bot_event(channel, f"bot turn {i}"))

    def stops() -> int:
        return sum(cluster.log(w).count(f"bot turns in a row in {channel}")
                   for w in cluster.workers)

    # The guard's refusals show only in the workers' log files: nothing to await.
    async with asyncio.timeout(60):
        while len(_final(slack, channel)) + stops() < 4:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    assert (len(_final(slack, channel)), stops()) == (2, 2)


@pytest.mark.asyncio(loop_scope="module")
async def test_kill_9_mid_reply_is_answered_by_a_live_worker_once(env: dict[str, Any]) -> None:
    cluster: Cluster = env["cluster"]
    slack: FakeSlack = env["slack"]
    openai_fake = env["openai"]
    words = [f" word{i}" for i in range(40)]
    # The doomed worker's reply streams slowly (primary's breaker is open: backup serves).
    openai_fake.script(Text(["Slow", *words], gap_s=0.25), model="backup-model")
    channel = "DKILL01"
    await cluster.post(0, cluster.event(channel, "tell me a long story"))
    await slack.wait_for(lambda: bool(slack.in_channel(channel)), within_s=30)  # it is streaming
    cluster.kill(0)
    assert cluster.workers[0].process is not None
    await cluster.workers[0].process.wait()
    # After its lease (5 s) a live worker takes the message over and answers it.
    await slack.wait_for(lambda: bool(_final(slack, channel)), within_s=30)
    finals = _final(slack, channel)
    assert len(finals) == 1 and finals[0].startswith("Workers share the load.")
    shown = slack.in_channel(channel)
    partial = [m for m in shown if "▌" in m.text]
    assert len(shown) == 1 + len(partial) and len(partial) <= 1  # the dead worker's draft
    assert "taking over slack:demo:DKILL01" in cluster.log(cluster.workers[1])
    rows = [r for r in await _rows(env["db"]) if r[0] == channel]
    assert [r[1:] for r in rows] == [  # the user message once, one answer
        ("user", "tell me a long story"), ("assistant", "Workers share the load.")]


# --- one worker loses Redis while its replies are in flight ---

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cut_off(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Any]]:
    """Two workers; worker 0 reaches Redis through a proxy the tests can break
    (each test restores it first)."""
    try:
        database_url, db_name = await fresh_database()
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"needs PostgreSQL and Redis on 127.0.0.1 ({type(exc).__name__})")
    tmp = tmp_path_factory.mktemp("cutoff")
    try:
        async with RedisProxy() as proxy, start_openai_fake(default=Text(ANSWER)) as openai, \
                FakeSlack() as slack:
            async with Cluster(2, tmp, openai.base_url, slack.api_base, database_url,
                               lease_s=5.0, redis_urls={0: proxy.url}) as cluster:
                yield {"cluster": cluster, "openai": openai, "slack": slack, "proxy": proxy}
    finally:
        await drop_database(db_name)


@pytest.mark.parametrize("outage", ["cut", "blackhole"])
@pytest.mark.asyncio(loop_scope="module")
async def test_a_worker_that_loses_redis_mid_reply_leaves_one_answer(
    cut_off: dict[str, Any], outage: str
) -> None:
    cluster: Cluster = cut_off["cluster"]
    slack: FakeSlack = cut_off["slack"]
    proxy: RedisProxy = cut_off["proxy"]
    await proxy.restore()
    await cluster.ready(cluster.workers[0])  # /readyz pings Redis through the proxy
    channels = [f"D{outage.upper()}{i:02d}" for i in range(3)]
    # Worker 0's replies stream slowly (10 s); the taker-over's come at once.
    words = [f" word{i}" for i in range(40)]
    cut_off["openai"].script(*[Text(["Slow", *words], gap_s=0.25)] * len(channels))
    for i, channel in enumerate(channels):
        await cluster.post(0, cluster.event(channel, f"a long story {i}"))
    await slack.wait_for(lambda: all(slack.in_channel(c) for c in channels), within_s=30)
    getattr(proxy, outage)()  # Redis gone for worker 0 while all three are streaming

    def settled(channel: str) -> bool:
        # Answered by worker 1, and worker 0 either stopped its own reply or finished it.
        finals = _final(slack, channel)
        stopped = f"stopping the reply to slack:demo:{channel}" in cluster.log(cluster.workers[0])
        return bool(finals) and (stopped or len(finals) > 1)

    await slack.wait_for(lambda: all(settled(c) for c in channels), within_s=60)
    answers = {c: _final(slack, c) for c in channels}
    assert all(len(a) == 1 for a in answers.values()), answers  # one message, one answer
    assert all(a[0].startswith("Workers share the load.") for a in answers.values())
    log1 = cluster.log(cluster.workers[1])
    assert all(f"taking over slack:demo:{c}" in log1 for c in channels)
