"""The terminal adapter: talk to one bot from a shell.

Interactive (stdin is a terminal): a ``you>`` prompt, the reply streams as it
arrives, then its footer; ``/quit`` or end of input (Ctrl-D) leaves.
Scripted (stdin is a pipe or file): one message per line; each complete reply,
footer included, is written to stdout followed by a blank line; exit at end
of input. Logs go to stderr, so stdout holds only replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
import threading
from typing import TextIO

from engine.log_context import bind
from engine.ports import Replier
from engine.types import IncomingMessage, Reply

QUIT = {"/quit", "/exit"}


def _lines(stream: TextIO) -> asyncio.Queue[str | None]:
    """Lines of ``stream`` as they arrive; None at end of input.

    Reading blocks, so a daemon thread does it: not the event loop, and not
    the default executor either, whose shutdown would wait for a read that
    only ends when the user presses Enter (Ctrl-C must exit at once).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def pump() -> None:
        try:
            for line in iter(stream.readline, ""):
                loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\r\n"))
        except (OSError, ValueError, RuntimeError):
            pass  # stdin closed under us, or the loop is gone: end of input
        finally:
            with contextlib.suppress(RuntimeError):  # the loop may be gone at exit
                loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=pump, name="console-stdin", daemon=True).start()
    return queue


def _replacing(stream: TextIO) -> TextIO:
    """``stream`` decoding bad bytes as U+FFFD: a stray Latin-1 byte in a piped
    file must not end the input (every later line would be lost)."""
    if isinstance(stream, io.TextIOWrapper):
        stream.reconfigure(errors="replace")
    return stream


def _message(bot: str, chat: str, user: str, text: str) -> IncomingMessage:
    return IncomingMessage(platform="terminal", bot=bot, chat=chat, user=user,
                           user_name=user, text=text)


async def answer(conversation: Replier, message: IncomingMessage, out: TextIO,
                 *, stream: bool) -> Reply:
    """Write one reply to ``out``: deltas as they come when ``stream``, then the footer."""
    final: Reply | None = None
    streamed = False
    async for item in conversation.reply(message):
        if isinstance(item, Reply):
            final = item
        elif stream:
            out.write(item)
            out.flush()
            streamed = True
    assert final is not None, "Conversation.reply must end with a Reply"
    if not streamed:
        # Scripted mode, or nothing streamed (an error explanation): the whole text.
        out.write(final.text)
    if final.footer:
        out.write(f"\n\n{final.footer}")
    out.write("\n\n")
    out.flush()
    return final


async def chat(
    conversation: Replier,
    *,
    bot: str,
    chat_id: str = "terminal",
    user: str = "local",
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    interactive: bool | None = None,
) -> int:
    """Run the chat loop until end of input; returns the exit code (0)."""
    src = stdin or _replacing(sys.stdin)
    out = stdout or sys.stdout
    if interactive is None:
        interactive = src.isatty()
    if interactive:
        out.write(f"Chatting with '{bot}'. /quit or Ctrl-D to leave.\n")
    lines = _lines(src)
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = await lines.get()
        if line is None:
            if interactive:
                out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if interactive and text in QUIT:
            return 0
        if interactive:
            out.write(f"{bot}> ")
            out.flush()
        with bind(bot=bot, platform="terminal", chat=chat_id):
            await answer(conversation, _message(bot, chat_id, user, text), out,
                         stream=interactive)
