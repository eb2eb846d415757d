"""Scale-out end to end: several workers sharing PostgreSQL and Redis.

The process tests start real ``boternity run`` subprocesses (Slack in HTTP
Events mode, a port each) against the real PostgreSQL and Redis of this
machine, the fake Slack Web API and the fake OpenAI server of this test
process. The test itself plays Slack's side of the load balancer: it signs
each event and POSTs it to a worker of its choice.
"""

from __future__ import annotations

from typing import Any

from pydantic import SecretStr

from adapters.discord import DiscordAdapter, DiscordConfig
from adapters.gate import GateConfig
from tests.conftest import BotPipeline
from tests.fakes.discord_server import FakeDiscord


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
