"""The ``boternity`` command line.

    boternity [--config PATH] [-v] chat [--bot NAME] [--chat ID] [--user NAME]
    boternity [--config PATH] providers
    boternity [--config PATH] run
    boternity --version

The global options (``--config``, ``--env-file``, ``-v``) are accepted before
or after the command (``boternity providers -v``). ``--config`` defaults to
``./boternity.toml``; when that default file does not exist, the embedded demo
configuration (``deploy/boternity.example.toml``, shipped inside the package)
is used and stderr says so. ``./.env`` is read at start when it exists; an
``--env-file`` that does not exist is an error. Expected errors print one line
``boternity: ...`` and exit non-zero: a configuration error or a bad argument
exits 2, a storage or start-up failure 1; Ctrl-C exits 130. No traceback and
no INFO log lines (``run`` excepted) unless ``-v``.

Start-up pays only for what the command uses: arguments and the bot name are
checked before anything starts, the heavy modules are imported when a
command needs them (in a worker thread once the loop runs), memory opens
on first use and provider SDKs are imported at the first request
(``build_app(lazy=True)``), ``providers`` opens no database at all, and
only ``run`` starts the ``[http]`` server and the platform adapters.
``chat`` loads what its first reply needs (the provider SDK, and the
embedding model and LanceDB when there are memories to recall) in worker
threads while it waits for the first line (``adapters.wiring.build.warm_up``);
a local model that answers first starts loading, in its own process, as
soon as the providers are built (``build_app(chat_bot=...)``).

Other command groups live in their own module exposing
``add_commands(subparsers)``; each handler is ``async def handler(args, app) -> int``
and is registered below with one line in ``COMMAND_MODULES``. A subcommand may
``set_defaults(needs_memory=False)`` (no memory at all), ``needs_bots=False``
(no provider, chain nor conversation: admin commands reading the stores),
``quiet_logs=False`` (INFO lines on stderr) and ``needs_app=False`` (the
handler gets the ``Settings`` instead of an ``App`` and starts what it needs).

Shell completion (argcomplete): ``eval "$(register-python-argcomplete boternity)"``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.resources
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.cli.providers import cmd_providers
from adapters.ops.logs import Redactor, configure_logging
from adapters.wiring.settings import Settings, load_settings, secret_values
from engine.conversation import reset_chat
from engine.errors import BoternityError, ConfigError, StartupError
from engine.ports import Replier
from engine.types import IncomingMessage, Reply

if TYPE_CHECKING:
    from adapters.wiring.app import App

log = logging.getLogger("boternity")

DEFAULT_CONFIG = "boternity.toml"
DEFAULT_ENV_FILE = ".env"
EMBEDDED_CONFIG = "boternity.example.toml"  # package data of ``adapters.wiring``
Handler = Callable[[argparse.Namespace, "App"], Awaitable[int]]

# Modules that add subcommands: each exposes ``add_commands(subparsers)``.
COMMAND_MODULES: list[str] = ["adapters.cli.usage", "adapters.cli.memory",
                               "adapters.cli.people"]


async def cmd_chat(args: argparse.Namespace, app: App) -> int:
    from adapters.platforms import terminal
    from adapters.wiring.build import warm_up

    bot = args.bot or _default_bot(app.settings)
    if bot not in app.conversations:
        known = ", ".join(sorted(app.conversations)) or "none"
        raise ConfigError(f"{app.settings.source}: bots.{bot}: no such bot (configured: {known})")
    conversation = app.conversations[bot]

    async def reset() -> str:
        return await reset_chat(conversation.store, bot=bot, chat=args.chat, platform="terminal")

    # The loads run while the prompt waits for the first line; a load that
    # fails is retried by the reply that needs it, which reports it as usual.
    warming = asyncio.create_task(warm_up(app, bot), name="warm-up")
    try:
        return await terminal.chat(AfterWarmUp(conversation, warming), bot=bot,
                                   chat_id=args.chat, user=args.user, reset=reset)
    finally:
        # Not cancelled: a load in a worker thread would go on regardless, and
        # what it opens (the local model's server) must be there to be closed.
        await asyncio.wait([warming])
        if not warming.cancelled() and (failed := warming.exception()) is not None:
            log.debug("warm-up failed (a reply that needed it said so): %r", failed)


class AfterWarmUp:
    """A bot's replies, each started once ``warming`` has ended (however it ended)."""

    def __init__(self, conversation: Replier, warming: asyncio.Task[None]) -> None:
        self._conversation = conversation
        self._warming = warming

    async def reply(self, message: IncomingMessage) -> AsyncIterator[str | Reply]:
        await asyncio.wait([self._warming])  # neither raises its error nor cancels it
        async for item in self._conversation.reply(message):
            yield item


