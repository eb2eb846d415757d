"""The terminal adapter: talk to one bot from a shell.

Interactive (stdin and stdout are a terminal): a ``you>`` prompt with line
editing and input history (prompt_toolkit: arrow keys move and recall, they
never reach the model as escape codes); the reply streams as it arrives,
then its footer. Ctrl-C during an answer stops that answer (back to the
prompt); Ctrl-C or Ctrl-D at the prompt leaves. Log lines (a failover, a
background warning) never land inside an answer: they are held while it
streams and written after it; at the prompt they print above it.

Scripted (stdin is a pipe or file): one message per line; each complete reply,
footer included, is written to stdout followed by a blank line; exit at end
of input, with ``NO_ANSWER`` (3) when some message got no answer (every
provider failed), else 0. Logs go to stderr, so stdout holds only replies.

Local commands, in both modes, never sent to the model: ``/help``, ``/quit``
(``/exit``), and ``/reset``, which calls the ``reset`` hook given to ``chat``
(one that starts the conversation afresh and returns what to tell the user).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TextIO

from engine.log_context import bind
from engine.memory.scope import user_key
from engine.ports import Replier
from engine.types import IncomingMessage, Reply

QUIT = {"/quit", "/exit"}
RESET = "/reset"
HELP = "/help"
NO_ANSWER = 3  # the exit code of a scripted chat in which some message got no answer
COMMANDS_HELP = ("Commands: /help this text; /reset start this conversation afresh; "
                 "/quit leave.")
KEYS_HELP = ("Keys: Up/Down recall earlier lines; Ctrl-C stops an answer; Ctrl-C or "
             "Ctrl-D at the prompt leaves.")
NO_RESET = "Sorry, /reset is not available in this chat."
# Starts the conversation afresh; returns the sentence to show.
ResetHook = Callable[[], Awaitable[str]]


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
    return IncomingMessage(platform="terminal", bot=bot, chat=chat,
                           user=user_key("terminal", user),
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
    reset: ResetHook | None = None,
) -> int:
    """Run the chat until ``/quit`` or end of input; returns the exit code.

    ``interactive`` defaults to "stdin and stdout are terminals".
    """
    src = stdin or _replacing(sys.stdin)
    out = stdout or sys.stdout
    if interactive is None:
        interactive = src.isatty() and out.isatty()
    session = _Session(conversation, bot=bot, chat_id=chat_id, user=user, out=out, reset=reset)
    if interactive:
        return await session.interactive(src)
    return await session.scripted(src)


class _Session:
    """One chat with one bot; the two modes share the local commands."""

    def __init__(self, conversation: Replier, *, bot: str, chat_id: str, user: str,
                 out: TextIO, reset: ResetHook | None) -> None:
        self.conversation = conversation
        self.bot, self.chat_id, self.user = bot, chat_id, user
        self.out = out
        self.reset = reset

    async def local(self, text: str, *, keys: bool) -> str | None:
        """The answer to a local command, or None when ``text`` is a message."""
        command = text.split(maxsplit=1)[0].lower()
        if command == HELP:
            return f"{COMMANDS_HELP}\n{KEYS_HELP}" if keys else COMMANDS_HELP
        if command == RESET:
            return await self.reset() if self.reset is not None else NO_RESET
        return None

    async def ask(self, text: str, *, stream: bool) -> Reply:
        with bind(bot=self.bot, platform="terminal", chat=self.chat_id):
            return await answer(self.conversation,
                                _message(self.bot, self.chat_id, self.user, text),
                                self.out, stream=stream)

    async def scripted(self, src: TextIO) -> int:
        code = 0
        lines = _lines(src)
        while (line := await lines.get()) is not None:
            text = line.strip()
            if not text:
                continue
            if text.lower() in QUIT:
                break
            if (said := await self.local(text, keys=False)) is not None:
                self.out.write(f"{said}\n\n")
                self.out.flush()
                continue
            reply = await self.ask(text, stream=False)
            if reply.error is not None:
                code = NO_ANSWER  # scripts can tell; the remaining lines are still answered
        return code

    async def interactive(self, src: TextIO) -> int:
        # Imported here: scripted chats and every other command start without it.
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import InMemoryHistory
        from prompt_toolkit.input import create_input
        from prompt_toolkit.output import create_output
        from prompt_toolkit.patch_stdout import patch_stdout

        out = self.out
        out.write(f"Chatting with '{self.bot}'. /help for commands; Ctrl-D to leave.\n")
        out.flush()
        prompt: PromptSession[str] = PromptSession(
            "you> ", history=InMemoryHistory(), input=create_input(src),
            output=create_output(out))
        logs = _LogRoute()
        # patch_stdout: what is written to sys.stderr while the prompt waits
        # (our log lines among it) prints above the prompt, not across it.
        with logs.installed(), patch_stdout(raw=True):
            while True:
                try:
                    line = await prompt.prompt_async()
                except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt
                    out.write("\n")
                    out.flush()
                    return 0
                text = line.strip()
                if not text:
                    continue
                if text.lower() in QUIT:
                    return 0
                if (said := await self.local(text, keys=True)) is not None:
                    out.write(f"{said}\n\n")
                    out.flush()
                    continue
                out.write(f"{self.bot}> ")
                out.flush()
                with logs.held():
                    await self._stoppable(text)

    async def _stoppable(self, text: str) -> None:
        """Stream one answer; Ctrl-C (SIGINT) stops it, not the program."""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(self.ask(text, stream=True))
        previous = signal.getsignal(signal.SIGINT)
        try:
            loop.add_signal_handler(signal.SIGINT, task.cancel)
            routed = True
        except (NotImplementedError, RuntimeError, ValueError):  # no signals here
            routed = False
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not task.cancelled() or (current is not None and current.cancelling()):
                raise  # we were cancelled ourselves (SIGTERM): not a Ctrl-C
            self.out.write("\n[stopped]\n\n")
            self.out.flush()
        finally:
            if routed:
                loop.remove_signal_handler(signal.SIGINT)
                signal.signal(signal.SIGINT, previous)  # asyncio.run's own handler


class _LogRoute:
    """Where the log handlers write while a chat is interactive.

    Installed as the stream of the root logger's stream handlers: a line is
    formatted when it is logged (its bot/chat context and redaction apply
    then), and only its writing is routed: held while an answer streams and
    written after it, else to the current ``sys.stderr`` (under
    ``patch_stdout``, above the prompt).
    """

    def __init__(self) -> None:
        self._held: list[str] | None = None

    def write(self, text: str) -> int:
        if self._held is not None:
            self._held.append(text)
        else:
            sys.stderr.write(text)
        return len(text)

    def flush(self) -> None:
        if self._held is None:
            sys.stderr.flush()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        real = (sys.stderr, sys.stdout)
        handlers = [h for h in logging.getLogger().handlers
                    if isinstance(h, logging.StreamHandler) and h.stream in real]
        previous = [h.setStream(self) for h in handlers]
        try:
            yield
        finally:
            for handler, stream in zip(handlers, previous, strict=True):
                handler.setStream(stream)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            if held:
                self.write("".join(held))
                self.flush()
