"""``boternity memory ...`` and ``boternity shared ...`` end to end.

Each command runs through the real entry point (``adapters.cli.main.main``: config
file, ``build_app``, the real embedding model, LanceDB and SQLite in a tmp
dir), in a worker thread with its own event loop, exactly as a second
process would; one test also runs the installed module as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lancedb
import pytest

from adapters.cli.main import main
from adapters.wiring.build import build_app
from adapters.wiring.settings import load_settings
from engine.types import IncomingMessage, Reply
from persistence.vectors import query_model
from tests.fakes.openai_server import FakeOpenAI, Text

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
[storage]
data_dir = "{data}"

[providers.primary]
kind = "openai_compatible"
base_url = "{base_url}"
model = "fake-model"

[bots.helper]
chain = ["primary"]
trust_level = "trusted"
trust_groups = ["ops"]
[bots.helper.memory]
min_score = 0.2
extract = false

[bots.scout]
chain = ["primary"]
"""


# main() configures logging process-wide: undo it after every test.
pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "boternity.toml"
    # Nothing listens on port 9: memory commands never call a provider.
    path.write_text(CONFIG.format(data=tmp_path / "data", base_url="http://127.0.0.1:9/v1"))
    return path


class Cli:
    """Runs ``boternity --config X ...`` in-process; returns (exit code, stdout, stderr)."""

    def __init__(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config = config
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["--config", str(self.config), "--env-file", os.devnull, *argv])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json_lines(self, *argv: str) -> list[dict[str, Any]]:
        code, out, err = self(*argv, "--json")
        assert code == 0, err
        return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture
