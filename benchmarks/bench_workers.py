"""Throughput of 1 vs 3 workers on this machine, measured in one run.

    .venv/bin/python benchmarks/bench_workers.py [--messages 60] [--rounds 3] [--latency 0.5]

Real ``boternity run`` worker processes (Telegram in webhook mode) on the
real PostgreSQL and Redis, behind this script playing Telegram and the load
balancer: it delivers ``--messages`` updates, each in its own private chat,
spread round-robin over the workers, and times from the first delivery until
every chat shows its complete answer (no streaming cursor). The fake model
answers after ``--latency`` seconds, streamed in three chunks.

A 1-worker and a 3-worker cluster (a fresh database and Redis namespace
each) run side by side on the same fakes; the bursts alternate between them
(``--rounds`` each) and the medians are compared: "ratio" is the 3-worker
throughput over the 1-worker one. What bounds
it: 2 cores shared by the workers, this script and PostgreSQL, and the bot's
Telegram-wide pace (~28 sends+edits per second for one bot, shared by every
worker through Redis). The /metrics output of the first worker of the
3-worker cluster is written to benchmarks/results/bench_workers_metrics.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import Cluster, drop_database, fresh_database
from tests.fakes.openai_server import Text, start_openai_fake
from tests.fakes.telegram_server import FakeTelegram, start_telegram_fake

RESULTS = Path(__file__).resolve().parent / "results"
ANSWER = ("Answer", " for", " you.")


def _done(tg: FakeTelegram, chat: int) -> bool:
    shown = tg.in_chat(chat)
    return bool(shown) and "Answer for you." in shown[-1].text and "▌" not in shown[-1].text


def _total(metrics: str, name: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(metrics)
               for s in f.samples if s.name == name)


async def burst(cluster: Cluster, n: int, tg: FakeTelegram, base_chat: int) -> float:
    """Deliver ``n`` messages round-robin; replies per second until all are shown."""
    chats = [base_chat + i for i in range(n)]
    updates = [tg.make_update(chat, f"question {i}") for i, chat in enumerate(chats)]
    started = time.perf_counter()
    statuses = await asyncio.gather(*(
        cluster.post_update(i % cluster.size, u) for i, u in enumerate(updates)))
    assert set(statuses) == {200}, statuses
    await tg.wait_for(lambda: all(_done(tg, c) for c in chats), limit_s=600)
    elapsed = time.perf_counter() - started
    for chat in chats:  # answered exactly once
        assert len(tg.in_chat(chat)) == 1, (chat, [m.history for m in tg.in_chat(chat)])
    return n / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.5, help="model answer time (s)")
    args = parser.parse_args()
    gap = args.latency / (len(ANSWER) - 1)
    results: dict[int, list[float]] = {1: [], 3: []}
    async with start_openai_fake(default=Text(ANSWER, gap_s=gap)) as fake, \
            start_telegram_fake() as tg:
        with tempfile.TemporaryDirectory() as tmp:
            (url1, db1), (url3, db3) = await fresh_database(), await fresh_database()
            try:
                # Both clusters stay up; the rounds alternate, so a busy machine's
                # background load hits both sizes alike. Idle workers cost ~nothing.
                async with Cluster(1, Path(tmp) / "one", fake.base_url, tg.url, url1,
                                   platform="telegram", telegram_token=tg.token,
                                   footer="never") as one, \
                        Cluster(3, Path(tmp) / "three", fake.base_url, tg.url, url3,
                                platform="telegram", telegram_token=tg.token,
                                footer="never") as three:
                    for r in range(args.rounds):
                        for cluster in (one, three):
                            base = 100_000 * (r + 1) + 10_000 * cluster.size
                            results[cluster.size].append(
                                await burst(cluster, args.messages, tg, base))
                    metrics = [await three.metrics(w) for w in range(3)]
            finally:
                await drop_database(db1)
                await drop_database(db3)
    one_s, three_s = statistics.median(results[1]), statistics.median(results[3])
    per_worker = [_total(m, "boternity_replies_total") for m in metrics]
    print(f"{args.messages} messages per burst, {args.rounds} rounds (alternating), model "
          f"latency {args.latency:.2f} s; Telegram saw {len(tg.calls_of('sendMessage'))} "
          f"sends, {len(tg.calls_of('editMessageText'))} edits, {tg.count_429} 429s")
    print(f"{'workers':>8} {'replies/s (median)':>19}   rounds")
    for size, value in ((1, one_s), (3, three_s)):
        rounds = ", ".join(f"{v:.1f}" for v in results[size])
        print(f"{size:>8} {value:>19.2f}   {rounds}")
    print(f"ratio 3/1: {three_s / one_s:.2f}  (replies per worker in the 3-worker cluster: "
          f"{', '.join(f'{r:.0f}' for r in per_worker)})")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_workers_metrics.txt"
    out.write_text(metrics[0], encoding="utf-8")
    print(f"/metrics of worker 0 of the 3-worker cluster: {out}")


if __name__ == "__main__":
    asyncio.run(main())
