"""``boternity user show|export|forget``, ``boternity purge`` and ``boternity bot delete``.

In-process CLI runs (``adapters.cli.main.main``) on a config shaped like the
shipped example; the data is written through the app's own stores first.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from adapters.cli.main import main
from adapters.wiring.build import build_app
from adapters.wiring.settings import load_settings
from persistence.sql.tables import MessageRow

CONFIG = """
[storage]
data_dir = "{data}"

[providers.primary]
kind = "openai_compatible"
base_url = "http://127.0.0.1:9/v1"
model = "fake-model"

[bots.demo]
chain = ["primary"]
history_days = 30
[bots.demo.memory]
extract = false

[bots.other]
chain = ["primary"]
"""

pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "boternity.toml"
    path.write_text(CONFIG.format(data=tmp_path / "data"))

    async def populate() -> None:
        async with build_app(load_settings(path, dotenv=None)) as app:
            assert app.memory_admin is not None
            bees = await app.memory_admin.add("demo", "Alice keeps bees", user="telegram:42")
            await app.memory_admin.publish("demo", bees.id)  # shared with every bot
            await app.memory_admin.add("demo", "Bob keeps fish", user="telegram:7")
            for user, text in (("telegram:42", "my bees are calm"), ("telegram:7", "fish!")):
                await app.messages.add(bot="demo", chat=user.split(":")[1], role="user",
                                       user=user, content=text)
                await app.messages.add(bot="demo", chat=user.split(":")[1],
                                       role="assistant", content=f"noted: {text}")
            async with app.database.sessions.begin() as session:  # Bob's chat is old
                await session.execute(update(MessageRow).where(MessageRow.chat == "7").values(
                    created_at=datetime.now(UTC) - timedelta(days=45)))

    asyncio.run(populate())
    return path


def run(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--config", str(config), "--env-file", os.devnull, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_user_show_export_and_forget_with_typed_confirmation(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    code, out, _ = run(capsys, config, "user", "show", "telegram:42")
    assert code == 0 and out.strip() == "telegram:42: 1 memory, 1 shared fact, 2 messages, " \
                                        "0 files, 0 recall records"
    target = tmp_path / "alice.json"
    code, _, _ = run(capsys, config, "user", "export", "telegram:42", "--bot", "demo",
                     "-o", str(target))
    exported = json.loads(target.read_text())
    assert code == 0 and exported["user"] == "telegram:42"
    assert [m["text"] for m in exported["memories"]] == ["Alice keeps bees"]
    assert [m["text"] for m in exported["shared_memories"]] == ["Alice keeps bees"]
    assert [m["text"] for m in exported["messages"]] == ["my bees are calm",
                                                          "noted: my bees are calm"]
    assert "fish" not in target.read_text()  # nobody else's data

    monkeypatch.setattr("sys.stdin", io.StringIO("telegram:7\n"))  # the wrong person
    code, _, err = run(capsys, config, "user", "forget", "telegram:42")
    assert code == 1 and "nothing deleted" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("telegram:42\n"))
    code, out, _ = run(capsys, config, "user", "forget", "telegram:42")
    # Her shared fact goes too (a tombstone keeps the chain verifiable).
    assert code == 0 and out.startswith("forgot telegram:42: 1 memory, 1 shared fact, "
                                        "2 messages")
    assert "not touched" not in out
    code, out, _ = run(capsys, config, "user", "show", "telegram:42")
    assert out.strip() == "telegram:42: 0 memories, 0 messages, 0 files, " \
                          "0 recall records"
    code, out, _ = run(capsys, config, "shared", "verify")
    assert code == 0, out
    code, out, _ = run(capsys, config, "user", "show", "telegram:7")
    assert "1 memory, 2 messages" in out  # Bob untouched
    code, _, err = run(capsys, config, "user", "show", "42")
    assert code == 2 and "PLATFORM:ID" in err
    code, _, err = run(capsys, config, "user", "show", "telegram:42", "--bot", "nope")
    assert code == 2 and "bots.nope: no such bot" in err


def test_purge_dry_run_then_purge_and_bot_delete(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run(capsys, config, "purge", "--dry-run")
    assert code == 0 and "demo: would delete 0 files, 2 messages, 0 recall_log" in out
    code, out, _ = run(capsys, config, "purge", "--dry-run")
    assert "would delete 0 files, 2 messages" in out  # the dry run deleted nothing
    code, out, _ = run(capsys, config, "purge")
    assert code == 0 and "demo: deleted 0 files, 2 messages" in out
    code, out, _ = run(capsys, config, "user", "show", "telegram:7")
    assert "0 messages" in out and "1 memory" in out  # memory_days not set: kept

    monkeypatch.setattr("sys.stdin", io.StringIO("no\n"))
    code, _, err = run(capsys, config, "bot", "delete", "demo")
    assert code == 1 and "nothing deleted" in err
    code, out, err = run(capsys, config, "bot", "delete", "demo", "--yes")
    assert code == 0
    assert out.startswith("deleted bot demo: 2 memories, 1 shared_orphaned, 2 messages")
    assert "still in" in err  # it is still configured: it starts afresh
    code, out, _ = run(capsys, config, "user", "show", "telegram:42")
    assert "0 memories, 1 shared fact, 0 messages" in out  # orphaned, kept


async def test_boternity_run_purges_in_the_background_with_a_log_line_and_a_metric(
    config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from adapters.ops.metrics import Metrics
    from adapters.wiring.people import background_runners

    class Signalled(Metrics):
        """The real metrics, plus an event for the test to wait on."""

        purged_once = asyncio.Event()

        def count_purged(self, done: Any) -> None:
            super().count_purged(done)
            self.purged_once.set()

    async with build_app(load_settings(config, dotenv=None)) as app:
        app.metrics = metrics = Signalled()
        [(label, runner)] = background_runners(app)
        assert label == "retention"
        caplog.set_level("INFO", logger="adapters.wiring.people")
        task = asyncio.create_task(runner())
        try:
            await asyncio.wait_for(metrics.purged_once.wait(), 60)
        finally:
            task.cancel()
        assert b'boternity_purged_total{bot="demo",kind="messages"} 2.0' in metrics.render()
        assert "retention: bot demo purged 0 files, 2 messages, 0 recall_log" in caplog.text
        assert [m.content for m in await app.messages.history("demo", "42")] == [
            "my bees are calm", "noted: my bees are calm"]  # newer than 30 days: kept
    settings = load_settings(config, dotenv=None).model_copy(update={"bots": {}})
    async with build_app(settings, with_memory=False) as app:
        assert background_runners(app) == []  # no bot keeps anything for a limited time
