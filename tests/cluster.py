"""Run several real ``boternity run`` workers for tests and benchmarks.

``Cluster`` writes one TOML per worker (same bots, providers, PostgreSQL and
Redis; its own data dir, platform port and ops port), starts each worker as
a subprocess, waits for ``/readyz``, and plays the load balancer in front of
them: ``post(worker, event)`` signs a Slack Events API request (as Slack
does) and POSTs it to that worker; with ``platform="telegram"`` (webhook
mode), ``post_update(worker, update)`` delivers a Telegram update with the
webhook secret. Workers talk to the fake platform API and the fake OpenAI
server of the calling process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from slack_sdk.signature import SignatureVerifier

from tests.fakes.slack_server import BOT_TOKEN, TEAM

ROOT = Path(__file__).resolve().parent.parent
SIGNING_SECRET = "signing-secret-workers"
WEBHOOK_SECRET = "webhook-secret-workers"
REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def fresh_database() -> tuple[str, str]:
    """``(sqlalchemy_url, name)`` of a new, empty PostgreSQL database."""
    name = f"boternity_workers_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}", name


async def drop_database(name: str) -> None:
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


class RedisProxy:
    """A TCP proxy between one worker and Redis that a test can break.

    ``cut()``: Redis is gone (every connection closed, new ones refused);
    ``blackhole()``: Redis stops answering (connections stay open, nothing
    is forwarded); ``restore()``: Redis is back (on the same port). An async
    context manager; ``url`` is what the worker uses.
    """

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 6379)) -> None:
        self._target = target
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.silent = False
        self.url = ""
        self.asked = 0  # chunks the clients sent towards Redis (forwarded or not)

    async def __aenter__(self) -> RedisProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        return self

    async def restore(self) -> None:
        self.cut()  # drop the connections a blackhole left half-dead
        self.silent = False
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        for task in list(self._tasks):
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer, ask=True),
                             self._pipe(up_reader, writer))

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                    ask: bool = False) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while data := await source.read(65536):
                self.asked += ask
                if not self.silent:
                    sink.write(data)
                    await sink.drain()
        except OSError:
            pass
        finally:
            self._tasks.discard(task)
            sink.close()

    def cut(self) -> None:
        if self._server is not None:
            self._server.close()  # the port refuses new connections
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    def blackhole(self) -> None:
        self.silent = True


@dataclass
class Worker:
    index: int
    slack_port: int  # the platform's inbound port (Slack events or Telegram webhook)
    ops_port: int
    config: Path
    process: asyncio.subprocess.Process | None = None
    log_path: Path | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


@dataclass
class Cluster:
    """N workers; ``async with Cluster(...)`` starts them, leaving stops them."""

    size: int
    tmp: Path
    openai_base_url: str
    platform_api: str  # the fake Slack Web API base, or the fake Telegram URL
    database_url: str
    platform: str = "slack"  # or "telegram" (webhook mode)
    telegram_token: str = ""
    footer: str = "always"
    namespace: str = field(default_factory=lambda: f"workers-{uuid.uuid4().hex[:10]}")
    lease_s: float = 10.0  # short enough for a kill test, long for a busy machine
    fail_max: int = 2
    redis_urls: dict[int, str] = field(default_factory=dict)  # worker -> its own way to Redis
    workers: list[Worker] = field(default_factory=list)
    _ts: int = 0
    _session: aiohttp.ClientSession | None = None

    def _toml(self, w: Worker) -> str:
        return f"""
[storage]
data_dir = "{self.tmp / f'worker{w.index}'}"
database_url = "{self.database_url}"
redis_url = "{self.redis_urls.get(w.index, REDIS_URL)}"
redis_namespace = "{self.namespace}"
redis_lease_s = {self.lease_s}

[chain]
fail_max = {self.fail_max}
reset_timeout_s = 600

[log]
level = "INFO"
json = true

[http]
enabled = true
port = {w.ops_port}

[providers.primary]
kind = "openai_compatible"
model = "primary-model"
base_url = "{self.openai_base_url}"
api_key_env = "TEST_OPENAI_KEY"

[providers.backup]
kind = "openai_compatible"
model = "backup-model"
base_url = "{self.openai_base_url}"
api_key_env = "TEST_OPENAI_KEY"

[bots.demo]
chain = ["primary", "backup"]
footer = "{self.footer}"
memory = {{ enabled = false }}
""" + (self._slack(w) if self.platform == "slack" else self._telegram(w))

    def _slack(self, w: Worker) -> str:
        return f"""
[bots.demo.slack]
bot_token_env = "TEST_SLACK_BOT"
signing_secret_env = "TEST_SLACK_SIGNING"
mode = "http"
http_port = {w.slack_port}
api_base_url = "{self.platform_api}"
reply_to_bots = true
max_bot_turns = 2
"""

    def _telegram(self, w: Worker) -> str:
        return f"""
