"""With Redis, the breaker state is shared: the admin API shows the Redis copy
next to the live one, and ``boternity providers`` without the admin API reads
the shared state, AWAITED before printing (it used to queue the load and
print its own fresh ``closed`` at once). Real Redis on 127.0.0.1:6379.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import aiohttp

from tests.console_service import ENV, console_config, console_service
from tests.fakes.openai_server import FakeOpenAI, Status, Text
from tests.test_console_run import cli
from tests.test_redis_state import REDIS_URL, namespace  # noqa: F401 (the fixture)


async def test_cli_prints_the_shared_redis_state_after_loading_it(
    tmp_path: Path, openai_fake: FakeOpenAI, namespace: str,  # noqa: F811 (the fixture)
) -> None:
    storage = f'redis_url = "{REDIS_URL}"\nredis_namespace = "{namespace}"'
    openai_fake.script(Status(500), model="primary-model")
    openai_fake.default = Text(("Backup", " here."))
    async with console_service(tmp_path / "service", openai_fake, storage=storage) as service:
        await service.say("hello?")
        shared = service.app.extras["shared_breakers"]
        await shared.flush()  # the open state reached Redis
        async with aiohttp.ClientSession() as http, http.get(
                f"{service.url}/api/v1/providers", headers=service.headers) as r:
            rows = {p["name"]: p for p in (await r.json())["providers"]}
        assert rows["primary"]["state"] == "open"
        assert rows["primary"]["shared"]["state"] == "open"
        # another process, no admin token: it reads Redis, and waits for it
        config = console_config(tmp_path / "cli", openai_fake, storage=storage)
        env = {**os.environ, **ENV, "BOTERNITY_ADMIN_TOKEN": ""}
        code, out, err = await cli(config, env, "providers")
        assert code == 0, err
        assert "shared in Redis" in out
        assert re.search(r"^primary .*breaker: open", out, re.M), out
        # a reset through the API closes it for every worker
        async with aiohttp.ClientSession() as http, http.post(
                f"{service.url}/api/v1/providers/primary/reset",
                headers=service.headers) as r:
            assert (await r.json())["state"] == "closed"
        await shared.flush()
        code, out, _ = await cli(config, env, "providers")
        assert re.search(r"^primary .*breaker: closed", out, re.M), out