def _default_bot(settings: Settings) -> str:
    if len(settings.bots) == 1:
        return next(iter(settings.bots))
    if "demo" in settings.bots:
        return "demo"
    known = ", ".join(sorted(settings.bots)) or "none"
    raise ConfigError(f"{settings.source}: bots: choose one with --bot (configured: {known})")


async def cmd_run(args: argparse.Namespace, app: App) -> int:
    # Imported here: only `run` loads the platform SDKs (`chat` starts faster without).
    from adapters.wiring.people import background_runners
    from adapters.wiring.platforms import platform_runners

    runners = platform_runners(app)
    if not runners:
        print("boternity run: no platform adapters configured (add [bots.NAME.telegram], "
              "[bots.NAME.slack] or [bots.NAME.discord]); use 'boternity chat' for the "
              "terminal.", file=sys.stderr)
        return 0
    runners += background_runners(app)  # the retention purge, when a bot sets one
    print("running: " + ", ".join(label for label, _ in runners), file=sys.stderr)
    try:
        async with asyncio.TaskGroup() as group:
            for label, runner in runners:
                group.create_task(_named(label, runner), name=label)
    except* BoternityError as failed:
        # A platform refused its token, say: the clear message, not a task-group traceback.
        raise failed.exceptions[0] from None
    return 0


async def _named(label: str, runner: Callable[[], Awaitable[None]]) -> None:
    """Run one platform; an unexpected error becomes one line naming it (``-v``: the cause)."""
    try:
        await runner()
    except BoternityError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise StartupError(f"{label} stopped: {type(exc).__name__}: {first}; check the "
                           "network and its settings (api_base_url, ports), or run with -v "
                           "for details") from exc


class Parser(argparse.ArgumentParser):
    """An argument parser whose every (sub)command accepts the global options.

    Subparsers are built with the parser's own class, so command modules get
    the options without doing anything. On a subcommand the defaults are
    SUPPRESS: ``--config X providers`` keeps X, ``providers --config X`` sets it.
    """

    def __init__(self, *args: Any, top: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)

        def default(value: object) -> object:
            return value if top else argparse.SUPPRESS

        self.add_argument("--config", metavar="PATH", default=default(None),
                          help=f"TOML configuration (default: ./{DEFAULT_CONFIG}, else the "
                               "embedded demo config)")
        self.add_argument("--env-file", metavar="PATH", default=default(None),
                          help=f"secrets file read at start (default: ./{DEFAULT_ENV_FILE} "
                               "when it exists; '' for none)")
        self.add_argument("-v", "--verbose", action="store_true", default=default(False),
                          help="info and debug logs, tracebacks")

    def error(self, message: str) -> Any:  # one prefix for every error line
        self.print_usage(sys.stderr)
        command = self.prog.removeprefix("boternity").strip()  # "memory add", or none
        self.exit(2, f"boternity: {command + ': ' if command else ''}{message}\n")


def _version() -> str:
    try:
        return version("boternity")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="boternity", top=True,
                    description="Self-hosted AI bots with memory and provider fallback.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    chat = sub.add_parser("chat", help="talk to a bot in this terminal (reads stdin lines "
                                       "when it is not a terminal)")
    chat.add_argument("--bot", help="bot name (default: the only bot, or 'demo')")
    chat.add_argument("--chat", default="terminal", help="conversation id (default: terminal)")
    chat.add_argument("--user", default="local", help="who you are (default: local)")
    # talks=True: build_app starts loading the bot's local model (if it comes first) at once
    chat.set_defaults(handler=cmd_chat, talks=True)

    providers = sub.add_parser("providers", help="list providers with their breaker state")
    # needs_app=False: no database, memory nor provider SDK; no [http] server
    # beside the running service (it asks that one)
    providers.set_defaults(handler=cmd_providers, needs_app=False)

    run = sub.add_parser("run", help="start every configured platform adapter")
    run.set_defaults(handler=cmd_run, quiet_logs=False, serve=True)

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(sub)
    return parser


@contextlib.contextmanager
def _embedded_config() -> Iterator[Path]:
    resource = importlib.resources.files("adapters.wiring").joinpath(EMBEDDED_CONFIG)
    with importlib.resources.as_file(resource) as path:
        yield path


