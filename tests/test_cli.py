"""The ``boternity`` command: chat as a subprocess against the fake server,
config errors, ``providers``, ``run``, and the embedded demo config.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from adapters.cli.main import main
from tests.fakes.openai_server import FakeOpenAI, RateLimit, Status, Text

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "boternity"

# Some tests call main() in-process, which configures logging process-wide.
pytestmark = pytest.mark.usefixtures("restore_logging")


def write_config(tmp_path: Path, base_url: str, *, footer: str = "on_failover") -> Path:
    config = tmp_path / "bots.toml"
    config.write_text(f"""
[storage]
data_dir = "{tmp_path / 'data'}"

[providers.primary]
kind = "openai_compatible"
base_url = "{base_url}"
model = "primary-model"
api_key_env = "FAKE_PRIMARY_KEY"
first_token_timeout_s = 2

[providers.backup]
kind = "openai_compatible"
base_url = "{base_url}"
model = "backup-model"

[bots.helper]
persona = "You are the helper."
chain = ["primary", "backup"]
footer = "{footer}"

[bots.helper.memory]
# Not under test here: no embedding model to load, and no fact extraction
# sending extra requests to the scripted fake.
enabled = false
""", encoding="utf-8")
    return config


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


async def run_cli(args: list[str], stdin: str, cwd: Path) -> tuple[int, str, str]:
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "adapters.cli"]
    proc = await asyncio.create_subprocess_exec(
        *command, *args, cwd=cwd, env=_env(),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_chat_subprocess_answers_each_line_with_footer(
    openai_fake: FakeOpenAI, tmp_path: Path
) -> None:
    config = write_config(tmp_path, openai_fake.base_url)
    # The key comes from ./.env in the working directory.
    (tmp_path / ".env").write_text("FAKE_PRIMARY_KEY=sk-from-dotenv\n", encoding="utf-8")
    # 1: primary answers. 2: primary rate limited (30 s), backup answers.
    # 3: primary still cooling down (skipped), backup fails: one clear message.
    openai_fake.script(Text(["First", " answer."]), RateLimit(retry_after=30),
                       model="primary-model")
    openai_fake.script(Text(["Backup", " answer."]), Status(503), model="backup-model")

    code, out, err = await run_cli(["--config", str(config), "chat"],
                                   "hello one\n\nhello two\nhello three\n", tmp_path)

    assert code == 3, err  # the third message got no answer: scripts can tell
    replies = out.split("\n\n")
    assert replies[:3] == [
        "First answer.",
        "Backup answer.",
        "-- served by backup (backup-model); primary failed: rate limited",
    ]
    assert replies[3].startswith("Sorry, I can't answer right now: the AI service is not "
                                 "available.")
    assert "primary" not in replies[3] and "503" not in replies[3]
    assert replies[4:] == [""] and out.endswith("\n\n")
    assert "Traceback" not in out + err
    first = openai_fake.requests[0]
    assert first.headers["Authorization"] == "Bearer sk-from-dotenv"
    assert first.messages[0] == {"role": "system", "content": "You are the helper."}
    # The second prompt replays the first exchange (history is stored).
    second = openai_fake.requests[1].messages
    assert [m["content"] for m in second[1:]] == ["hello one", "First answer.", "hello two"]
    assert openai_fake.count == 4  # the cooling-down primary got no third request
    assert "sk-from-dotenv" not in err + out  # the secret is never printed


def _providers_config(tmp_path: Path) -> Path:
    # Port 9 (discard): nothing listens; `providers` must not need the peer.
    return write_config(tmp_path, "http://127.0.0.1:9/v1")


def test_providers_lists_kind_model_and_breaker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_PRIMARY_KEY", "sk-x")
    assert main(["--config", str(_providers_config(tmp_path)), "providers"]) == 0
    note, *lines = capsys.readouterr().out.splitlines()
    assert note.startswith("THIS process only")  # no [http] + token, no Redis: said plainly
    assert len(lines) == 2
    assert lines[0].split()[:3] == ["primary", "openai_compatible", "primary-model"]
    assert "breaker: closed" in lines[0] and lines[1].startswith("backup")


def test_run_without_platforms_says_so_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_PRIMARY_KEY", "sk-x")
    assert main(["--config", str(_providers_config(tmp_path)), "run"]) == 0
    assert "no platform adapters configured" in capsys.readouterr().err


def test_embedded_demo_config_when_no_default_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["providers"]) == 0
    captured = capsys.readouterr()
    assert "using the embedded demo config" in captured.err
    assert captured.out.splitlines()[1].startswith("local ")  # after "THIS process only"
    assert "demo model" in captured.out
    assert not (tmp_path / "data").exists()  # `providers` opens no database
    assert main(["usage"]) == 0
    assert (tmp_path / "data" / "boternity.db").exists()  # the demo's data_dir: ./data


def test_embedded_config_is_the_deploy_example() -> None:
    shipped = (ROOT / "adapters" / "wiring" / "boternity.example.toml").read_text(encoding="utf-8")
    assert (ROOT / "deploy" / "boternity.example.toml").read_text(encoding="utf-8") == shipped


BAD_CONFIGS = {
    "unknown-key": ('[storage]\ndata_dirr = "x"\n', "storage.data_dirr", "Extra inputs"),
    "unknown-provider": ('[providers.a]\nkind = "local"\n[bots.b]\nchain = ["a", "nope"]\n',
                         "bots.b.chain", "unknown provider 'nope'"),
    "missing-env-key": ('[providers.p]\nkind = "openai"\nmodel = "m"\n'
                        'api_key_env = "FAKE_UNSET_KEY"\n[bots.b]\nchain = ["p"]\n',
                        "providers.p.api_key_env", "'FAKE_UNSET_KEY' is empty or unset"),
    "key-required": ('[providers.p]\nkind = "mistral"\nmodel = "m"\n[bots.b]\nchain = ["p"]\n',
                     "providers.p.api_key_env", "required for kind 'mistral'"),
    "bad-toml": ("[providers\n", "not valid TOML", "line 1"),
    "bad-value": ('[bots.b]\nchain = []\n', "bots.b.chain", "at least 1"),
    "unknown-bot": ('[providers.a]\nkind = "local"\n[bots.b]\nchain = ["a"]\n',
                    "bots.nosuch", "no such bot"),
}


@pytest.mark.parametrize(("text", "key", "problem"), BAD_CONFIGS.values(),
                         ids=list(BAD_CONFIGS))
def test_config_errors_name_file_and_key_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    text: str, key: str, problem: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "broken.toml"
    path.write_text(text, encoding="utf-8")
    # An unknown --bot is refused before start-up; the others fail loading or starting.
    bot = "nosuch" if key == "bots.nosuch" else "b"
    code = main(["--config", str(path), "chat", "--bot", bot])
    err = capsys.readouterr().err
    assert code == 2
    assert str(path) in err and key in err and problem in err
    assert "Traceback" not in err


def test_missing_config_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(tmp_path / "nope.toml"), "providers"]) == 2
    assert "nope.toml: file not found" in capsys.readouterr().err


@pytest.mark.timeout(120)
async def test_chat_on_the_demo_defaults_with_the_real_local_model(tmp_path: Path) -> None:
    """The README's first command: no config, no key, no network."""
    code, out, err = await run_cli(["chat"], "Say hello.\n", tmp_path)
    assert code == 0, err
    answer, footer = out.rstrip("\n").rsplit("\n\n", 1)
    assert answer.strip()  # wording is the model's; structure is ours
    assert footer == "-- demo model: configure a provider for real answers"
    assert "embedded demo config" in err


