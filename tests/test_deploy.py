"""The deploy files work as shipped: configs load, routes match, compose validates.

Every example config in the repository loads with the variables that
``.env.example`` names; the reverse proxy (``deploy/Caddyfile``) routes each
webhook path the example configures to the port the worker listens on for it;
``deploy/compose.yaml`` passes ``docker-compose config``; the image's health
check asks the real ops server.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pydantic import SecretStr

from adapters.ops.metrics import Metrics
from adapters.ops.server import OpsServer
from adapters.platforms.telegram import TelegramConfig
from adapters.wiring import settings as config
from adapters.wiring.settings import Settings, SlackSettings
from tests.cluster import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
EXAMPLES = sorted(DEPLOY.glob("*.toml"))
# Values shaped like real ones for every variable .env.example names.
SHAPED = {
    "BOTERNITY_DATABASE_URL": "postgresql+asyncpg://boternity:pw@postgres:5432/boternity",
    "BOTERNITY_REDIS_URL": "redis://redis:6379/0",
}


def _environ() -> dict[str, str]:
    names = re.findall(r"^([A-Z][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.M)
    return {name: SHAPED.get(name, "example-value") for name in names}


def _load(path: Path) -> Settings:
    return config.load_settings(path, environ=_environ(), dotenv=None)


def _caddy_routes() -> dict[str, int]:
    """``{path prefix: upstream port}`` from the Caddyfile's ``handle`` blocks."""
    text = (DEPLOY / "Caddyfile").read_text(encoding="utf-8")
    routes = re.findall(r"handle (/\S*)\*\s*\{.*?dynamic a boternity (\d+)", text, re.S)
    return {prefix: int(port) for prefix, port in routes}


def _route_port(path: str) -> int | None:
    for prefix, port in _caddy_routes().items():
        if path.startswith(prefix):
            return port
    return None


def test_the_example_configs_are_the_ones_shipped() -> None:
    assert {p.name for p in EXAMPLES} == {"boternity.example.toml", "boternity.scaleout.toml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_loads(path: Path) -> None:
    loaded = _load(path)
    assert loaded.bots, f"{path.name} configures no bot"
    for bot in loaded.bots.values():
        assert bot.chain and all(name in loaded.providers for name in bot.chain)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_telegram_webhooks_reach_the_port_the_worker_listens_on(path: Path) -> None:
    """Telegram posts to webhook_url; the proxy must pass that path to the webhook port."""
    webhooks = [(name, bot.telegram) for name, bot in _load(path).bots.items()
                if bot.telegram is not None and bot.telegram.mode == "webhook"]
    for name, tg in webhooks:
        assert tg.webhook_url, f"{path.name}: bots.{name}.telegram has no webhook_url"
        listening = TelegramConfig(bot=name, token=SecretStr("x"), mode="webhook",
                                   webhook_url=tg.webhook_url).webhook_path
        url_path = urlsplit(tg.webhook_url).path
        assert url_path.strip("/") == listening
        assert _route_port(url_path) == tg.webhook_port, (
            f"{path.name}: the Caddyfile does not send {url_path} to port {tg.webhook_port}")
    if path.name == "boternity.scaleout.toml":
        assert webhooks, "the scale-out example is meant to show a webhook bot"


def test_slack_events_reach_the_port_the_worker_listens_on() -> None:
    defaults = SlackSettings.model_fields
    path, port = defaults["http_path"].default, defaults["http_port"].default
    assert _route_port(path) == port


def test_compose_file_validates(tmp_path: Path) -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        if os.environ.get("CI") == "true":
            pytest.fail("docker-compose is missing under CI: deploy/boternity.sh test installs it")
        pytest.skip("docker-compose is not installed (deploy/boternity.sh test installs it)")
    # The layout an operator has: a checkout's deploy/ with .env and boternity.toml beside it.
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    shutil.copy(DEPLOY / "boternity.scaleout.toml", tmp_path / "boternity.toml")
    env = {**os.environ, "POSTGRES_PASSWORD": "pw", "BOTERNITY_DOMAIN": "bots.example.com"}
    result = subprocess.run(
        [compose, "-p", "boternity", "-f", "deploy/compose.yaml", "config", "-q"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    missing = subprocess.run(
        [compose, "-p", "boternity", "-f", "deploy/compose.yaml", "config", "-q"],
        cwd=tmp_path, env={**env, "BOTERNITY_DOMAIN": ""}, capture_output=True, text=True,
        timeout=60, check=False)
    assert missing.returncode != 0 and "BOTERNITY_DOMAIN" in missing.stderr


def _healthcheck(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")], capture_output=True, text=True,
        env={**os.environ, "BOTERNITY_CONFIG": str(config_path)}, timeout=30, check=False)


async def test_the_image_health_check_asks_the_ops_server(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "boternity.toml"
    cfg.write_text(f"[http]\nenabled = true\nport = {port}\n")
    down = _healthcheck(cfg)
    assert down.returncode == 1 and "/healthz did not answer" in down.stderr
    async with OpsServer(Metrics(), port=port):
        up = await asyncio.to_thread(_healthcheck, cfg)
    assert up.returncode == 0, up.stderr


def test_the_image_health_check_without_http_watches_the_process(tmp_path: Path) -> None:
    cfg = tmp_path / "boternity.toml"
    cfg.write_text("[bots.demo]\nchain = ['local']\n")
    result = _healthcheck(cfg)
    assert result.returncode == 0 and "[http] is not enabled" in result.stdout
