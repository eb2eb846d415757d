"""``boternity memory ...`` and ``boternity shared ...``: memory admin on the command line.

``add_commands(subparsers)`` registers both groups; every handler is
``async def handler(args, app) -> int`` and only parses, calls
``app.memory_admin`` (``engine.admin.memory.MemoryAdmin``) and renders. Tables go
to stdout (``--json`` prints one JSON object per line instead, for
scripts); progress bars and problems go to stderr, so
``boternity memory export > facts.jsonl`` stays clean.

Arguments (``--importance``, ``--limit``, ``--metadata``, ...) are checked by
the parser, before anything starts. ``memory forget --user`` says how many
facts it will delete and asks (``--yes`` skips the question; without a
terminal to ask on, ``--yes`` is required). ``memory list`` says when it shows
a page of a larger set ("showing 50 of 2,648").

Exit codes: 0 done; 1 done with problems (bad import lines, tampering,
nothing found to forget); 2 the request was impossible (unknown bot, a bad
argument, a refused confirmation, ...). Every error line starts ``boternity:``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from adapters.cli.args import at_least, confirm, fraction, json_object
from adapters.cli.render import err as _err
from adapters.cli.render import out as _out
from adapters.cli.render import progress as _progress
from adapters.cli.render import table as _table
from engine.admin.memory import MemoryAdmin, fact_record
from engine.errors import AdminError, BoternityError
from engine.types import Fact

LEVELS = ("public", "trusted", "private")
EXPORT_CHUNK = 1000
Handler = Callable[[argparse.Namespace, Any], Awaitable[int]]


def _admin(app: Any) -> MemoryAdmin:
    admin = getattr(app, "memory_admin", None)
    if admin is None:
        raise AdminError("long-term memory is not enabled in this configuration")
    assert isinstance(admin, MemoryAdmin)
    return admin


def _bot(args: argparse.Namespace, app: Any) -> str:
    if args.bot:
        return str(args.bot)
    bots = list(app.settings.bots)
    if len(bots) == 1:
        return str(bots[0])
    raise AdminError(f"several bots are configured ({', '.join(bots) or 'none'}): pass --bot")


def _facts_table(facts: list[Fact], *, shared: bool = False) -> Any:
    table = _table(show_lines=False)
    table.add_column("id", no_wrap=True)
    for column in ("score", "user", "chat", "category", "text"):
        table.add_column(column, overflow="fold")
    if shared:
        table.add_column("trust")
        table.add_column("author")
    for fact in facts:
        text = fact.text + (f"  [dim](superseded by {fact.superseded_by})[/dim]"
                            if fact.superseded_by else "")
        row = [fact.id, f"{fact.score:.3f}" if fact.score else "", fact.user or "(general)",
               fact.chat or "(bot-wide)", fact.category, text]
        if shared:
            trust = f"{fact.trust_level}" + (f":{fact.trust_group}" if fact.trust_group else "")
            when = fact.created_at.strftime("%Y-%m-%d %H:%M") if fact.created_at else ""
            row += [trust, f"{fact.author_name or fact.author_bot} {when}".strip()]
        table.add_row(*row)
    return table


def _print_facts(args: argparse.Namespace, facts: list[Fact], *, shared: bool = False) -> None:
    if args.json:
        for fact in facts:
            record = fact_record(fact)
            record["score"] = round(fact.score, 4)
            if shared:
                record.update(trust_level=fact.trust_level, trust_group=fact.trust_group,
                              author_bot=fact.author_bot, author_name=fact.author_name)
            print(json.dumps(record, ensure_ascii=False))
        return
    if not facts:
        _err().print("no memories")
        return
    _out().print(_facts_table(facts, shared=shared))


# --- memory ---

async def memory_list(args: argparse.Namespace, app: Any) -> int:
    admin, bot = _admin(app), _bot(args, app)
    facts = await admin.list_facts(bot, user=args.user, history=args.history, limit=args.limit,
                                   offset=args.offset)
    _print_facts(args, facts)
    if len(facts) == args.limit or args.offset:  # a page of a larger set, maybe: say so
        total = await admin.count(bot, user=args.user, history=args.history)
        if args.offset or total > len(facts):
            first = args.offset + 1 if facts else args.offset
            _err().print(f"showing {first:,}-{args.offset + len(facts):,} of {total:,} "
                         "(--limit, --offset for more)", markup=False)
    return 0


async def memory_search(args: argparse.Namespace, app: Any) -> int:
    facts = await _admin(app).search(_bot(args, app), args.query, user=args.user,
                                     limit=args.limit)
    _print_facts(args, facts)
    return 0


async def memory_add(args: argparse.Namespace, app: Any) -> int:
    fact = await _admin(app).add(
        _bot(args, app), args.text, user=args.user or "", category=args.category,
        importance=args.importance, metadata=args.metadata,
    )
    print(fact.id)
    return 0


async def memory_forget(args: argparse.Namespace, app: Any) -> int:
    admin, bot = _admin(app), _bot(args, app)
    if (args.id is None) == (args.user is None):
        raise AdminError("pass a memory id or --user (one of them)")
    if args.user is not None:
        if not args.user:
            raise AdminError("name a user to forget (general facts are forgotten one by one)")
        planned = await admin.count(bot, user=args.user, history=True)
        if planned == 0:
            _err().print(f"no memories about {args.user} in {bot}", markup=False)
            return 1
        if not args.yes:
            question = f"forget {planned:,} memories about {args.user} in {bot}? [y/N] "
            if not await asyncio.to_thread(confirm, question):
                _err().print("nothing forgotten", markup=False)
                return 2
        count = await admin.forget_user(bot, args.user)
        _err().print(f"forgot {count} memories about {args.user}", markup=False)
        return 0 if count else 1
    if await admin.forget(bot, args.id):
        _err().print(f"forgot {args.id}")
        return 0
    _err().print(f"no memory {args.id}")
    return 1


async def memory_promote(args: argparse.Namespace, app: Any) -> int:
    if await _admin(app).promote(_bot(args, app), args.id):
        _err().print(f"{args.id} is now bot-wide")
        return 0
    _err().print(f"no memory {args.id}")
    return 1


async def memory_why(args: argparse.Namespace, app: Any) -> int:
    record = await _admin(app).why(_bot(args, app), args.chat)
    if record is None:
        _err().print("no reply with recall recorded for that chat yet")
        return 1
    if args.json:
        print(json.dumps({
            "bot": record.bot, "chat": record.chat, "message_id": record.message_id,
            "query": record.query,
            "created_at": record.created_at.isoformat() if record.created_at else None,
            "facts": [vars(f) for f in record.facts],
        }, ensure_ascii=False))
        return 0
    when = record.created_at.strftime("%Y-%m-%d %H:%M:%S %Z") if record.created_at else "?"
    out = _out()
    out.print(f"chat {record.chat}, message {record.message_id or '?'} at {when}")
    out.print(f"query: {record.query}", markup=False)
    if not record.facts:
        out.print("nothing was recalled (no memory above the similarity floor)")
        return 0
    table = _table()
    for column in ("score", "source", "id", "user", "text"):
        table.add_column(column, overflow="fold", no_wrap=column == "id")
    for fact in record.facts:
        source = fact.source + (f" ({fact.author_bot})" if fact.author_bot else "")
        table.add_row(f"{fact.score:.3f}", source, fact.id, fact.user or "(general)", fact.text)
    out.print(table)
    return 0


def _read_lines(path: str) -> list[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminError(f"{path}: cannot read: {exc}") from None


async def memory_import(args: argparse.Namespace, app: Any) -> int:
    bot = _bot(args, app)
    lines = await asyncio.to_thread(_read_lines, args.file)
    with _progress(f"importing into {bot}") as advance:
        report = await _admin(app).import_lines(bot, lines, progress=advance)
    err = _err()
    for number, problem in report.errors:
        err.print(f"{args.file}:{number}: skipped: {problem}", markup=False)
    err.print(f"imported {report.added}, already present {report.skipped}, "
              f"bad lines {len(report.errors)}")
    return 1 if report.errors else 0


async def memory_export(args: argparse.Namespace, app: Any) -> int:
    admin, bot = _admin(app), _bot(args, app)
    # The CLI is the only thing on this loop, but file I/O still goes to a
    # thread, in chunks, so a large export never holds every line at once.
    target: TextIO = (
        await asyncio.to_thread(open, args.output, "w", encoding="utf-8")
        if args.output else sys.stdout
    )
    count = 0
    chunk: list[str] = []
    try:
        async for line in admin.export_lines(bot):
            chunk.append(line + "\n")
            count += 1
            if len(chunk) >= EXPORT_CHUNK:
                await asyncio.to_thread(target.writelines, chunk)
                chunk = []
        await asyncio.to_thread(target.writelines, chunk)
    finally:
        if target is not sys.stdout:
            await asyncio.to_thread(target.close)
        else:
            target.flush()
    _err().print(f"exported {count} memories of {bot}")
    return 0


async def memory_reembed(args: argparse.Namespace, app: Any) -> int:
    bots = args.bot or list(app.settings.bots)
    with _progress("re-embedding") as advance:
        done = await _admin(app).reembed(bots, shared=not args.no_shared, progress=advance)
    for table, rows in done.items():
        _err().print(f"{table}: {rows} rows re-embedded")
    return 0


# --- shared ---

async def shared_list(args: argparse.Namespace, app: Any) -> int:
    facts = await _admin(app).shared_list(_bot(args, app), user=args.user, limit=args.limit,
                                          offset=args.offset)
    _print_facts(args, facts, shared=True)
    return 0


async def shared_publish(args: argparse.Namespace, app: Any) -> int:
    fact = await _admin(app).publish(_bot(args, app), args.id, level=args.level,
                                     group=args.group or "")
    _err().print(f"published as {fact.trust_level}"
                 + (f" in group {fact.trust_group}" if fact.trust_group else ""))
    print(fact.id)
    return 0


async def shared_verify(args: argparse.Namespace, app: Any) -> int:
    report = await _admin(app).verify()
    out = _out()
    if report.ok:
        out.print(f"shared memory intact: {report.checked} rows checked")
        return 0
    out.print(f"TAMPERING DETECTED ({report.checked} rows checked)")
    for fact_id in report.tampered:
        out.print(f"  edited outside the API: {fact_id}")
    for where in report.missing:
        out.print(f"  rows deleted outside the API: {where}")
    return 1


# --- registration ---

def _guarded(handler: Handler) -> Handler:
    """Report an impossible request (unknown bot, missing fact, storage error) as exit 2."""

    @functools.wraps(handler)
    async def run(args: argparse.Namespace, app: Any) -> int:
        try:
            return await handler(args, app)
        except (BoternityError, ValueError) as exc:
            _err().print(f"boternity: {exc}", markup=False)
            return 2

    return run


def _common(parser: argparse.ArgumentParser, *, json_out: bool = False) -> None:
    parser.add_argument("--bot", help="bot id (default: the only configured bot)")
    if json_out:
        parser.add_argument("--json", action="store_true", help="one JSON object per line")


def add_commands(subparsers: Any) -> None:
    """Register ``memory`` and ``shared`` on the CLI's subparsers."""
    memory = subparsers.add_parser("memory", help="inspect and manage a bot's memories")
    # No provider, chain nor conversation: these read and write the stores only.
    memory.set_defaults(needs_bots=False)
    sub = memory.add_subparsers(dest="memory_command", required=True)

    p = sub.add_parser("list", help="list memories, newest first")
    _common(p, json_out=True)
    p.add_argument("--user", help="only facts about this user (platform:id; '' = general)")
    p.add_argument("--history", action="store_true", help="include superseded facts")
    p.add_argument("--limit", type=at_least(1), default=50)
    p.add_argument("--offset", type=at_least(0), default=0)
    p.set_defaults(handler=_guarded(memory_list))

    p = sub.add_parser("search", help="memories nearest to a query, with scores")
    _common(p, json_out=True)
    p.add_argument("query")
    p.add_argument("--user", help="that user's (platform:id) and general facts "
                   "(default: every user)")
    p.add_argument("--limit", type=at_least(1), default=10)
    p.set_defaults(handler=_guarded(memory_search))

    p = sub.add_parser("add", help="add one memory; prints its id")
    _common(p)
    p.add_argument("text")
    p.add_argument("--user", default="", help="whom it is about (platform:id; default general)")
    p.add_argument("--category", default="general")
    p.add_argument("--importance", type=fraction, default=0.5, help="0 to 1 (default: 0.5)")
    p.add_argument("--metadata", type=json_object, help="a JSON object kept with the fact")
    p.set_defaults(handler=_guarded(memory_add))

    p = sub.add_parser("forget", help="delete one memory, or every memory about a user")
    _common(p)
    p.add_argument("id", nargs="?")
    p.add_argument("--user", help="forget everything about this user (platform:id)")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.set_defaults(handler=_guarded(memory_forget))

    p = sub.add_parser("promote", help="make a learned memory bot-wide (every chat)")
    _common(p)
    p.add_argument("id")
    p.set_defaults(handler=_guarded(memory_promote))

    p = sub.add_parser("why", help="which memories the last reply in a chat recalled")
    _common(p, json_out=True)
    p.add_argument("--chat", help="chat id (default: the bot's most recent reply)")
    p.set_defaults(handler=_guarded(memory_why))

    p = sub.add_parser("import", help="import JSON Lines (one fact per line)")
    _common(p)
    p.add_argument("file", help="a .jsonl file, or - for stdin")
    p.set_defaults(handler=_guarded(memory_import))

    p = sub.add_parser("export", help="export every memory (history included) as JSON Lines")
    _common(p)
    p.add_argument("--output", "-o", help="file to write (default: stdout)")
    p.set_defaults(handler=_guarded(memory_export))

    p = sub.add_parser("reembed", help="re-embed memories with the current model")
    p.add_argument("--bot", action="append", help="bot id (repeat; default: every bot)")
    p.add_argument("--no-shared", action="store_true", help="leave the shared table alone")
    p.set_defaults(handler=_guarded(memory_reembed))

    shared = subparsers.add_parser("shared", help="memories shared between bots")
    shared.set_defaults(needs_bots=False)
    sub = shared.add_subparsers(dest="shared_command", required=True)

    p = sub.add_parser("list", help="shared memories a bot may read")
    _common(p, json_out=True)
    p.add_argument("--user")
    p.add_argument("--limit", type=at_least(1), default=50)
    p.add_argument("--offset", type=at_least(0), default=0)
    p.set_defaults(handler=_guarded(shared_list))

    p = sub.add_parser("publish", help="share one of a bot's memories")
    _common(p)
    p.add_argument("id")
    p.add_argument("--level", choices=LEVELS, help="default: the bot's trust_level")
    p.add_argument("--group", help="trust group (for --level trusted)")
    p.set_defaults(handler=_guarded(shared_publish))

    p = sub.add_parser("verify", help="check the shared memory's hash chain")
    p.set_defaults(handler=_guarded(shared_verify))

