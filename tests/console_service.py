"""A running Boternity with the admin API and console on, for the console's tests and benchmark.

``console_service(tmp_path, fake)`` writes a config shaped like the shipped
example (``[http]`` on port 0, ``[admin] token_env``), builds the real app
(SQLite, the real openai SDK against the fake, real breakers) and yields a
``Service`` with the console's base URL and the token. The primary provider
has ``fail_max = 1``: script it to fail once and its breaker opens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from adapters.wiring.app import App
from adapters.wiring.build import build_app
from adapters.wiring.settings import load_settings
from engine.types import IncomingMessage, Reply
from tests.fakes.openai_server import FakeOpenAI

TOKEN = "console-test-token-0123456789"


def console_config(tmp_path: Path, fake: FakeOpenAI, *, memory: bool = False,
                   port: int = 0, extra: str = "", storage: str = "") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "boternity.toml"
    config.write_text(f"""
[storage]
data_dir = "{tmp_path / 'data'}"
{storage}

[http]
enabled = true
host = "127.0.0.1"
port = {port}

[admin]
token_env = "BOTERNITY_ADMIN_TOKEN"

[providers.primary]
kind = "openai_compatible"
model = "primary-model"
base_url = "{fake.base_url}"
api_key_env = "TEST_OPENAI_KEY"
fail_max = 1
reset_timeout_s = 600
price_input_per_mtok = 2.0
price_output_per_mtok = 8.0

[providers.backup]
kind = "openai_compatible"
model = "backup-model"
base_url = "{fake.base_url}"
api_key_env = "TEST_OPENAI_KEY"
price_input_per_mtok = 1.0
price_output_per_mtok = 2.0

[bots.demo]
chain = ["primary", "backup"]
footer = "on_failover"
memory = {{ enabled = {str(memory).lower()}, extract = false }}
{extra}
""", encoding="utf-8")
    return config


ENV = {"TEST_OPENAI_KEY": "sk-test", "BOTERNITY_ADMIN_TOKEN": TOKEN}


@dataclass
class Service:
    app: App
    url: str
    token: str = TOKEN

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def say(self, text: str, *, chat: str = "7", user: str = "telegram:7") -> Reply:
        message = IncomingMessage(platform="telegram", bot="demo", chat=chat, user=user,
                                  text=text, user_name="Ada")
        final = None
        async for item in self.app.conversations["demo"].reply(message):
            if isinstance(item, Reply):
                final = item
        assert final is not None
        return final


@asynccontextmanager
async def console_service(tmp_path: Path, fake: FakeOpenAI, *, memory: bool = False,
                          token: str | None = TOKEN, storage: str = "") -> AsyncIterator[Service]:
    env = {**ENV, "BOTERNITY_ADMIN_TOKEN": token or ""}
    settings = load_settings(console_config(tmp_path, fake, memory=memory, storage=storage),
                             environ=env, dotenv=None)
    async with build_app(settings, with_memory=memory) as app:
        assert app.ops is not None
        yield Service(app, f"http://127.0.0.1:{app.ops.port}")
