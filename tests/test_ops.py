"""Operations: /healthz, /readyz, /metrics over real HTTP, and the logs.

The ops server is a real aiohttp server on 127.0.0.1 port 0, read with a
real aiohttp client; metrics are parsed with prometheus-client's own parser.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.chat.outbound import SLACK, Limits, RetryAfter
from adapters.ops.logs import Redactor, configure_logging
from adapters.ops.metrics import MeteredSender, Metrics, ReplyMetrics, TimedMemory
from adapters.ops.server import OpsServer
from adapters.wiring.settings import Settings, secret_values
from engine.log_context import bind
from engine.types import Fact, Failure, IncomingMessage, Reply, Usage
from tests.fakes.openai_server import Text

MSG = IncomingMessage(platform="telegram", bot="helper", chat="42", user="u1", text="hi")


class _Samples:
    """Parsed exposition: ``s("name", label=value, ...)`` is one sample's value."""

    def __init__(self, text: str) -> None:
        self._values = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def __call__(self, name: str, **labels: str) -> float:
        return self._values[(name, frozenset(labels.items()))]


def _samples(text: str) -> _Samples:
    return _Samples(text)


async def _get(port: int, path: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, response.headers["Content-Type"], await response.text()


async def test_reply_metrics_served_over_http() -> None:
    metrics = Metrics()
    observer = ReplyMetrics(metrics)
    await observer.on_reply(MSG, Reply(text="ok", served_by="primary", latency_s=0.3,
                                       usage=Usage(prompt_tokens=10, completion_tokens=5)))
    await observer.on_reply(MSG, Reply(
        text="ok", served_by="backup", latency_s=2.5,
        failures=(Failure("primary", "rate_limited", "rate limited"),)))
    await observer.on_reply(MSG, Reply(
        text="sorry", served_by=None, error="all failed",
        failures=(Failure("primary", "timeout", "timed out"),
                  Failure("backup", "unavailable", "HTTP 500"))))
    states = {"primary": "open", "backup": "closed"}
    metrics.watch_breakers(lambda: states)

    async with OpsServer(metrics, host="127.0.0.1", port=0) as ops:
        status, ctype, body = await _get(ops.port, "/metrics")
        assert status == 200
        assert ctype.startswith("text/plain") and "version=" in ctype
        s = _samples(body)
        labels = {"bot": "helper", "platform": "telegram"}
        assert s("boternity_replies_total", **labels, outcome="ok", served_by="primary") == 1
        assert s("boternity_replies_total", **labels, outcome="failover", served_by="backup") == 1
        assert s("boternity_replies_total", **labels, outcome="error", served_by="none") == 1
        assert s("boternity_reply_latency_seconds_count", **labels) == 3
        assert s("boternity_reply_latency_seconds_bucket", **labels, le="0.5") == 2
        fo = "boternity_failovers_total"
        assert s(fo, provider="primary", reason="rate_limited") == 1
        assert s(fo, provider="primary", reason="timeout") == 1
        assert s(fo, provider="backup", reason="unavailable") == 1
        assert s("boternity_tokens_total", direction="prompt", provider="primary") == 10
        assert s("boternity_breaker_state", provider="primary") == 2
        assert s("boternity_breaker_state", provider="backup") == 0
        # read at scrape time: a recovered breaker shows at once
        states["primary"] = "closed"
        s = _samples((await _get(ops.port, "/metrics"))[2])
        assert s("boternity_breaker_state", provider="primary") == 0


async def test_healthz_and_readyz() -> None:
    healthy = {"database": True}

    async def database() -> bool:
        return healthy["database"]

    async def lancedb() -> bool:
        raise OSError("s3://user:hunter2secret@bucket unreachable")

    async def slow() -> bool:
        await asyncio.Event().wait()  # never answers
        return True

    async with OpsServer(Metrics(), {"database": database}, port=0,
                         check_timeout_s=0.2) as ops:
        assert (await _get(ops.port, "/healthz"))[0] == 200
        status, _, body = await _get(ops.port, "/readyz")
        assert status == 200
        assert json.loads(body) == {"ready": True, "checks": {"database": "ok"}}

        healthy["database"] = False
        ops.add_check("lancedb", lancedb)
        ops.add_check("telegram", slow)
        status, _, body = await _get(ops.port, "/readyz")
        assert status == 503
        assert json.loads(body)["checks"] == {
            "database": "failed", "lancedb": "OSError", "telegram": "timeout"}
        assert "hunter2" not in body  # exception text never leaves the worker
        assert (await _get(ops.port, "/healthz"))[0] == 200  # alive, just not ready


class _Sender:
    scope = "slack:T1"
    limits: Limits = SLACK

    def __init__(self) -> None:
        self.limited = 1

    async def send(self, chat: str, text: str, reply_to: str | None = None) -> str:
        return "m1"

    async def edit(self, chat: str, message_id: str, text: str) -> None:
        if self.limited:
            self.limited -= 1
            raise RetryAfter(1.5)


class _Memory:
    async def recall(self, message: IncomingMessage) -> list[Fact]:
        return [Fact(id="f1", text="likes tea", bot=message.bot)]

    def learn(self, message: IncomingMessage, reply: Reply) -> None:
        pass


async def test_platform_and_recall_metrics() -> None:
    metrics = Metrics()
    sender = MeteredSender(_Sender(), metrics, "slack")
    assert sender.scope == "slack:T1" and sender.limits is SLACK
    assert await sender.send("C1", "hello") == "m1"
    with pytest.raises(RetryAfter):
        await sender.edit("C1", "m1", "hello world")
    await sender.edit("C1", "m1", "hello world")
    memory = TimedMemory(_Memory(), metrics)
    assert [f.id for f in await memory.recall(MSG)] == ["f1"]
    s = _samples(metrics.render().decode())
    assert s("boternity_platform_sends_total", platform="slack") == 1
    assert s("boternity_platform_edits_total", platform="slack") == 1
    assert s("boternity_platform_rate_limited_total", platform="slack") == 1
    assert s("boternity_recall_latency_seconds_count", bot="helper") == 1


@pytest.fixture
def log_stream() -> io.StringIO:
    stream = io.StringIO()
    yield stream
    configure_logging(level="WARNING", stream=io.StringIO())


def test_json_logs_carry_context(log_stream: io.StringIO) -> None:
    configure_logging(level="INFO", json_format=True, stream=log_stream)
    log = logging.getLogger("boternity.test")
    with bind(bot="helper", platform="telegram", chat="42"):
        log.info("reply started")
        with bind(provider="backup"):
            log.warning("failover %s -> %s", "primary", "backup")
    log.info("outside")
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    assert lines[0]["message"] == "reply started"
    assert (lines[0]["bot"], lines[0]["platform"], lines[0]["chat"], lines[0]["provider"]) == (
        "helper", "telegram", "42", None)
    assert lines[1]["provider"] == "backup" and lines[1]["level"] == "WARNING"
    assert lines[1]["message"] == "failover primary -> backup"
    assert lines[2]["bot"] is None


async def test_context_follows_tasks_text_format(log_stream: io.StringIO) -> None:
    configure_logging(level="INFO", json_format=False, stream=log_stream)
    log = logging.getLogger("boternity.test")

    async def work() -> None:
        log.info("in a task")

    with bind(bot="b1", platform="slack", chat="C9"):
        await asyncio.create_task(work())
    assert "[bot=b1 platform=slack chat=C9]: in a task" in log_stream.getvalue()


def test_a_key_never_appears_in_logs(log_stream: io.StringIO) -> None:
    key = "sk-proj-" + "A1b2C3d4" * 6
    telegram = "7012345678:AAH" + "x9Y8z7W6v5" * 4
    odd = "plain-looking-secret-value-42"  # no known shape: caught because configured
    settings = Settings.model_validate({
        "providers": {"primary": {"kind": "openai", "model": "gpt-4o-mini",
                                  "api_key_env": "OPENAI_API_KEY"}},
        "bots": {"helper": {"chain": ["primary"],
                            "telegram": {"token_env": "TG_TOKEN"},
                            "slack": {"bot_token_env": "SLACK_BOT", "signing_secret_env": "SIGN"}}},
        "storage": {"database_url": "postgresql+asyncpg://app:dbpass123@db/boternity"},
        "env": {"OPENAI_API_KEY": key, "TG_TOKEN": telegram, "SLACK_BOT": "xoxb-1-2-abcdef",
                "SIGN": odd, "HOME": "/home/u"},
    })
    secrets = secret_values(settings)
    assert {key, telegram, odd, "dbpass123", "xoxb-1-2-abcdef"} <= secrets
    assert "/home/u" not in secrets
    for json_format in (False, True):
        configure_logging(level="DEBUG", json_format=json_format, secrets=secrets,
                          stream=log_stream)
        log = logging.getLogger("tests.a_library")  # like httpx, it logs URLs
        log.setLevel(logging.NOTSET)  # whatever other tests did to levels: the root's
        log.info("HTTP Request: POST https://api.telegram.org/bot%s/getUpdates", telegram)
        log.debug("headers: %s", {"Authorization": f"Bearer {key}"})
        log.warning("signing secret was %s", odd)
        log.info("connecting to %s", settings.storage.database_url)
        try:
            raise RuntimeError(f"bad key {key}")
        except RuntimeError:
            log.exception("provider failed")
    out = log_stream.getvalue()
    for secret in (key, telegram, odd, "dbpass123", "xoxb-1-2-abcdef", key[:20]):
        assert secret not in out
    assert out.count("***") >= 10
    assert "getUpdates" in out and "provider failed" in out  # the rest survives


def test_redactor_known_shapes_without_configuration() -> None:
    redact = Redactor()
    assert redact("key sk-ant-api03-abcdefghijklmnop9 ok") == "key *** ok"
    assert redact("xapp-1-A0B1C2D3-xyz") == "***"
    assert redact("AKIAABCDEFGHIJKLMNOP") == "***"
    assert redact("redis://:s3cr3t@cache:6379/0") == "redis://***@cache:6379/0"
    assert redact("nothing to hide here") == "nothing to hide here"


# --- the composition root wires it: one worker with Redis and the ops endpoint ---

async def test_build_app_wires_redis_metrics_and_ops(
    tmp_path: Any, openai_fake: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uuid

    import redis.asyncio as aioredis

    from adapters.wiring.build import build_app
    from persistence.redis.breakers import SharedBreakers

    redis_url = "redis://127.0.0.1:6379/0"
    ns = f"test-{uuid.uuid4().hex[:12]}"
    settings = Settings.model_validate({
        "storage": {"data_dir": str(tmp_path), "redis_url": redis_url, "redis_namespace": ns},
        "http": {"enabled": True, "port": 0},
        "providers": {"primary": {"kind": "openai_compatible", "model": "fake-1",
                                  "base_url": openai_fake.base_url}},
        "bots": {"helper": {"chain": ["primary"], "footer": "never",
                            "memory": {"enabled": False}}},
    })
    openai_fake.script(Text(["Bonjour", "!"]))
    try:
        async with build_app(settings) as app:
            assert app.ops is not None and app.metrics is not None
            assert app.dedupe is not None and app.budget is not None
            assert app.inflight is not None
            async for _ in app.conversations["helper"].reply(MSG_HELPER):
                pass
            status, _, body = await _get(app.ops.port, "/readyz")
            assert status == 200
            assert json.loads(body)["checks"] == {"database": "ok", "redis": "ok"}
            s = _samples((await _get(app.ops.port, "/metrics"))[2])
            assert s("boternity_replies_total", bot="helper", platform="telegram",
                     served_by="primary", outcome="ok") == 1
            assert s("boternity_breaker_state", provider="primary") == 0
            # Another worker opens the breaker: this one sees it (shared state).
            async with SharedBreakers(redis_url, namespace=ns) as other:
                import pybreaker
                breaker = pybreaker.CircuitBreaker(fail_max=1, state_storage=other.storage(
                    "primary"))
                breaker.open()
                await other.flush()
                async with asyncio.timeout(5):
                    await app.extras["shared_breakers"].wait_for("primary", "open")
                assert app.breakers.state("primary") == "open"
            s = _samples((await _get(app.ops.port, "/metrics"))[2])
            assert s("boternity_breaker_state", provider="primary") == 2
    finally:
        client = aioredis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(match=f"{ns}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


MSG_HELPER = IncomingMessage(platform="telegram", bot="helper", chat="7", user="u1",
                             text="say hello in French")


async def test_unreachable_redis_is_a_clear_start_error(tmp_path: Any) -> None:
    from adapters.wiring.build import build_app
    from engine.errors import StorageError

    port = _closed_port()
    settings = Settings.model_validate({
        "storage": {"data_dir": str(tmp_path),
                    "redis_url": f"redis://:hunter2pass@127.0.0.1:{port}/0"},
    })
    with pytest.raises(StorageError, match=r"redis redis://:\*\*\*@127\.0\.0\.1") as caught:
        async with build_app(settings):
            pass
    assert "hunter2pass" not in str(caught.value)


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again: connections are refused


def test_scale_out_settings() -> None:
    from adapters.wiring.scaleout import memory_storage_options

    settings = Settings.model_validate({
        "storage": {"database_url_env": "DB_URL", "redis_url_env": "REDIS_URL",
                    "memory_uri": "s3://bucket/prefix",
                    "memory_storage_options": {"aws_endpoint": "http://minio:9000"}},
        "env": {"DB_URL": "postgresql+asyncpg://app:pw@db/boternity",
                "REDIS_URL": "redis://cache:6379/0",
                "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE01", "AWS_SECRET_ACCESS_KEY": "s3cr3t"},
    })
    assert settings.storage.database_url == "postgresql+asyncpg://app:pw@db/boternity"
    assert settings.storage.redis_url == "redis://cache:6379/0"
    # .env keys reach LanceDB (its object-store client reads only the process env);
    # what the TOML sets wins.
    assert memory_storage_options(settings) == {
        "aws_endpoint": "http://minio:9000", "aws_access_key_id": "AKIAEXAMPLEEXAMPLE01",
        "aws_secret_access_key": "s3cr3t"}
    local = Settings.model_validate({"env": {"AWS_ACCESS_KEY_ID": "x"}})
    assert memory_storage_options(local) is None  # a local directory needs no options
    for bad in ({"shard_ids": [0]}, {"shard_ids": [2], "shard_count": 2},
                {"shard_ids": [], "shard_count": 2}):
        with pytest.raises(ValueError, match="shard"):
            Settings.model_validate({
                "providers": {"p": {"kind": "openai", "model": "m"}},
                "bots": {"b": {"chain": ["p"], "discord": {"token_env": "T", **bad}}}})
