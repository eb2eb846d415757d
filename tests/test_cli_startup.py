"""What ``boternity`` pays for at start, and how it talks: the real CLI process
(``python -m adapters.cli``) on configs shaped like the shipped examples.

Structural, never timed: ``-X importtime`` lists every module the process
imported (worker threads included), so "the demo chat never loads LanceDB" is
a fact about the process, not a stopwatch reading.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakes.openai_server import FakeOpenAI, Text

ROOT = Path(__file__).resolve().parent.parent
# Each test runs several fresh processes; on a busy CI machine that takes a while.
pytestmark = pytest.mark.timeout(900)

# Shaped like deploy/boternity.example.toml with a real provider configured.
CONFIG = """
[storage]
data_dir = "{data}"

[chain]
fail_max = 3
reset_timeout_s = 30

[providers.primary]
kind = "openai_compatible"
base_url = "{base_url}"
model = "fake-model"
api_key_env = "FAKE_PRIMARY_KEY"

[bots.demo]
persona = "You are a helpful assistant."
chain = ["primary"]
footer = "on_failover"
history_messages = 30
{extra}
"""

HEAVY = ("lancedb", "pyarrow", "fastembed", "onnxruntime", "telegram", "discord", "slack_bolt",
         "aiohttp.web", "prometheus_client")


@dataclass
class Run:
    code: int
    out: str
    err: str  # stderr without the -X importtime lines
    modules: set[str]  # every module the process imported


def write_config(tmp_path: Path, base_url: str = "http://127.0.0.1:9/v1", extra: str = "") -> Path:
    path = tmp_path / "boternity.toml"
    path.write_text(CONFIG.format(data=tmp_path / "data", base_url=base_url, extra=extra),
                    encoding="utf-8")
    return path


async def cli(*args: str, cwd: Path, stdin: str = "") -> Run:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FAKE_", "LANCEDB_LOG", "_ARGCOMPLETE"))}
    env.update(PYTHONPATH=str(ROOT), FAKE_PRIMARY_KEY="sk-test", HF_HUB_OFFLINE="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-X", "importtime", "-m", "adapters.cli", *args, cwd=cwd, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), timeout=300)
    assert proc.returncode is not None
    lines = err.decode().splitlines()
    modules = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    text = "\n".join(line for line in lines if not line.startswith("import time:"))
    return Run(proc.returncode, out.decode(), text, modules)


def loaded(run: Run) -> list[str]:
    return sorted(m for m in HEAVY if m in run.modules)


# --- options ---

async def test_global_options_work_after_the_command_and_version(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    run = await cli("providers", "-v", "--config", str(config), cwd=tmp_path)
    assert run.code == 0, run.err
    assert "primary" in run.out and "fake-model" in run.out
    assert "DEBUG" in run.err  # -v given after the command counted (asyncio says so)
    # Before the command still works, and the subcommand does not reset it.
    run = await cli("--config", str(config), "memory", "list", "--bot", "demo", cwd=tmp_path)
    assert run.code == 0, run.err
    run = await cli("--version", cwd=tmp_path)
    assert run.code == 0 and run.out.startswith("boternity ")


async def test_env_file_missing_or_malformed_is_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    run = await cli("--config", str(config), "--env-file", "nowhere.env", "providers",
                    cwd=tmp_path)
    assert run.code == 2
    assert run.err.strip().splitlines()[-1] == "boternity: nowhere.env: --env-file: file not found"
    (tmp_path / "bad.env").write_text("GOOD=1\nsk-secret-value without equals\n")
    run = await cli("--config", str(config), "providers", "--env-file", "bad.env", cwd=tmp_path)
    assert run.code == 2
    assert "boternity: bad.env:2: not a KEY=value line" in run.err
    assert "sk-secret-value" not in run.err and "Traceback" not in run.err


async def test_bad_arguments_are_refused_before_anything_starts(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    for args, message in [
        (["memory", "add", "x", "--importance", "7"],
         "boternity: memory add: argument --importance: must be between 0 and 1 (got 7)"),
        (["memory", "list", "--limit", "0"], "argument --limit: must be at least 1 (got 0)"),
        (["memory", "add", "x", "--metadata", "[1]"], "argument --metadata: must be a JSON"),
        (["usage", "--days", "0"], "argument --days: must be 1 to 366 (got 0)"),
        (["memory", "list", "--bot", "nosuch"],
         "bots.nosuch: no such bot (configured: demo)"),
    ]:
        run = await cli("--config", str(config), *args, cwd=tmp_path)
        assert run.code == 2 and message in run.err, (args, run.err)
        # Nothing started: no database was opened, no module of the app imported.
        assert not (tmp_path / "data").exists(), args
        assert "adapters.wiring.build" not in run.modules and "sqlalchemy" not in run.modules


def test_shell_completion_offers_commands_and_options(tmp_path: Path) -> None:
    """What bash asks through ``register-python-argcomplete boternity`` (README)."""
    import subprocess

    answers = tmp_path / "completions.txt"
    for line, expected in [("boternity memory fo", ["forget"]),
                           ("boternity providers --", ["--config", "--env-file", "--verbose"])]:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "_ARGCOMPLETE": "1",
               "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line, "COMP_POINT": str(len(line)),
               "_ARGCOMPLETE_STDOUT_FILENAME": str(answers)}
        proc = subprocess.run([sys.executable, "-m", "adapters.cli"], env=env, cwd=tmp_path,
                              capture_output=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr
        offered = answers.read_text().split()
        assert all(word in offered for word in expected), (line, offered)


def test_telegram_admins_may_be_numbers(tmp_path: Path) -> None:
    from adapters.wiring.settings import load_settings

    config = write_config(tmp_path, extra='[bots.demo.telegram]\ntoken_env = "TG"\n'
                                          'admins = [12345, "67890"]\n')
    settings = load_settings(config, environ={}, dotenv=None)
    telegram = settings.bots["demo"].telegram
    assert telegram is not None and telegram.admins == ["12345", "67890"]


# --- what one-shot commands start ---

@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port somebody (the running service, say) is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def test_one_shot_commands_beside_the_service_never_start_http(
    tmp_path: Path, taken_port: int, openai_fake: FakeOpenAI,
) -> None:
    config = write_config(tmp_path, openai_fake.base_url,
                          extra=f"\n[http]\nenabled = true\nport = {taken_port}\n")
    for args in (["providers"], ["usage"], ["memory", "list"], ["memory", "why"],
                 ["shared", "verify"], ["chat"]):
        run = await cli("--config", str(config), *args, cwd=tmp_path, stdin="hello there\n")
        assert "address already in use" not in run.err, args
        assert "Traceback" not in run.err, args
        assert run.code in (0, 1), (args, run.err)  # `why` with nothing recorded says so: 1
        assert "aiohttp.web" not in run.modules, args  # the ops server is not even imported
    assert openai_fake.count >= 1  # the chat was answered


async def test_admin_commands_load_no_embedding_model(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra="[bots.demo.memory]\nextract = false\n")
    run = await cli("--config", str(config), "memory", "add", "The office opens at 8",
                    cwd=tmp_path)
    assert run.code == 0, run.err
    assert "fastembed" in run.modules  # adding embeds: the model loads
    assert "WARN" not in run.err  # LanceDB's Rust logger is silenced ("will be created")
    for args in (["memory", "list"], ["memory", "export"], ["shared", "list"],
                 ["shared", "verify"], ["memory", "forget", "--user", "telegram:1", "--yes"]):
        run = await cli("--config", str(config), *args, cwd=tmp_path)
        assert run.code in (0, 1), (args, run.err)
        assert "lancedb" in run.modules, args  # they read the table...
        assert "fastembed" not in run.modules and "onnxruntime" not in run.modules, args
        assert "openai" not in run.modules, args  # ...and start no provider
        assert "INFO" not in run.err, args
    for args in (["memory", "why"], ["usage"]):  # SQL only
        run = await cli("--config", str(config), *args, cwd=tmp_path)
        assert loaded(run) == [], args


async def test_providers_starts_no_database_no_sdk_and_no_redis(tmp_path: Path) -> None:
    """No service to ask and no Redis: what ``providers`` shows needs neither the
    database nor a provider SDK, and a breaker no call went through is closed
    without pybreaker (which imports redis) being imported at all."""
    config = write_config(tmp_path, extra='[bots.other]\nchain = ["aws"]\n'
                          '[providers.aws]\nkind = "bedrock"\nmodel = "amazon.nova-micro-v1:0"\n'
                          'region = "us-east-1"\n')
    run = await cli("--config", str(config), "providers", cwd=tmp_path)
    assert run.code == 0, run.err
    assert run.out.startswith("THIS process only")
    assert re.search(r"^primary +openai_compatible +fake-model +breaker: closed", run.out, re.M)
    assert re.search(r"^aws +bedrock +amazon.nova-micro-v1:0 +breaker: closed", run.out, re.M)
    unwanted = ("openai", "httpx2", "aioboto3", "botocore.config", "aiohttp", "pybreaker",
                "redis", "sqlalchemy", "alembic", "lancedb", "fastembed", "rich")
    assert [m for m in unwanted if m in run.modules] == []
    assert not (tmp_path / "data").exists()  # no database opened, nor created


# Which thread first imports each watched module: an observer on the import
# path (it finds nothing itself), the real CLI after it.
_WHERE = """
import json, sys, threading
WATCHED = ("openai", "pybreaker", "redis", "lancedb", "fastembed")
where = {}
class Where:
    def find_spec(self, name, path=None, target=None):
        if name in WATCHED:
            where.setdefault(name, threading.current_thread().name)
        return None
