"""``boternity memory reembed`` never loses a fact when the rewrite fails (issue 13).

The real CLI runs as a subprocess whose file size limit (``RLIMIT_FSIZE``)
is below one data file of the new table: the operating system refuses the
write (EFBIG), as a full disk would. Before the fix the bot's table was
dropped first, so every fact was gone; now the new table is written beside
the old one, counted, and only then swapped in.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lancedb
import pytest

from adapters.wiring.build import build_app
from adapters.wiring.settings import load_settings
from engine.types import Fact
from persistence.vectors.embeddings import FastEmbedder
from persistence.vectors.memory import LanceMemoryStore, table_name
from persistence.vectors.shared import TABLE
from persistence.vectors.tables import STAGING_PREFIX

ROOT = Path(__file__).resolve().parent.parent
FACTS, SHARED = 600, 40
LIMIT_BYTES = 32 * 1024  # below the data file of 40 rows of 384 floats (~60 KB)

CONFIG = """
[storage]
data_dir = "{data}"

[providers.primary]
kind = "openai_compatible"
base_url = "http://127.0.0.1:9/v1"
model = "fake-model"

[bots.helper]
chain = ["primary"]

[bots.scout]
chain = ["primary"]
"""


def _small_files() -> None:  # runs in the child before exec
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, LIMIT_BYTES))


def reembed(config: Path, *argv: str, limited: bool) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "adapters.cli", "--config", str(config), "--env-file", "",
         "memory", "reembed", *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        preexec_fn=_small_files if limited else None)


async def rows(uri: str, name: str) -> dict[str, str]:
    """id -> text of a table, read outside the API."""
    db = await lancedb.connect_async(uri, read_consistency_interval=timedelta(0))
    table = await db.open_table(name)
    return {r["id"]: r["text"] for r in await table.query().select(["id", "text"]).to_list()}


async def tables(uri: str) -> list[str]:
    db = await lancedb.connect_async(uri)
    return sorted((await db.list_tables()).tables)


@pytest.mark.timeout(600)  # three CLI processes, each loading the model
@pytest.mark.usefixtures("restore_logging")
async def test_a_failed_reembed_keeps_every_fact_and_a_rerun_finishes(tmp_path: Path) -> None:
    config = tmp_path / "boternity.toml"
    config.write_text(CONFIG.format(data=tmp_path / "data"), encoding="utf-8")
    settings = load_settings(config, environ={}, dotenv=None)
    async with build_app(settings) as app:
        admin = app.memory_admin
        assert admin is not None
        added = await admin.store.add_many(
            [Fact(id="", text=f"Fact number {i}: the meeting room {i} has {i % 7} chairs",
                  bot="helper", user=f"telegram:{i % 5}") for i in range(FACTS)])
        for fact in added[:SHARED]:
            await admin.publish("helper", fact.id, level="public")
    uri = str(tmp_path / "data" / "lancedb")
    before = await rows(uri, table_name("helper"))
    shared_before = await rows(uri, TABLE)
    assert len(before) == FACTS and len(shared_before) == SHARED

    failed = reembed(config, "--bot", "helper", limited=True)
    assert failed.returncode != 0 and "File too large" in failed.stderr, failed.stderr[-2000:]
    assert await rows(uri, table_name("helper")) == before  # every fact survived
    failed = reembed(config, "--bot", "scout", limited=True)  # scout has no table: shared only
    assert failed.returncode != 0 and "File too large" in failed.stderr, failed.stderr[-2000:]
    assert await rows(uri, TABLE) == shared_before

    done = reembed(config, "--bot", "helper", limited=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"helper: {FACTS} rows re-embedded" in done.stderr
    assert f"(shared): {SHARED} rows re-embedded" in done.stderr
    assert await rows(uri, table_name("helper")) == before
    assert await rows(uri, TABLE) == shared_before
    assert await tables(uri) == sorted([table_name("helper"), TABLE])  # no leftovers
    async with build_app(settings) as app:
        admin = app.memory_admin
        assert admin is not None
        assert (await admin.verify()).ok
        found = await admin.store.search("helper", "meeting room 17 chairs",
                                         users=["telegram:2"], limit=1)
        assert found and found[0].text.startswith("Fact number 17:")


KILLED_MID_WRITE = """
import asyncio, os, signal, sys
from pathlib import Path
from persistence.vectors.embeddings import FastEmbedder
from persistence.vectors.memory import LanceMemoryStore

async def main() -> None:
    embedder = await FastEmbedder.load(Path(sys.argv[2]))
    async with await LanceMemoryStore.open(sys.argv[1], embedder) as store:
        def progress(done: int, total: int) -> None:
            if done < total:  # after the first batch reached the new table: kill -9
                os.kill(os.getpid(), signal.SIGKILL)
        await store.reembed("helper", progress=progress)

asyncio.run(main())
"""


async def test_a_reembed_killed_mid_write_keeps_every_fact_and_a_rerun_finishes(
    tmp_path: Path, embedder: FastEmbedder
) -> None:
    uri = str(tmp_path / "lancedb")
    async with await LanceMemoryStore.open(uri, embedder) as store:
        await store.add_many([Fact(id="", text=f"Fact number {i} about room {i}", bot="helper")
                              for i in range(FACTS)])
    before = await rows(uri, table_name("helper"))
    killed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_MID_WRITE, uri, str(tmp_path / "models"), cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(killed.communicate(), 300)
    assert killed.returncode == -signal.SIGKILL, stderr[-2000:]
    staging = STAGING_PREFIX + table_name("helper")
    assert staging in await tables(uri)  # the new table was partly written ...
    assert 0 < len(await rows(uri, staging)) < FACTS
    assert await rows(uri, table_name("helper")) == before  # ... and the old one is whole
    async with await LanceMemoryStore.open(uri, embedder) as store:
        assert await store.reembed("helper") == FACTS
        assert await store.bots() == ["helper"]  # the staging table is no bot
    assert await rows(uri, table_name("helper")) == before
    assert await tables(uri) == [table_name("helper")]
