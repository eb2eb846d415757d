"""``boternity chat`` for real: a pseudo-terminal for the interactive chat, a pipe
for the scripted one, the fake OpenAI server as the provider.

Interactive tests drive ``python -m adapters.cli chat`` through pexpect (a
real pty, so prompt_toolkit, SIGINT on Ctrl-C and the terminal's line
discipline are the real ones) and wait for expected output with generous
timeouts; nothing is timed.
"""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from adapters.platforms.terminal import COMMANDS_HELP, NO_ANSWER
from engine.conversation import RESET_DONE
from tests.fakes.openai_server import Drop, FakeOpenAI, Hang, Status, Text
from tests.test_cli import _env, run_cli, write_config

WAIT_S = 60  # generous: a busy machine starts Python slowly
PROMPT = "you>"  # prompt_toolkit draws the space as a cursor move
UP, LEFT, CTRL_C, CTRL_D = "\x1b[A", "\x1b[D", "\x03", "\x04"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


def _plain(text: str) -> str:
    """Terminal output without escape sequences or carriage returns."""
    return _ANSI.sub("", text)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[list[pexpect.spawn]]:
    children: list[pexpect.spawn] = []
    yield children
    for child in children:
        if child.isalive():
            child.terminate(force=True)


async def _start(spawned: list[pexpect.spawn], config: Path, cwd: Path) -> pexpect.spawn:
    env = _env()
    env["FAKE_PRIMARY_KEY"] = "sk-x"
    env["TERM"] = "xterm"
    # A pty that never answers prompt_toolkit's cursor-position query would
    # make it wait and warn; real terminals answer it.
    env["PROMPT_TOOLKIT_NO_CPR"] = "1"
    child = pexpect.spawn(
        sys.executable, ["-m", "adapters.cli", "--config", str(config), "chat"],
        cwd=str(cwd), env=env, encoding="utf-8", timeout=WAIT_S, dimensions=(40, 200))
    child.logfile_read = io.StringIO()  # the whole screen, for assertions on order
    spawned.append(child)
    await child.expect_exact("/help for commands", async_=True)
    await child.expect_exact(PROMPT, async_=True)
    return child


async def _exits(child: pexpect.spawn) -> int:
    await child.expect(pexpect.EOF, async_=True)
    child.close()
    assert child.exitstatus is not None, child.signalstatus
    return int(child.exitstatus)


async def test_arrow_keys_edit_the_line_and_recall_history(
    openai_fake: FakeOpenAI, tmp_path: Path, spawn: list[pexpect.spawn]
) -> None:
    child = await _start(spawn, write_config(tmp_path, openai_fake.base_url), tmp_path)
    # "helo", cursor one left, "l": the line is "hello".
    child.send("helo" + LEFT + "l\r")
    await child.expect_exact("Hello from the fake.", async_=True)
    await child.expect_exact(PROMPT, async_=True)
    child.send(UP + "\r")  # the previous line again
    await child.expect_exact("Hello from the fake.", async_=True)
    await child.expect_exact(PROMPT, async_=True)
    child.send(CTRL_D)
    assert await _exits(child) == 0
    sent = [r.messages[-1]["content"] for r in openai_fake.requests]
    assert sent == ["hello", "hello"]  # no escape code ever reached the model


async def test_ctrl_c_stops_the_answer_and_a_second_one_leaves(
    openai_fake: FakeOpenAI, tmp_path: Path, spawn: list[pexpect.spawn]
) -> None:
    openai_fake.script(Hang(after=1, chunks=["A long answer that", " never ends"]),
                       model="primary-model")
    child = await _start(spawn, write_config(tmp_path, openai_fake.base_url), tmp_path)
    child.send("tell me everything\r")
    await child.expect_exact("A long answer that", async_=True)
    child.send(CTRL_C)
    await child.expect_exact("[stopped]", async_=True)
    await child.expect_exact(PROMPT, async_=True)
    child.send("still there?\r")  # the program goes on
    await child.expect_exact("Hello from the fake.", async_=True)
    await child.expect_exact(PROMPT, async_=True)
    child.send(CTRL_C)
    assert await _exits(child) == 0
    assert "Traceback" not in child.logfile_read.getvalue()
    assert [r.messages[-1]["content"] for r in openai_fake.requests] == [
        "tell me everything", "still there?"]


async def test_log_lines_never_land_inside_a_streamed_answer(
    openai_fake: FakeOpenAI, tmp_path: Path, spawn: list[pexpect.spawn]
) -> None:
    # The primary drops mid-answer: the chain logs a failover warning while
    # the backup continues the same answer.
    openai_fake.script(Drop(after=1, chunks=["The answer", " lost"]), model="primary-model")
    openai_fake.script(Text([" continues", " here."]), model="backup-model")
    child = await _start(spawn, write_config(tmp_path, openai_fake.base_url), tmp_path)
    child.send("go\r")
    await child.expect_exact("failing over to backup", async_=True)
    await child.expect_exact(PROMPT, async_=True)
    child.send("/quit\r")
    assert await _exits(child) == 0
    screen = _plain(child.logfile_read.getvalue())
    # The answer is one unbroken run of text, then its footer, then the log line.
    answer = screen.index("helper> The answer continues here.")
    footer = screen.index("-- served by backup", answer)
    warning = screen.index("failing over to backup")
    assert answer < footer < warning, screen


async def test_help_and_quit_are_local_in_the_terminal(
    openai_fake: FakeOpenAI, tmp_path: Path, spawn: list[pexpect.spawn]
) -> None:
    child = await _start(spawn, write_config(tmp_path, openai_fake.base_url), tmp_path)
    child.send("/help\r")
    await child.expect_exact("Ctrl-C stops an answer", async_=True)
    await child.expect_exact(PROMPT, async_=True)
    child.send("/quit\r")
    assert await _exits(child) == 0
    assert openai_fake.count == 0


async def test_piped_commands_are_local_and_quit_stops_reading(
    openai_fake: FakeOpenAI, tmp_path: Path
) -> None:
    config = write_config(tmp_path, openai_fake.base_url)
    (tmp_path / ".env").write_text("FAKE_PRIMARY_KEY=sk-x\n", encoding="utf-8")
    code, out, err = await run_cli(
        ["--config", str(config), "chat"], "/help\nhello\n/reset\nagain\n/quit\nnever sent\n",
        tmp_path)
    assert code == 0, err
    assert out.split("\n\n") == [COMMANDS_HELP, "Hello from the fake.", RESET_DONE,
                                   "Hello from the fake.", ""]
    assert [r.messages[-1]["content"] for r in openai_fake.requests] == ["hello", "again"]
    # After /reset the earlier turn is no longer sent.
    assert "hello" not in json.dumps(openai_fake.requests[1].messages)


async def test_piped_chat_exits_non_zero_when_a_message_got_no_answer(
    openai_fake: FakeOpenAI, tmp_path: Path
) -> None:
    config = write_config(tmp_path, openai_fake.base_url)
    (tmp_path / ".env").write_text("FAKE_PRIMARY_KEY=sk-x\n", encoding="utf-8")
    # The first message: every provider fails. The second is answered.
    openai_fake.script(Status(503), model="primary-model")
    openai_fake.script(Status(503), model="backup-model")
    code, out, err = await run_cli(["--config", str(config), "chat"],
                                   "first\nsecond\n", tmp_path)
    assert code == NO_ANSWER != 0, err
    replies = out.split("\n\n")
    assert replies[0].startswith("Sorry, I can't answer right now")
    assert "Hello from the fake." in replies  # the rest of the input was still answered
