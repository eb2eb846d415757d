"""The ``boternity`` command line.

    boternity [--config PATH] [-v] chat [--bot NAME] [--chat ID] [--user NAME]
    boternity [--config PATH] providers
    boternity [--config PATH] run

``--config`` defaults to ``./boternity.toml``; when that default file does not
exist, the embedded demo configuration (``deploy/boternity.example.toml``,
shipped inside the package) is used and stderr says so. ``.env`` is read at
start. Expected errors print one message and exit non-zero: a configuration
error (file, key, problem) exits 2, a storage or start-up failure 1;
Ctrl-C exits 130. No traceback unless ``-v``.

Other command groups live in their own module exposing
``add_commands(subparsers)``; each handler is ``async def handler(args, app) -> int``
and is registered below with one line in ``COMMAND_MODULES``.
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
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from adapters.cli.providers import cmd_providers
from adapters.ops.logs import Redactor, configure_logging
from adapters.platforms import terminal
from adapters.wiring.app import App
from adapters.wiring.build import build_app
from adapters.wiring.settings import Settings, load_settings, secret_values
from engine.conversation import reset_chat
from engine.errors import BoternityError, ConfigError, StartupError

log = logging.getLogger("boternity")

DEFAULT_CONFIG = "boternity.toml"
EMBEDDED_CONFIG = "boternity.example.toml"  # package data of ``adapters.wiring``
Handler = Callable[[argparse.Namespace, App], Awaitable[int]]

# Modules that add subcommands: each exposes ``add_commands(subparsers)``.
COMMAND_MODULES: list[str] = ["adapters.cli.usage", "adapters.cli.memory",
                               "adapters.cli.people"]


async def cmd_chat(args: argparse.Namespace, app: App) -> int:
    bot = args.bot or _default_bot(app)
    if bot not in app.conversations:
        known = ", ".join(sorted(app.conversations)) or "none"
        raise ConfigError(f"{app.settings.source}: bots.{bot}: no such bot (configured: {known})")
    conversation = app.conversations[bot]

    async def reset() -> str:
        return await reset_chat(conversation.store, bot=bot, chat=args.chat, platform="terminal")

    return await terminal.chat(conversation, bot=bot, chat_id=args.chat, user=args.user,
                               reset=reset)


def _default_bot(app: App) -> str:
    if len(app.conversations) == 1:
        return next(iter(app.conversations))
    if "demo" in app.conversations:
        return "demo"
    known = ", ".join(sorted(app.conversations)) or "none"
    raise ConfigError(f"{app.settings.source}: bots: choose one with --bot (configured: {known})")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="boternity", description="Self-hosted AI bots with memory and provider fallback.")
    parser.add_argument("--config", metavar="PATH", default=None,
                        help=f"TOML configuration (default: ./{DEFAULT_CONFIG}, else the "
                             "embedded demo config)")
    parser.add_argument("--env-file", metavar="PATH", default=".env",
                        help="secrets file read at start (default: ./.env)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    chat = sub.add_parser("chat", help="talk to a bot in this terminal (reads stdin lines "
                                       "when it is not a terminal)")
    chat.add_argument("--bot", help="bot name (default: the only bot, or 'demo')")
    chat.add_argument("--chat", default="terminal", help="conversation id (default: terminal)")
    chat.add_argument("--user", default="local", help="who you are (default: local)")
    chat.set_defaults(handler=cmd_chat, quiet_logs=True)

    providers = sub.add_parser("providers", help="list providers with their breaker state")
    # needs_memory=False: no embedding model, no LanceDB (build_app(with_memory=False))
    # serve=False: no [http] server beside the running service (it asks that one)
    providers.set_defaults(handler=cmd_providers, needs_memory=False, serve=False)

    run = sub.add_parser("run", help="start every configured platform adapter")
    run.set_defaults(handler=cmd_run)

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
    if getattr(args, "quiet_logs", False) and not args.verbose:
        # In a terminal chat, info lines would interleave with the answer.
        level = max(level, logging.WARNING)
    # One root handler: text or JSON lines, bot/platform/chat/provider on every
    # line, every configured secret redacted (adapters/ops/logs.py).
    configure_logging(level=logging.getLevelName(level), json_format=settings.log.json_format,
                      secrets=secret_values(settings), stream=sys.stderr)
    for noisy in ("httpx", "httpx2", "httpcore", "openai", "alembic", "aiosqlite"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
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
        async with build_app(settings, with_memory=getattr(args, "needs_memory", True),
                             serve=getattr(args, "serve", True)) as app:
            return await handler(args, app)
    except asyncio.CancelledError:
        if terminated:
            log.info("stopped by SIGTERM")
            return 0
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    redact = Redactor()
    try:
        settings = load_config(args)
        redact = Redactor(secret_values(settings))
        _configure_logging(settings, args)
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
