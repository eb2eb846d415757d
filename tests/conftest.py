"""Shared fixtures. Append yours; keep each fake peer in its own tests/fakes/ module."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.fakes.bedrock_server import FakeBedrock
from tests.fakes.openai_server import FakeOpenAI, start_openai_fake


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Derived models (the int8 query model) are built in this run's temp dir,
    not the user's ~/.cache: once per run, shared by the xdist workers (each has
    its own base temp under one root) and the CLI subprocesses (they inherit it)."""
    from persistence.vectors.query_model import CACHE_ENV

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    with pytest.MonkeyPatch.context() as patch:  # session-wide; restored at the end
        patch.setenv(CACHE_ENV, str(root / "model-cache"))
        yield


@pytest.fixture
async def openai_fake() -> AsyncIterator[FakeOpenAI]:
    """A running fake OpenAI-compatible server (see tests/fakes/openai_server.py)."""
    async with start_openai_fake() as fake:
        yield fake


@pytest.fixture
async def bedrock_fake(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[FakeBedrock]:
    """A running fake Bedrock runtime (see tests/fakes/bedrock_server.py).

    Also gives the standard AWS credential chain dummy keys and a region from
    the environment, and hides any real ~/.aws files and instance metadata.
    """
    empty = tmp_path_factory.mktemp("aws")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    async with FakeBedrock() as fake:
        yield fake


# --- relational databases: SQLite and the real PostgreSQL (scale-out helper) ---
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for this test (dropped after).

    One database per test keeps parallel runs and parallel helpers apart.
    Skips when no server answers on 127.0.0.1:5432.
    """
    import uuid

    import asyncpg

    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 ({type(exc).__name__})")
    name = f"boternity_test_{uuid.uuid4().hex[:12]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same test on SQLite (a tmp file) and on a fresh PostgreSQL database.

    Persistence tests take ``database_url`` instead of building a SQLite URL,
    and so run against both.
    """
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'boternity.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


# --- long-term memory: the real embedding model, loaded once per test run ---
@pytest.fixture(scope="session")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> object:
    """The real all-MiniLM-L6-v2 ``FastEmbedder`` (persistence/vectors/embeddings.py), shared.

    Loaded once per session (about 1-2 s); ``embed`` runs in a worker thread
    of whichever event loop calls it.
    """
    import asyncio

    from persistence.vectors.embeddings import FastEmbedder

    return asyncio.run(FastEmbedder.load(tmp_path_factory.mktemp("models"), threads=2))


# --- platform adapters (Slack / Discord helper): one bot's real reply pipeline ---
class BotPipeline:
    """The real pipeline of a bot named ``demo``: SQLite in a tmp dir, the real
    ``openai`` SDK against ``openai_fake`` through the real ``FallbackChain``,
    and admin ``Commands``. ``replies`` records every finished ``Reply`` (via
    the ``ReplyObserver`` port), so a test can compare what a platform shows
    with what the engine produced.
    """

    def __init__(self, fake: FakeOpenAI, tmp_path: object) -> None:
        import asyncio
        from contextlib import AsyncExitStack
        from pathlib import Path

        self.fake = fake
        self.tmp_path = Path(str(tmp_path))
        self.stack = AsyncExitStack()
        self.replies: list[object] = []
        self.replied = asyncio.Event()

    async def on_reply(self, message: object, reply: object) -> None:
        self.replies.append(reply)
        self.replied.set()

    async def start(self) -> None:
        from pydantic import SecretStr

        from engine.admin.bot import LastReplies, PersonaAdmin, ProviderAdmin
        from engine.conversation import Conversation
        from engine.providers.fallback import Breakers, FallbackChain
        from engine.providers.openai_compat import OpenAICompatProvider
        from engine.types import Capabilities
        from persistence.sql.conversations import SqlConversationStore
        from persistence.sql.database import Database

        db = await self.stack.enter_async_context(
            Database(f"sqlite+aiosqlite:///{self.tmp_path / 'bot.db'}"))
        provider = await self.stack.enter_async_context(OpenAICompatProvider(
            name="primary", model="primary-model", base_url=self.fake.base_url,
            api_key=SecretStr("sk-test"), capabilities=Capabilities(context_window=32_768),
            timeout_s=10, first_token_timeout_s=5, idle_timeout_s=5,
        ))
        self.chain = FallbackChain([provider], Breakers())
        self.last = LastReplies()
        self.conversation = Conversation(
            bot="demo", persona="You are terse.", chain=self.chain,
            store=SqlConversationStore(db), footer="always", observers=[self, self.last],
        )
        from persistence.sql.files import SqlFileStore

        self.files = SqlFileStore(db, self.tmp_path / "data", max_file_bytes=1_000_000,
                                  max_bot_bytes=10_000_000)
        from engine.admin.people import PeopleAdmin
        from persistence.sql.erasure import SqlErasure

        self.people = PeopleAdmin(bots=["demo"], records=SqlErasure(db, self.files))
        self.provider_admin = ProviderAdmin({"demo": self.chain}, self.last)
        self.persona_admin = PersonaAdmin({"demo": self.conversation})

    def commands(self, admins: tuple[str, ...]) -> object:
        from adapters.chat.commands import Commands
        from engine.admin.bot import FileAdmin

        return Commands(bot="demo", admins=admins, providers=self.provider_admin,
                        persona=self.persona_admin,
                        files=FileAdmin(self.files) if self.files is not None else None,
                        people=self.people, history=self.conversation.store)


@pytest.fixture
async def bot_pipeline(openai_fake: FakeOpenAI, tmp_path: object) -> AsyncIterator[BotPipeline]:
    pipeline = BotPipeline(openai_fake, tmp_path)
    async with pipeline.stack:
        await pipeline.start()
        yield pipeline


# --- in-process CLI runs (engine polish helper) ---
@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo what ``adapters.cli.main.main()`` does to logging process-wide.

    ``main()`` sets logger levels and puts a root handler on the captured
    stderr; a module that calls it in-process uses this fixture
    (``pytestmark = pytest.mark.usefixtures("restore_logging")``), or later
    tests in the same process see its levels (httpx=WARNING leaked once).
    """
    import logging

    manager = logging.root.manager
    levels = {name: logging.getLogger(name).level for name in ["", *manager.loggerDict]}
    handlers = list(logging.root.handlers)
    yield
    for name in ["", *manager.loggerDict]:
        logging.getLogger(name).setLevel(levels.get(name, logging.NOTSET))
    logging.root.handlers[:] = handlers