def cli(config: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(config, capsys)


@pytest.fixture
def wanted(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Each time a command wants the query model (its directory), observed.

    Storing (add, import, reembed) embeds with the exact model only: the query
    model is not even looked for until a command searches (it is built once
    per machine, and loading it costs every command that does not use it).
    """
    calls: list[Path] = []
    real = query_model.prepare_query_model_dir

    def observed(model_dir: Path) -> Path:
        calls.append(model_dir)
        return real(model_dir)

    monkeypatch.setattr(query_model, "prepare_query_model_dir", observed)
    return calls


def test_import_reports_bad_lines_and_export_round_trips(
        cli: Cli, tmp_path: Path, wanted: list[Path]) -> None:
    lines = [
        json.dumps({"text": "The office opens at 8"}),
        json.dumps({"text": "Alice is vegetarian", "user": "telegram:alice",
                    "category": "personal", "importance": 0.9,
                    "metadata": {"source": "crm", "row": 7}}),
        "{this is not json",
        json.dumps({"user": "telegram:bob"}),
        "",
        json.dumps({"text": "Bob likes chess", "colour": "blue"}),
        json.dumps({"text": "Bob likes chess", "user": "telegram:bob", "importance": 3}),
        json.dumps({"text": "Bob plays chess on Sundays", "user": "telegram:bob"}),
    ]
    source = tmp_path / "facts.jsonl"
    source.write_text("\n".join(lines) + "\n")

    code, _, err = cli("memory", "import", str(source), "--bot", "helper")
    assert code == 1  # done, with problems
    for number in (3, 4, 6, 7):
        assert f"facts.jsonl:{number}: skipped" in err
    assert "facts.jsonl:7: skipped: importance" in err
    assert "imported 3, already present 0, bad lines 4" in err
    assert wanted == []  # importing only stores

    listed = cli.json_lines("memory", "list", "--bot", "helper")
    assert sorted(f["text"] for f in listed) == [
        "Alice is vegetarian", "Bob plays chess on Sundays", "The office opens at 8"]
    alice = next(f for f in listed if f["user"] == "telegram:alice")
    assert alice["category"] == "personal" and alice["importance"] == 0.9
    assert alice["metadata"] == {"source": "crm", "row": 7}

    exported = tmp_path / "export.jsonl"
    code, out, err = cli("memory", "export", "--bot", "helper", "-o", str(exported))
    assert code == 0 and "exported 3 memories" in err and out == ""
    code, _, err = cli("memory", "import", str(exported), "--bot", "scout")
    assert code == 0 and "imported 3, already present 0, bad lines 0" in err
    code, _, err = cli("memory", "import", str(exported), "--bot", "scout")
    assert code == 0 and "imported 0, already present 3" in err  # idempotent

    code, out, _ = cli("memory", "export", "--bot", "scout")  # to stdout
    again = sorted(out.splitlines())
    assert again == sorted(exported.read_text().splitlines())  # ids, times, metadata kept


def test_reimporting_lines_without_ids_adds_nothing(cli: Cli, tmp_path: Path) -> None:
    """Issue 12: a JSON Lines file without ids, imported twice (or an interrupted
    import run again), must not store every fact twice; the same words about
    another person, or general, are a different fact."""
    lines = [
        json.dumps({"text": "Alice is vegetarian", "user": "telegram:42"}),
        json.dumps({"text": "The office opens at 8"}),
        json.dumps({"text": "alice  is VEGETARIAN", "user": "telegram:42"}),  # same, in-file
        json.dumps({"text": "Alice is vegetarian", "user": "telegram:43"}),  # another person
    ]
    source = tmp_path / "no-ids.jsonl"
    source.write_text("\n".join(lines) + "\n")
    code, _, err = cli("memory", "import", str(source), "--bot", "helper")
    assert code == 0 and "imported 3, already present 1" in err
    code, _, err = cli("memory", "import", str(source), "--bot", "helper")
    assert code == 0 and "imported 0, already present 4" in err
    listed = cli.json_lines("memory", "list", "--bot", "helper")
    assert sorted((f["user"], f["text"]) for f in listed) == [
        ("", "The office opens at 8"), ("telegram:42", "Alice is vegetarian"),
        ("telegram:43", "Alice is vegetarian")]


def test_add_search_forget_and_reembed(cli: Cli, wanted: list[Path]) -> None:
    code, out, _ = cli("memory", "add", "Alice drinks green tea every morning", "--bot", "helper",
                       "--user", "telegram:alice", "--category", "preference")
    assert code == 0
    tea = out.strip()
    code, out, _ = cli("memory", "add", "The printer is on the second floor", "--bot", "helper")
    printer = out.strip()
    assert wanted == []

    found = cli.json_lines("memory", "search", "what does Alice drink?", "--bot", "helper")
    assert len(wanted) == 1
    assert [f["id"] for f in found][:1] == [tea] and found[0]["score"] > 0.3
    code, out, _ = cli("memory", "search", "where is the printer", "--bot", "helper")
    assert code == 0 and printer in out and "(general)" in out  # a table on stdout

    assert cli("memory", "forget", tea, "--bot", "helper")[0] == 0
    assert cli("memory", "forget", tea, "--bot", "helper")[0] == 1  # already gone

    wanted.clear()
    code, _, err = cli("memory", "reembed", "--bot", "helper")
    assert code == 0 and "helper: 1 rows re-embedded" in err
    assert wanted == []
    assert [f["id"] for f in cli.json_lines("memory", "list", "--bot", "helper")] == [printer]

    code, _, err = cli("memory", "list", "--bot", "nobody")
    assert code == 2 and "bots.nobody: no such bot (configured: helper, scout)" in err


def test_shared_publish_list_and_verify_detects_tampering(cli: Cli, tmp_path: Path) -> None:
    _, out, _ = cli("memory", "add", "The deploy freeze starts on Friday", "--bot", "helper")
    freeze = out.strip()
    _, out, _ = cli("memory", "add", "The office wifi is called Hive", "--bot", "helper")
    wifi = out.strip()

    code, out, err = cli("shared", "publish", freeze, "--bot", "helper")  # bot default: trusted
    assert code == 0 and "published as trusted in group ops" in err
    code, _, err = cli("shared", "publish", wifi, "--bot", "helper", "--level", "public")
    assert code == 0 and "published as public" in err

    # scout is not in group ops: it reads the public fact only, with provenance.
    [seen] = cli.json_lines("shared", "list", "--bot", "scout")
    assert seen["text"] == "The office wifi is called Hive"
    assert seen["author_bot"] == "helper" and seen["trust_level"] == "public"

    code, out, _ = cli("shared", "verify")
    assert code == 0 and "intact: 2 rows checked" in out

    async def tamper() -> None:  # an edit made outside the API, straight in LanceDB
        db = await lancedb.connect_async(str(tmp_path / "data" / "lancedb"))
        table = await db.open_table("shared_memories")
        await table.update(updates={"trust_level": "'public'"}, where=f"id = '{freeze}'")

    asyncio.run(tamper())
    code, out, _ = cli("shared", "verify")
    assert code == 1 and "TAMPERING DETECTED" in out and freeze in out
    # The tampered row is excluded from reads, so widening its trust level gained nothing.
    assert [f["id"] for f in cli.json_lines("shared", "list", "--bot", "scout")] == [wifi]


async def test_why_shows_what_the_last_reply_recalled(
    tmp_path: Path, openai_fake: FakeOpenAI, capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "boternity.toml"
    config.write_text(CONFIG.format(data=tmp_path / "data", base_url=openai_fake.base_url))
    cli = Cli(config, capsys)
    settings = load_settings(config, environ={}, dotenv=None)
    async with build_app(settings) as app:
        assert app.memory_admin is not None
        # A service loads the query model at start: its first reply does not wait for it.
        assert app.extras["memory_parts"].embedder.once.value._query.model is not None
        fact = await app.memory_admin.add("helper", "Alice is allergic to peanuts",
                                          user="telegram:alice")
        await app.memory_admin.add("helper", "Bob is allergic to cats", user="telegram:bob")
        openai_fake.script(Text(["Avoid", " peanuts."]))
        message = IncomingMessage(platform="telegram", bot="helper", chat="c1",
                                  user="telegram:alice",
                                  user_name="Alice", text="am I allergic to anything?",
                                  message_id="m7", is_group=True)
        *_, reply = [item async for item in app.conversations["helper"].reply(message)]
        assert isinstance(reply, Reply) and reply.recalled_ids == (fact.id,)
        # The prompt the provider saw carried Alice's fact and not Bob's.
        prompt = json.dumps(openai_fake.requests[-1].body["messages"])
        assert "peanuts" in prompt and "cats" not in prompt

    # Another process asks why.
    [record] = await asyncio.to_thread(cli.json_lines, "memory", "why", "--bot", "helper",
                                       "--chat", "c1")
    assert record["message_id"] == "m7" and record["query"] == "am I allergic to anything?"
    assert [(f["id"], f["source"]) for f in record["facts"]] == [(fact.id, "own")]
    assert record["facts"][0]["score"] > 0.2
    code, out, _ = await asyncio.to_thread(cli, "memory", "why", "--bot", "helper")
    assert code == 0 and fact.id in out and "chat c1" in out
    code, _, err = await asyncio.to_thread(cli, "memory", "why", "--bot", "helper",
                                           "--chat", "nowhere")
    assert code == 1 and "no reply" in err
    # Forgotten means forgotten: `why` no longer shows the fact's text either.
    code, _, _ = await asyncio.to_thread(cli, "memory", "forget", "--user", "telegram:alice",
                                         "--bot", "helper", "--yes")
    assert code == 0
    [record] = await asyncio.to_thread(cli.json_lines, "memory", "why", "--bot", "helper",
                                       "--chat", "c1")
    assert record["facts"] == []


def test_the_installed_command_runs_as_a_subprocess(config: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    source = tmp_path / "one.jsonl"
    source.write_text(json.dumps({"text": "Standup is at 9:30"}) + "\n")
    run = subprocess.run(
        [sys.executable, "-m", "adapters.cli", "--config", str(config), "--env-file", os.devnull,
         "memory", "import", str(source), "--bot", "scout"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120, check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "imported 1" in run.stderr


def test_users_are_named_platform_colon_id_and_promote_makes_a_fact_bot_wide(
    cli: Cli, tmp_path: Path,
) -> None:
    """Issue 12: the documented form finds the user; a bare id is refused, not guessed."""
    code, _, err = cli("memory", "add", "Ada likes tea", "--bot", "helper", "--user", "7")
    assert code != 0 and "telegram:7" in err and "platform" in err  # names the fix
    lines = tmp_path / "keys.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in [
        {"text": "Ada likes tea", "user": "telegram:7"},
        {"text": "Ada keeps a bonsai", "user": "telegram:telegram:7"},  # an old export
        {"text": "Bo likes chess", "user": "7"},  # which platform? refused
        {"text": "Ada's desk is by the window", "user": "telegram:7", "chat": "-100"},
    ]) + "\n")
    code, _, err = cli("memory", "import", str(lines), "--bot", "helper")
    assert "imported 3, already present 0, bad lines 1" in err and "skipped" in err
    listed = cli.json_lines("memory", "list", "--bot", "helper", "--user", "telegram:7")
    assert {(f["text"], f["user"], f["chat"]) for f in listed} == {
        ("Ada likes tea", "telegram:7", ""), ("Ada keeps a bonsai", "telegram:7", ""),
        ("Ada's desk is by the window", "telegram:7", "-100")}
    desk = next(f["id"] for f in listed if f["chat"])
    code, _, err = cli("memory", "promote", desk, "--bot", "helper")
    assert code == 0 and "bot-wide" in err
    listed = cli.json_lines("memory", "list", "--bot", "helper", "--user", "telegram:7")
    assert {f["chat"] for f in listed} == {""}
    code, _, err = cli("memory", "forget", "--bot", "helper", "--user", "telegram:7", "--yes")
    assert code == 0 and "forgot 3" in err
