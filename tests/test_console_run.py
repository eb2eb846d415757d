"""``boternity run`` with a failing primary (fail_max 1): the admin API, the CLI
(``boternity providers``, another process) and the console all say ``open``.

The service is the real command (``python -m adapters.cli ... run``) with a
Telegram fake as its platform and the openai fake as both providers.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

import aiohttp

from tests.console_service import ENV, TOKEN, console_config
from tests.fakes.openai_server import FakeOpenAI, Status, Text
from tests.fakes.telegram_server import start_telegram_fake

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def cli(config: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "adapters.cli", "--config", str(config), "--env-file", "", *args,
        env=env, cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_api_cli_and_console_all_say_open_for_the_primary_the_service_opened(
    tmp_path: Path, openai_fake: FakeOpenAI
) -> None:
    openai_fake.script(Status(500), model="primary-model")
    openai_fake.default = Text(("Backup", " answered."))
    port = free_port()
    async with start_telegram_fake() as tg:
        config = console_config(tmp_path, openai_fake, port=port, extra=f"""
[bots.demo.telegram]
token_env = "TEST_TG"
api_base_url = "{tg.url}"
""")
        env = {**os.environ, **ENV, "TEST_TG": tg.token}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "adapters.cli", "--config", str(config), "--env-file", "",
            "run", env=env, cwd=str(ROOT),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            await tg.wait_for(lambda: tg.commands is not None, limit_s=60)
            tg.push_message(7, "hello there")
            await tg.wait_for(lambda: any("Backup answered." in m.text for m in tg.in_chat(7)),
                              limit_s=30)
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession(
                    cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                async with http.get(f"{base}/api/v1/providers",
                                    headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                    rows = {p["name"]: p for p in (await r.json())["providers"]}
                assert rows["primary"]["state"] == "open"
                assert rows["primary"]["last_error"] == "server error 500"
                async with http.get(f"{base}/api/v1/bots",
                                    headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                    [platform] = (await r.json())["platforms"]
                assert platform["name"] == "telegram:demo" and platform["connected"]
                code, out, err = await cli(config, env, "providers")
                assert code == 0, err
                assert "live state of the running service" in out
                assert re.search(r"^primary .*breaker: open", out, re.M), out
                assert re.search(r"^backup .*breaker: closed", out, re.M), out
                async with http.post(f"{base}/login", data={"token": TOKEN}) as r:
                    assert r.status == 200
                async with http.get(f"{base}/providers") as r:
                    page = await r.text()
                assert re.search(r'data-provider="primary".*?state-open">open<', page, re.S)
            # without the token the CLI says plainly it shows itself only
            code, out, _ = await cli(config, {**env, "BOTERNITY_ADMIN_TOKEN": ""}, "providers")
            assert code == 0 and "THIS process only" in out
        finally:
            tg.close()
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    text = stderr.decode(errors="replace")
    assert proc.returncode in (0, 130), text[-2000:]
    assert TOKEN not in text and tg.token not in text  # no secret in logs
    assert "/api/v1 and the console" in text