sys.meta_path.insert(0, Where())
from adapters.cli.main import main
code = main(sys.argv[1:])
print("imported in: " + json.dumps(where))
sys.exit(code)
"""


async def test_chat_imports_the_sdk_breakers_and_memory_off_the_loop(
    tmp_path: Path, openai_fake: FakeOpenAI,
) -> None:
    """``chat`` loads what its first reply needs in worker threads (the warm-up
    beside the prompt), never on the event loop's thread: the SDK, pybreaker
    with redis, and LanceDB with the embedding model when there is a memory."""
    config = write_config(tmp_path, openai_fake.base_url,
                          extra="[bots.demo.memory]\nextract = false\n")
    run = await cli("--config", str(config), "memory", "add", "local is allergic to peanuts",
                    "--user", "terminal:local", cwd=tmp_path)
    assert run.code == 0, run.err
    openai_fake.script(Text(["Avoid", " peanuts."]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAKE_PRIMARY_KEY": "sk-test",
           "HF_HUB_OFFLINE": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WHERE, "--config", str(config), "chat", cwd=tmp_path, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(b"am I allergic to anything?\n"),
                                      timeout=300)
    assert proc.returncode == 0, err.decode()
    answer, where = out.decode().rsplit("imported in: ", 1)
    assert "Avoid peanuts." in answer
    threads = json.loads(where)
    assert sorted(threads) == ["fastembed", "lancedb", "openai", "pybreaker", "redis"], threads
    assert "MainThread" not in threads.values(), threads  # the loop runs on the main thread


async def test_demo_chat_opens_memory_only_when_there_is_a_table(
    tmp_path: Path, openai_fake: FakeOpenAI,
) -> None:
    config = write_config(tmp_path, openai_fake.base_url)
    openai_fake.script(Text(["Hello", "!"]))
    run = await cli("--config", str(config), "chat", cwd=tmp_path, stdin="hello there\n")
    assert run.code == 0 and "Hello!" in run.out, run.err
    assert loaded(run) == []  # no LanceDB, no model, no platform SDK, no ops server
    assert not (tmp_path / "data" / "lancedb").exists()
    assert "INFO" not in run.err

    # A fact about this terminal user: now recall has a table and opens memory.
    run = await cli("--config", str(config), "memory", "add", "local is allergic to peanuts",
                    "--user", "terminal:local", cwd=tmp_path)
    assert run.code == 0, run.err
    openai_fake.script(Text(["Avoid", " peanuts."]))
    run = await cli("--config", str(config), "chat", cwd=tmp_path,
                    stdin="am I allergic to anything?\n")
    assert run.code == 0 and "Avoid peanuts." in run.out, run.err
    assert {"lancedb", "fastembed"} <= run.modules
    # The reply's prompt (not the extraction request after it) carried the fact.
    prompts = [str(r.body["messages"]) for r in openai_fake.requests]
    assert any("helpful assistant" in p and "allergic to peanuts" in p for p in prompts)


# --- confirmation and paging ---

async def test_forget_user_counts_and_wants_confirmation(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra="[bots.demo.memory]\nextract = false\n")
    for text in ("Alice likes tea", "Alice lives in Paris"):
        run = await cli("--config", str(config), "memory", "add", text, "--user",
                        "telegram:42", cwd=tmp_path)
        assert run.code == 0, run.err
    # No terminal to ask on (piped): refused, nothing deleted.
    run = await cli("--config", str(config), "memory", "forget", "--user", "telegram:42",
                    cwd=tmp_path, stdin="y\n")
    assert run.code == 2 and "boternity: this deletes data: pass --yes" in run.err
    run = await cli("--config", str(config), "memory", "list", "--user", "telegram:42",
                    "--json", cwd=tmp_path)
    assert len(run.out.splitlines()) == 2
    run = await cli("--config", str(config), "memory", "forget", "--user", "telegram:42",
                    "--yes", cwd=tmp_path)
    assert run.code == 0 and "forgot 2 memories about telegram:42" in run.err


async def test_forget_user_asks_on_a_terminal(tmp_path: Path) -> None:
    import pty

    config = write_config(tmp_path, extra="[bots.demo.memory]\nextract = false\n")
    run = await cli("--config", str(config), "memory", "add", "Bob likes chess", "--user",
                    "telegram:7", cwd=tmp_path)
    assert run.code == 0, run.err
    controller, terminal = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "FAKE_PRIMARY_KEY": "k"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "adapters.cli", "--config", str(config), "memory", "forget",
        "--user", "telegram:7", cwd=tmp_path, env=env, stdin=terminal,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    os.close(terminal)
    os.write(controller, b"n\n")  # the answer waits in the terminal's buffer
    _, err = await asyncio.wait_for(proc.communicate(), timeout=300)
    os.close(controller)
    assert proc.returncode == 2
    assert "forget 1 memories about telegram:7 in demo? [y/N]" in err.decode()
    assert "nothing forgotten" in err.decode()
    run = await cli("--config", str(config), "memory", "list", "--json", cwd=tmp_path)
    assert "Bob likes chess" in run.out  # still there


async def test_memory_list_says_it_shows_a_page(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra="[bots.demo.memory]\nextract = false\n")
    lines = "".join(f'{{"text": "fact number {i}"}}\n' for i in range(5))
    run = await cli("--config", str(config), "memory", "import", "-", cwd=tmp_path, stdin=lines)
    assert run.code == 0, run.err
    run = await cli("--config", str(config), "memory", "list", "--limit", "2", "--json",
                    cwd=tmp_path)
    assert run.code == 0 and len(run.out.splitlines()) == 2
    assert "showing 1-2 of 5" in run.err
    run = await cli("--config", str(config), "memory", "list", cwd=tmp_path)
    assert "showing" not in run.err  # everything fits on the page
