"""Streaming 50 replies at once into Telegram: our outbound scheduler vs two common loops.

    .venv/bin/python benchmarks/bench_outbound.py [--chats 50] [--deltas 40]

Every scenario streams the same replies (``--deltas`` text deltas, 50 ms
apart, i.e. a model typing for ~2 s) into ``--chats`` chats at once (half
groups, half DMs) through the real python-telegram-bot ``Bot`` and our
``TelegramSender``, against the fake Bot API (``tests/fakes/telegram_server.py``)
that enforces Telegram's limits (1/s per DM, 3 s and 20/min per group, 30/s
per bot) and answers 429 with retry_after. Only the loop differs:

    edit per delta      send, then edit on every delta; errors are dropped
    1 s throttle        edit at most once a second per message; on 429 sleep
                        retry_after and try again (what many bots do)
    Outbound            adapters/chat/outbound.py: per-chat budget shared by sends
                        and edits, bot-wide pacing, coalescing, retry_after

Reported per scenario: API calls, 429s, replies whose final text is complete,
median time to first visible text, and time until every final text landed.
Absolute times depend on the machine; the side-by-side is the point.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from telegram import Bot

from adapters.chat.outbound import DeliveryError, Outbound, RetryAfter
from adapters.chat.render import to_telegram
from adapters.platforms.telegram_sender import TelegramSender
from engine.types import Reply
from tests.fakes.telegram_server import start_telegram_fake

Loop = Callable[[TelegramSender, str, AsyncIterator[str | Reply], bool], Awaitable[None]]


async def deltas(n: int) -> AsyncIterator[str | Reply]:
    parts = [f"word{i} more " for i in range(n)]
    for part in parts:
        yield part
        await asyncio.sleep(0.05)
    yield Reply(text="".join(parts), served_by="fake", footer="_fake-model via fake_")


async def edit_per_delta(sender: TelegramSender, chat: str,
                         items: AsyncIterator[str | Reply], group: bool) -> None:
    text, mid = "", None
    async for item in items:
        text = item.full_text if isinstance(item, Reply) else text + item
        try:
            if mid is None:
                mid = await sender.send(chat, text)
            else:
                await sender.edit(chat, mid, text)
        except DeliveryError:
            pass  # dropped: the next delta will try again (the final may be lost)


async def throttled(sender: TelegramSender, chat: str,
                    items: AsyncIterator[str | Reply], group: bool) -> None:
    text, mid, last = "", None, 0.0
    async for item in items:
        final = isinstance(item, Reply)
        text = item.full_text if isinstance(item, Reply) else text + item
        if not final and time.monotonic() - last < 1.0:
            continue
        while True:
            try:
                if mid is None:
                    mid = await sender.send(chat, text)
                else:
                    await sender.edit(chat, mid, text)
                last = time.monotonic()
                break
            except RetryAfter as exc:
                await asyncio.sleep(exc.seconds)
            except DeliveryError:
                break


def outbound_loop() -> Loop:
    outbounds: dict[int, Outbound] = {}

    async def run(sender: TelegramSender, chat: str,
                  items: AsyncIterator[str | Reply], group: bool) -> None:
        outbound = outbounds.setdefault(id(sender), Outbound(sender))
        await outbound.stream(chat, items, is_group=group)

    return run


async def scenario(name: str, loop: Loop, chats: int, n: int) -> dict[str, object]:
    async with start_telegram_fake() as fake:
        bot = Bot(fake.token, base_url=f"{fake.url}/bot", base_file_url=f"{fake.url}/file/bot")
        async with bot:
            sender = TelegramSender(bot, scope="bench")
            ids = [-(5000 + i) if i % 2 else 6000 + i for i in range(chats)]
            for chat in ids:
                fake.chat_types[chat] = "group" if chat < 0 else "private"
            started = time.monotonic()
            await asyncio.gather(*[loop(sender, str(c), deltas(n), c < 0) for c in ids])
            elapsed = time.monotonic() - started
        expected = to_telegram(
            "".join(f"word{i} more " for i in range(n)) + "\n\n_fake-model via fake_")[0]
        complete = sum(1 for c in ids if (m := fake.in_chat(c)) and m[-1].text == expected)
        first = [m[0].sent_at - started for c in ids if (m := fake.in_chat(c))]
        return {"scenario": name, "calls": len(fake.calls), "429s": fake.count_429,
                "complete": f"{complete}/{chats}",
                "first visible (median)": f"{statistics.median(first):.2f} s" if first else "-",
                "all done": f"{elapsed:.1f} s"}


def table(rows: list[dict[str, object]]) -> str:
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    line = " | ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))
    out = [line, "-+-".join("-" * w for w in widths)]
    out += [" | ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths, strict=True))
            for r in rows]
    return "\n".join(out)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--deltas", type=int, default=40)
    args = parser.parse_args()
    rows = [await scenario(name, loop, args.chats, args.deltas) for name, loop in (
        ("edit per delta", edit_per_delta), ("1 s throttle", throttled),
        ("Outbound", outbound_loop()))]
    print(table(rows))


if __name__ == "__main__":
    asyncio.run(main())
