"""Start-up as an operator meets it: the ``boternity`` process, its exit code and
its stderr. A failure prints one line naming what failed and what to do, no
traceback without ``-v``; database URLs in the form hosts hand out work.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


async def boternity(config: Path, *args: str, env: dict[str, str] | None = None,
                    limit_s: float = 90) -> tuple[int, str]:
    """Run ``python -m adapters.cli --config CONFIG ARGS``; (exit code, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "adapters.cli", "--config", str(config), "--env-file", "",
        *args, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), limit_s)
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace")


def _config(tmp_path: Path, extra: str, *, storage: str = "") -> Path:
    path = tmp_path / "boternity.toml"
    path.write_text(f"""
[storage]
data_dir = "{tmp_path / 'data'}"
{storage}

[providers.primary]
kind = "openai_compatible"
base_url = "http://127.0.0.1:9/v1"
model = "primary-model"

[bots.helper]
chain = ["primary"]
memory = {{ enabled = false }}
{extra}
""", encoding="utf-8")
    return path


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- 8. start-up failures: one line, exit 1, no traceback ---

async def test_telegram_unreachable_is_one_line_and_exit_1(tmp_path: Path) -> None:
    config = _config(tmp_path, f"""
[bots.helper.telegram]
token_env = "TEST_TG_TOKEN"
api_base_url = "http://127.0.0.1:{_closed_port()}/bot"
""")
    code, err = await boternity(config, "run", env={"TEST_TG_TOKEN": "123456:" + "A" * 35})
    assert code == 1, err
    assert "Traceback" not in err and "ExceptionGroup" not in err and "+-" not in err, err
    failure = [line for line in err.splitlines() if line.startswith("boternity:")]
    assert len(failure) == 1, err
    assert "bots.helper.telegram" in failure[0] and "cannot reach" in failure[0]
    assert "api_base_url" in failure[0]  # what to do: check the network or the URL
    assert "A" * 35 not in err  # the token never printed


async def test_http_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        config = _config(tmp_path, f"\n[http]\nenabled = true\nport = {port}\n")
        code, err = await boternity(config, "run")  # one-shot commands serve no [http]
    assert code == 1, err
    assert "Traceback" not in err, err
    failure = [line for line in err.splitlines() if line.startswith("boternity:")]
    assert len(failure) == 1, err
    assert f"[http] port {port}" in failure[0] and "in use" in failure[0]


async def test_verbose_still_shows_the_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = _config(tmp_path, f"\n[http]\nenabled = true\nport = "
                                   f"{taken.getsockname()[1]}\n")
        code, err = await boternity(config, "-v", "run")
    assert code == 1 and "Traceback" in err


# --- 9. database URLs as hosts hand them out ---

@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
async def test_postgres_url_as_hosts_hand_it_out_is_accepted(
    tmp_path: Path, postgres_url: str, scheme: str
) -> None:
    url = postgres_url.replace("postgresql+asyncpg://", f"{scheme}://")
    config = _config(tmp_path, "", storage=f'database_url = "{url}"')
    code, err = await boternity(config, "providers")
    assert code == 0, err
    assert not (tmp_path / "data" / "boternity.db").exists()  # it used PostgreSQL


@pytest.mark.parametrize(("url", "hint"), [
    ("mysql://root@127.0.0.1/db", "postgresql+asyncpg://"),
    ("postgresql+psycopg2://u@127.0.0.1/db", "postgresql+asyncpg://"),
])
async def test_an_unsupported_database_url_names_the_fix_and_exits_2(
    tmp_path: Path, url: str, hint: str
) -> None:
    config = _config(tmp_path, "", storage=f'database_url = "{url}"')
    code, err = await boternity(config, "providers")
    assert code == 2, err
    assert "storage.database_url" in err and hint in err and "Traceback" not in err


async def test_a_platform_failing_otherwise_is_named_in_one_line(tmp_path: Path) -> None:
    # Slack over HTTP on a port already taken: an OSError from inside slack-bolt's server.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        config = _config(tmp_path, f"""
[bots.helper.slack]
bot_token_env = "TEST_SLACK_BOT"
signing_secret_env = "TEST_SLACK_SIGNING"
mode = "http"
http_port = {port}
api_base_url = "http://127.0.0.1:{_closed_port()}/api/"
""")
        code, err = await boternity(config, "run", env={
            "TEST_SLACK_BOT": "xoxb-" + "1" * 20, "TEST_SLACK_SIGNING": "s" * 32})
    assert code == 1, err
    assert "Traceback" not in err and "ExceptionGroup" not in err, err
    failure = [line for line in err.splitlines() if line.startswith("boternity:")]
    assert len(failure) == 1 and "helper/slack" in failure[0], err
    assert "1" * 20 not in err