[bots.demo.telegram]
token_env = "TEST_TELEGRAM_TOKEN"
mode = "webhook"
webhook_url = "http://127.0.0.1:{w.slack_port}/demo"
webhook_secret_env = "TEST_WEBHOOK_SECRET"
webhook_listen = "127.0.0.1"
webhook_port = {w.slack_port}
api_base_url = "{self.platform_api}"
"""

    async def __aenter__(self) -> Cluster:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._session = aiohttp.ClientSession()
        for i in range(self.size):
            worker = Worker(i, free_port(), free_port(), self.tmp / f"worker{i}.toml")
            worker.config.write_text(self._toml(worker), encoding="utf-8")
            self.workers.append(worker)
        try:
            for worker in self.workers:
                await self.start(worker)
            await asyncio.gather(*(self.ready(w) for w in self.workers))
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def start(self, worker: Worker) -> None:
        env = {**os.environ, "TEST_OPENAI_KEY": "sk-workers-test", "TEST_SLACK_BOT": BOT_TOKEN,
               "TEST_SLACK_SIGNING": SIGNING_SECRET, "TEST_TELEGRAM_TOKEN": self.telegram_token,
               "TEST_WEBHOOK_SECRET": WEBHOOK_SECRET, "HF_HUB_OFFLINE": "1"}
        worker.log_path = self.tmp / f"worker{worker.index}.log"
        log = worker.log_path.open("wb")
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "adapters.cli", "--config", str(worker.config),
            "--env-file", "", "run", env=env, cwd=str(ROOT),
            stdout=log, stderr=asyncio.subprocess.STDOUT)
        log.close()  # the child holds its own descriptor

    async def ready(self, worker: Worker, within_s: float = 90.0) -> None:
        """Poll ``/readyz`` until 200 (a worker start has no event to await)."""
        assert self._session is not None
        deadline = time.monotonic() + within_s
        for _ in range(int(within_s * 10)):
            if not worker.alive:
                raise RuntimeError(f"worker {worker.index} exited:\n{self.log(worker)[-3000:]}")
            try:
                async with self._session.get(
                        f"http://127.0.0.1:{worker.ops_port}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        raise TimeoutError(f"worker {worker.index} not ready:\n{self.log(worker)[-3000:]}")

    def log(self, worker: Worker) -> str:
        if worker.log_path is None or not worker.log_path.exists():
            return ""
        return worker.log_path.read_text(encoding="utf-8", errors="replace")

    def event(self, channel: str, text: str) -> dict[str, Any]:
        """A direct message to the bot, as Slack's Events API delivers it."""
        self._ts += 1
        ts = f"1764070000.{self._ts:06d}"
        return {"type": "event_callback", "team_id": TEAM, "event_id": f"Ev{ts}",
                "event_time": 1764070000,
                "event": {"type": "message", "channel": channel, "user": "UALICE001",
                          "text": text, "ts": ts, "channel_type": "im"}}

    def bot_event(self, channel: str, text: str) -> dict[str, Any]:
        """A message another bot posted in a direct message channel."""
        event = self.event(channel, text)
        del event["event"]["user"]
        event["event"] |= {"bot_id": "BOTHER001", "subtype": "bot_message"}
        return event

    async def post(self, worker: int, event: dict[str, Any], *, retry: int = 0) -> int:
        """Deliver ``event`` to one worker, signed; ``retry`` > 0 adds Slack's retry headers."""
        assert self._session is not None
        body = json.dumps(event)
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Slack-Request-Timestamp": timestamp,
            "X-Slack-Signature": SignatureVerifier(SIGNING_SECRET).generate_signature(
                timestamp=timestamp, body=body),
        }
        if retry:
            headers |= {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"}
        port = self.workers[worker].slack_port
        async with self._session.post(f"http://127.0.0.1:{port}/slack/events", data=body,
                                      headers=headers) as response:
            return response.status

    async def post_update(self, worker: int, update: dict[str, Any]) -> int:
        """Deliver a Telegram update to one worker's webhook, as Telegram does."""
        assert self._session is not None
        port = self.workers[worker].slack_port
        async with self._session.post(
                f"http://127.0.0.1:{port}/demo", json=update,
                headers={"X-Telegram-Bot-Api-Secret-Token": WEBHOOK_SECRET}) as response:
            return response.status

    async def metrics(self, worker: int) -> str:
        assert self._session is not None
        async with self._session.get(
                f"http://127.0.0.1:{self.workers[worker].ops_port}/metrics") as response:
            return await response.text()

    def kill(self, worker: int) -> None:
        """``kill -9``: no cleanup of any kind."""
        process = self.workers[worker].process
        assert process is not None
        process.send_signal(signal.SIGKILL)

    async def __aexit__(self, *exc: object) -> None:
        for worker in self.workers:
            if worker.alive:
                assert worker.process is not None
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            if worker.process is not None:
                try:
                    await asyncio.wait_for(worker.process.wait(), 30)
                except TimeoutError:
                    worker.process.kill()
                    await worker.process.wait()
        if self._session is not None:
            await self._session.close()
            self._session = None
        client = aioredis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=f"{self.namespace}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