def load_config(args: argparse.Namespace) -> Settings:
    """The settings from ``--config``, ``./boternity.toml`` or the embedded demo."""
    dotenv = args.env_file
    if dotenv is None:
        dotenv = DEFAULT_ENV_FILE  # optional: read when it exists
    elif dotenv == "":
        dotenv = None  # --env-file '': read none
    elif not Path(dotenv).exists():
        raise ConfigError(f"{dotenv}: --env-file: file not found")
    if args.config is not None:
        return load_settings(args.config, dotenv=dotenv)
    if Path(DEFAULT_CONFIG).is_file():
        return load_settings(DEFAULT_CONFIG, dotenv=dotenv)
    print(f"boternity: no ./{DEFAULT_CONFIG}; using the embedded demo config "
          "(copy deploy/boternity.example.toml to start your own)", file=sys.stderr)
    with _embedded_config() as path:
        settings = load_settings(path, dotenv=dotenv)
    return settings.model_copy(update={"source": "<embedded demo config>"})


def _configure_logging(settings: Settings, args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else getattr(logging, settings.log.level)
    if getattr(args, "quiet_logs", True) and not args.verbose:
        # A one-shot command prints its answer; in a terminal chat, info lines
        # would interleave with it. Only `run` (a service) logs at INFO.
        level = max(level, logging.WARNING)
    # One root handler: text or JSON lines, bot/platform/chat/provider on every
    # line, every configured secret redacted (adapters/ops/logs.py).
    configure_logging(level=logging.getLevelName(level), json_format=settings.log.json_format,
                      secrets=secret_values(settings), stream=sys.stderr)
    for noisy in ("httpx", "httpx2", "httpcore", "openai", "alembic", "aiosqlite"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _check_bots(args: argparse.Namespace, settings: Settings) -> None:
    """An unknown ``--bot`` is reported before anything starts."""
    names = getattr(args, "bot", None)
    for name in [names] if isinstance(names, str) else names or []:
        if name not in settings.bots:
            known = ", ".join(sorted(settings.bots)) or "none"
            raise ConfigError(f"{settings.source}: bots.{name}: no such bot (configured: {known})")


def _quiet_lancedb(args: argparse.Namespace) -> None:
    # LanceDB's Rust core logs straight to stderr (env_logger), outside our log
    # handler. It reads the variable once, at import: set it before. Its errors
    # still reach us as exceptions; `run` and -v keep its default (errors).
    if not args.verbose and getattr(args, "quiet_logs", True):
        os.environ.setdefault("LANCEDB_LOG", "off")


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
    if not getattr(args, "needs_app", True):
        return int(await args.handler(args, settings))  # it starts what it needs
    from adapters.wiring.build import build_app  # after the arguments were checked

    handler: Handler = args.handler
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert main_task is not None
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        main_task.cancel()

    # SIGTERM (docker stop, systemd) cancels the work; resources close in order
    # on the way out, and the exit is a clean 0: the stop was asked for.
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        # A command that never replies may set needs_memory=False (see build_parser).
        serve = getattr(args, "serve", False)  # only `run` serves [http] and platforms
        chat_bot = (args.bot or _default_bot(settings)) if getattr(args, "talks", False) else None
        async with build_app(settings, with_memory=getattr(args, "needs_memory", True),
                             with_bots=getattr(args, "needs_bots", True),
                             lazy=not serve, serve=serve, chat_bot=chat_bot) as app:
            return await handler(args, app)
    except asyncio.CancelledError:
        if terminated:
            log.info("stopped by SIGTERM")
            return 0
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # a shell asks for completions (see the docstring)
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    redact = Redactor()
    try:
        settings = load_config(args)
        redact = Redactor(secret_values(settings))
        _check_bots(args, settings)
        _configure_logging(settings, args)
        _quiet_lancedb(args)
        # Before the loop runs, not on it: the wiring the command starts from.
        importlib.import_module("adapters.wiring.build" if getattr(args, "needs_app", True)
                                else "adapters.wiring.providers")
        return asyncio.run(_serve(args, settings))
    except ConfigError as exc:
        return _fail(args, exc, 2, redact)
    except BoternityError as exc:
        return _fail(args, exc, 1, redact)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    except BrokenPipeError:
        # The reader went away (`boternity chat < questions | head -3`): not
        # an error. Point stdout at /dev/null so the exit flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _fail(args: Any, exc: BaseException, code: int, redact: Redactor) -> int:
    if getattr(args, "verbose", False):
        log.exception("failed")
    # A library's text may hold a URL with a token in it: redact like the log.
    print(redact(f"boternity: {exc}"), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
