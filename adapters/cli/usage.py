"""``boternity usage [--bot B] [--days N]``: tokens and cost per bot, provider and day.

Prints ``engine.usage.usage_report`` (the same text the ``/usage`` admin
command shows): one line per UTC day, bot and provider with replies, tokens
in and out (``~`` = estimated, the provider reported none) and cost in USD
at the configured ``price_*_per_mtok``, then the total.
Exit codes: 0 printed; 2 unknown bot or a bad ``--days``.
"""

from __future__ import annotations

import argparse
from typing import Any

from adapters.cli.args import at_least

MAX_DAYS = 366


async def cmd_usage(args: argparse.Namespace, app: Any) -> int:
    # Imported here: every command builds this parser, `usage` alone reports.
    from engine.usage import usage_report

    # An unknown --bot was refused before start-up (adapters/cli/main.py).
    print(await usage_report(app.usage.store, bot=args.bot, days=args.days))
    return 0


def add_commands(subparsers: Any) -> None:
    usage = subparsers.add_parser(
        "usage", help="tokens and cost per bot, provider and day")
    usage.add_argument("--bot", help="only this bot (default: every bot)")
    # Checked by the parser: a bad value is reported before anything starts.
    usage.add_argument("--days", type=at_least(1, MAX_DAYS), default=7,
                       help="how many days back, today included (default: 7)")
    # stdout is the report; it reads SQL only (no embedding model, no LanceDB)
    usage.set_defaults(handler=cmd_usage, needs_memory=False, needs_bots=False)