async def test_sigterm_stops_a_running_chat_cleanly(
    openai_fake: FakeOpenAI, tmp_path: Path
) -> None:
    import signal

    config = write_config(tmp_path, openai_fake.base_url)
    (tmp_path / ".env").write_text("FAKE_PRIMARY_KEY=sk-x\n", encoding="utf-8")
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "adapters.cli"]
    proc = await asyncio.create_subprocess_exec(
        *command, "--config", str(config), "chat", cwd=tmp_path, env=_env(),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(b"first\n")
    await proc.stdin.drain()
    line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
    assert line == b"Hello from the fake.\n"  # it answered and now waits for input
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
    assert b"Traceback" not in await proc.stderr.read()


_PROBE = """
import sys
from adapters.cli.main import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("lancedb", "pyarrow", "fastembed", "onnxruntime", "pypdf",
                          "telegram", "discord", "slack_bolt") if m in sys.modules)
print("loaded:", ",".join(heavy) or "none")
sys.exit(code)
"""


@pytest.mark.parametrize("command", [["providers"], ["usage", "--days", "1"]])
async def test_providers_and_usage_start_no_memory(tmp_path: Path, command: list[str]) -> None:
    """Memory is on in this config, yet these commands load neither the
    embedding model nor LanceDB, nor a platform SDK or the PDF reader
    (a fresh process, so sys.modules tells)."""
    config = write_config(tmp_path, "http://127.0.0.1:9/v1")
    config.write_text(config.read_text(encoding="utf-8").replace(
        "enabled = false", "enabled = true"), encoding="utf-8")
    env = {**_env(), "FAKE_PRIMARY_KEY": "sk-x"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PROBE, "--config", str(config), "--env-file", "", *command,
        cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines()[-1] == "loaded: none"
    assert not (tmp_path / "data" / "lancedb").exists()
