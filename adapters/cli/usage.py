"""``boternity usage [--bot B] [--days N]``: tokens and cost per bot, provider and day.

Prints ``engine.usage.usage_report`` (the same text the ``/usage`` admin
command shows): one line per UTC day, bot and provider with replies, tokens
in and out (``~`` = estimated, the provider reported none) and cost in USD
at the configured ``price_*_per_mtok``, then the total.
Exit codes: 0 printed; 2 unknown bot or a bad ``--days``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from engine.usage import usage_report

MAX_DAYS = 366


async def cmd_usage(args: argparse.Namespace, app: Any) -> int:
    if args.bot is not None and args.bot not in app.settings.bots:
        known = ", ".join(sorted(app.settings.bots)) or "none"
        print(f"boternity usage: no bot '{args.bot}' (configured: {known})", file=sys.stderr)
        return 2
    if not 1 <= args.days <= MAX_DAYS:
        print(f"boternity usage: --days must be 1 to {MAX_DAYS}", file=sys.stderr)
        return 2
    print(await usage_report(app.usage.store, bot=args.bot, days=args.days))
    return 0


def add_commands(subparsers: Any) -> None:
    usage = subparsers.add_parser(
        "usage", help="tokens and cost per bot, provider and day")
    usage.add_argument("--bot", help="only this bot (default: every bot)")
    usage.add_argument("--days", type=int, default=7,
                       help="how many days back, today included (default: 7)")
    # stdout is the report; it reads SQL only (no embedding model, no LanceDB)
    usage.set_defaults(handler=cmd_usage, quiet_logs=True, needs_memory=False)
