"""``boternity user ...``, ``boternity purge`` and ``boternity bot delete``.

    boternity user show   PLATFORM:ID [--bot B]    what we hold about a person (counts)
    boternity user export PLATFORM:ID [--bot B] [-o FILE]   all of it, as JSON
    boternity user forget PLATFORM:ID [--bot B] [--yes]     delete all of it
    boternity purge [--dry-run]                    apply history_days / memory_days now
    boternity bot delete NAME [--yes]              drop a bot's memories, history, files

``PLATFORM:ID`` is the stored key exactly (``telegram:42``, ``slack:U123``,
``discord:1234``). Without ``--bot`` every configured bot is looked at.
``forget`` and ``bot delete`` ask to type the person's key or the bot's
name unless ``--yes`` is given. Handlers only parse, call
``adapters.wiring.people`` (``engine.admin.people`` / ``retention``) and
render. Exit codes: 0 done; 1 not confirmed; 2 impossible (unknown bot,
a malformed key, storage trouble).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from engine.errors import BoternityError

Handler = Callable[[argparse.Namespace, Any], Awaitable[int]]


def _bots(args: argparse.Namespace) -> list[str] | None:
    return [args.bot] if args.bot else None


async def _confirmed(args: argparse.Namespace, what: str, expected: str) -> bool:
    if args.yes:
        return True
    print(f"This deletes {what} for good. Type {expected!r} to confirm: ",
          end="", file=sys.stderr, flush=True)
    answer = await asyncio.to_thread(sys.stdin.readline)
    if answer.strip() == expected:
        return True
    print("not confirmed: nothing deleted", file=sys.stderr)
    return False


async def user_show(args: argparse.Namespace, app: Any) -> int:
    from adapters.wiring.people import people  # after the arguments were checked

    held = await people(app).show(args.user, _bots(args))
    print(f"{args.user}: {held.describe()}")
    return 0


async def user_export(args: argparse.Namespace, app: Any) -> int:
    from adapters.wiring.people import people

    data = await people(app).export(args.user, _bots(args))
    text = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
    if args.output:
        await asyncio.to_thread(Path(args.output).write_text, text, encoding="utf-8")
        print(f"exported {args.user} to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


async def user_forget(args: argparse.Namespace, app: Any) -> int:
    from adapters.wiring.people import people

    admin = people(app)
    held = await admin.show(args.user, _bots(args))
    print(f"{args.user}: {held.describe()}", file=sys.stderr)
    if not await _confirmed(args, f"everything held about {args.user}", args.user):
        return 1
    done = await admin.forget(args.user, _bots(args), actor="cli")
    shared = "" if done.shared is not None else " (shared memory not touched)"
    print(f"forgot {args.user}: {done.describe()}{shared}")
    return 0


async def purge(args: argparse.Namespace, app: Any) -> int:
    from adapters.wiring.people import retention

    keeper = retention(app)
    done = await keeper.purge(dry_run=args.dry_run)
    if not done:
        print("no bot sets history_days or memory_days: nothing to purge", file=sys.stderr)
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for bot, counts in done.items():
        print(f"{bot}: {verb} " + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())))
    return 0


async def bot_delete(args: argparse.Namespace, app: Any) -> int:
    if not await _confirmed(args, f"bot {args.name}'s memories, history and files", args.name):
        return 1
    from adapters.wiring.people import retention

    counts = await retention(app).delete_bot(args.name)
    print(f"deleted bot {args.name}: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    if args.name in app.settings.bots:
        print(f"bots.{args.name} is still in {app.settings.source}: it starts afresh on the "
              "next run; remove it there to retire the bot", file=sys.stderr)
    return 0


def _guarded(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def run(args: argparse.Namespace, app: Any) -> int:
        try:
            return await handler(args, app)
        except BoternityError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def add_commands(subparsers: Any) -> None:
    """Register ``user``, ``purge`` and ``bot`` on the CLI's subparsers."""
    user = subparsers.add_parser("user", help="what we hold about one person: show, export, "
                                              "forget")
    sub = user.add_subparsers(dest="user_command", required=True)
    for name, handler, text in (
        ("show", user_show, "count what is held about a person"),
        ("export", user_export, "everything held about a person, as JSON"),
        ("forget", user_forget, "delete everything held about a person"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("user", metavar="PLATFORM:ID", help="the stored key, e.g. telegram:42")
        p.add_argument("--bot", help="only this bot (default: every configured bot)")
        if name == "export":
            p.add_argument("--output", "-o", help="file to write (default: stdout)")
        if name == "forget":
            p.add_argument("--yes", action="store_true", help="do not ask to confirm")
        p.set_defaults(handler=_guarded(handler), quiet_logs=True)

    p = subparsers.add_parser("purge", help="delete what is older than history_days / "
                                            "memory_days now")
    p.add_argument("--dry-run", action="store_true", help="only count what would go")
    p.set_defaults(handler=_guarded(purge), quiet_logs=True)

    bot = subparsers.add_parser("bot", help="manage a bot's stored data")
    sub = bot.add_subparsers(dest="bot_command", required=True)
    p = sub.add_parser("delete", help="drop a bot's memory table, history and files; its "
                                      "shared facts stay, orphaned")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="do not ask to confirm")
    p.set_defaults(handler=_guarded(bot_delete), quiet_logs=True)
