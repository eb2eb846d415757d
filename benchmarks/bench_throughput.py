"""Replies per second of one process, with the production wiring.

    .venv/bin/python benchmarks/bench_throughput.py [--replies 400] [--concurrency 1 8 32]
        [--db sqlite postgresql] [--modes floor off on] [--rounds 3] [--before PATH]
        [--profile DIR]

A zero-latency provider (the fake OpenAI server) runs in another process. For
each database and concurrency C, C chats each send messages one after the
other, through ``build_app`` (SQLite or PostgreSQL, usage accounting, the
recall log, memory), and the script reports replies/s, reply latency p50/p95
and the event loop's lag p99 (a 5 ms ticker's overshoot):

    floor        the bare ``openai`` SDK streaming from the same fake
    floor-aio    (``--modes floor-aio``) the same on the SDK's aiohttp transport
                 (``DefaultAioHttpClient``), which the providers use
    memory off   build_app, no long-term memory
    memory on    build_app, recall over 2,000 facts (extraction off: the
                 fake provider does not write facts)
    path         (``--modes path``) the reply path alone: ``Conversation`` with
                 an in-process chain that answers at once, the database and
                 the usage row, no SDK, no memory

"cpu ms" is the CPU time of the event loop's thread per reply, "all cpu"
that of every thread of the process (workers, LanceDB's, onnxruntime's),
"srv cpu" the fake provider's (Linux /proc), and "cpu r/s" the replies/s
those two allow on this machine's cores: a closed loop of C chats cannot
beat it, so their mean latency is at least C / "cpu r/s" (Little's law).

``--before PATH`` runs the same scenarios on another checkout's code (e.g.
``git worktree add /tmp/before <commit>``) in the same run, so before and
after are side by side (``--rounds N``: N runs of each, alternating which
goes first, medians printed, with the load average). Each scenario runs in
its own process; ``--profile DIR`` writes a cProfile of each.
Each chat's messages are unique per (chat, turn), so a cache of query
embeddings cannot make recall look cheaper than it is. PostgreSQL
needs a server on 127.0.0.1:5432 (user postgres; a database is created and
dropped). Absolute numbers depend on the machine; compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FACTS = 2000
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _ticker(lags: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        planned = loop.time() + 0.005
        await asyncio.sleep(0.005)
        lags.append(max(0.0, loop.time() - planned))


async def _drive(send: Any, concurrency: int, replies: int) -> dict[str, float]:
    latencies: list[float] = []
    lags: list[float] = []
    stop = asyncio.Event()
    per_chat = max(1, replies // concurrency)

    async def chat(n: int) -> None:
        for i in range(per_chat):
            started = time.perf_counter()
            await send(n, i)
            latencies.append(time.perf_counter() - started)

    ticker = asyncio.create_task(_ticker(lags, stop))
    started, cpu, every = time.perf_counter(), time.thread_time(), time.process_time()
    await asyncio.gather(*(chat(n) for n in range(concurrency)))
    elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu
    every = time.process_time() - every
    stop.set()
    await ticker
    return {"replies_s": len(latencies) / elapsed, "p50_ms": _pct(latencies, 0.5) * 1000,
            "p95_ms": _pct(latencies, 0.95) * 1000, "lag_p99_ms": _pct(lags, 0.99) * 1000,
            # CPU of the event loop's thread per reply (the ticker's share included)
            "cpu_ms": cpu / max(1, len(latencies)) * 1000,
            # CPU of every thread of this process (loop, workers, LanceDB's and
            # onnxruntime's own threads) per reply: what bounds replies/s
            "all_cpu_ms": every / max(1, len(latencies)) * 1000}


async def _floor(base_url: str, concurrency: int, replies: int,
                 aio: bool = False) -> dict[str, float]:
    from openai import AsyncOpenAI, DefaultAioHttpClient

    http = DefaultAioHttpClient() if aio else None
    async with AsyncOpenAI(base_url=base_url, api_key="sk-bench", http_client=http) as client:
        async def send(n: int, i: int) -> None:
            stream = await client.chat.completions.create(
                model="m", stream=True, messages=[{"role": "user", "content": f"q{n}-{i}"}])
            async for _ in stream:
                pass

        await send(0, 0)  # warm the connection pool
        return await _drive(send, concurrency, replies)


async def _path(concurrency: int, replies: int, db_url: str | None) -> dict[str, float]:
    """The reply path alone: an in-process chain that answers at once, the real
    database, history and usage row, no SDK and no memory."""
    from engine.conversation import Conversation
    from engine.types import Capabilities, Chunk, Usage
    from engine.usage import UsageAccounting
    from persistence.sql.conversations import SqlConversationStore
    from persistence.sql.database import Database
    from persistence.sql.usage import SqlUsageStore

    class Run:
        served_by, model, failures, looped = "fast", "m", (), False
        usage, text = Usage(20, 4), "The answer is 42."

        async def __aiter__(self) -> Any:
            for text in ("The", " answer", " is", " 42."):
                await asyncio.sleep(0)
                yield Chunk(text=text)
            yield Chunk(usage=self.usage)

    class Chain:
        capabilities, providers = Capabilities(), ()

        def run(self, request: Any, *, skip: Any = None) -> Run:
            return Run()

    with tempfile.TemporaryDirectory() as tmp:
        async with Database(db_url or f"sqlite+aiosqlite:///{tmp}/b.db") as db:
            conversation = Conversation(
                bot="b", persona="You help.", chain=Chain(), store=SqlConversationStore(db),
                observers=[UsageAccounting(SqlUsageStore(db), prices={})])

            send = _sender(conversation)
            for n in range(concurrency):  # some history in every chat
                for i in range(10):
                    await send(n, -1 - i)
            return await _drive(send, concurrency, replies)


def _sender(conversation: Any) -> Any:
    """``send(n, i)``: chat n's i-th message, as the Telegram adapter keys it, answered."""
    from engine.types import IncomingMessage, Reply

    async def send(n: int, i: int) -> None:
        # Unique per (chat, i): a query-embedding cache cannot flatter recall.
        message = IncomingMessage(platform="telegram", bot="b", chat=str(1000 + n),
                                  user=f"telegram:{n}", text=_question(n, i),
                                  message_id=f"{n}-{i}")
        async for item in conversation.reply(message):
            if isinstance(item, Reply) and item.error:
                raise RuntimeError(item.error)

    return send


def _config(data: Path, base_url: str, db_url: str | None, memory: bool) -> Path:
    path = data / "boternity.toml"
    db = f'database_url = "{db_url}"\n' if db_url else ""
    path.write_text(
        f'[storage]\ndata_dir = "{data}"\n{db}\n'
        f'[providers.fast]\nkind = "openai_compatible"\nmodel = "m"\nbase_url = "{base_url}"\n\n'
        f'[bots.b]\nchain = ["fast"]\n\n'
        f'[bots.b.memory]\nenabled = {"true" if memory else "false"}\nextract = false\n'
        f'min_score = 0.0\n')
    return path


async def _app(base_url: str, concurrency: int, replies: int, memory: bool,
               db_url: str | None) -> dict[str, float]:
    import logging

    from adapters.wiring.build import build_app
    from adapters.wiring.settings import load_settings

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(_config(Path(tmp), base_url, db_url, memory), environ={},
                                 dotenv=None)
        async with build_app(settings) as app:
            if memory:
                await _seed(app, concurrency)
            send = _sender(app.conversations["b"])
            await send(0, -1)
            return await _drive(send, concurrency, replies)


def _question(chat: int, i: int) -> str:
    return f"chat {chat}, turn {i}: what do you know about topic {(chat * 7919 + i) % FACTS}?"


async def _seed(app: Any, users: int) -> None:
    from engine.admin.memory import ImportedFact

    store = app.memory_admin.store
    facts = [ImportedFact(text=f"User {n % max(users, 1)} mentioned topic {n}: item {n * 7}",
                          user=f"telegram:{n % max(users, 1)}").to_fact("b")
             for n in range(FACTS)]
    await store.add_many(facts)
    # A settled table, as between two learned facts: indexes built, and (where the
    # code has one) the recall cache loaded, so the run measures recall, not maintenance.
    await store.maintain("b")
    try:
        await store.warm("b")
    except AttributeError:  # an older checkout (--before) has no recall cache
        pass


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, args.root)
    args.concurrency = args.concurrency[0]
    if args.mode in ("floor", "floor-aio"):
        run = _floor(args.base_url, args.concurrency, args.replies, args.mode == "floor-aio")
    elif args.mode == "path":
        run = _path(args.concurrency, args.replies, args.db_url)
    else:
        run = _app(args.base_url, args.concurrency, args.replies, args.mode == "on", args.db_url)
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        result = profiler.runcall(asyncio.run, run)
        profiler.dump_stats(args.profile)
    else:
        result = asyncio.run(run)
    print(json.dumps(result))


def _fake_server() -> tuple[subprocess.Popen[str], str]:
    sys.path.insert(0, str(ROOT))  # this script runs from benchmarks/
    from tests.fakes.openai_server import spawn_openai_fake

    return spawn_openai_fake(("The", " answer", " is", " 42."), (20, 4))


def _pg_database() -> tuple[str, str]:
    import asyncpg

    name = f"boternity_bench_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        admin = await asyncpg.connect(PG_ADMIN)
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.close()

    asyncio.run(create())
    return name, f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


def _drop(name: str) -> None:
    import asyncpg

    async def drop() -> None:
        admin = await asyncpg.connect(PG_ADMIN)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

    asyncio.run(drop())


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU of process ``pid`` so far (Linux ``/proc``; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run(args: argparse.Namespace, base_url: str, db: str, mode: str, concurrency: int,
         label: str, root: str, round_: int, server: int) -> dict[str, float]:
    """One scenario in a fresh child process (and, on PostgreSQL, a fresh database).

    ``server`` is the fake provider's pid: its CPU per reply is added to the result.
    """
    server_before = _cpu_seconds(server)
    name, db_url = _pg_database() if db == "postgresql" else ("", "")
    prof = f"{db}-{mode}-c{concurrency}-{label}-{round_}.prof"
    profile = ["--profile", str(Path(args.profile).resolve() / prof)] if args.profile else []
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--mode", mode, "--root", root,
             "--base-url", base_url, "--concurrency", str(concurrency),
             "--replies", str(args.replies)]
            + (["--db-url", db_url] if db_url else []) + profile,
            capture_output=True, text=True, check=False, cwd=tempfile.gettempdir())
    finally:
        if name:
            _drop(name)
    if out.returncode != 0:
        sys.exit(f"{db} {mode} C={concurrency} {label} failed:\n{out.stderr}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    server_after = _cpu_seconds(server)
    if server_before is not None and server_after is not None:
        # The warm-up reply is counted too: one in hundreds.
        result["server_cpu_ms"] = (server_after - server_before) / args.replies * 1000
    return result


def _cpu_columns(r: dict[str, float]) -> str:
    """all cpu, srv cpu and the replies/s those costs allow on this machine's cores
    ("cpu r/s": cores / CPU per reply; a database server's own CPU is not counted)."""
    every, server = r.get("all_cpu_ms"), r.get("server_cpu_ms")
    if every is None:  # an older checkout (--before) does not measure it
        return f"{'-':>8}{'-':>8}{'-':>8}"
    total = every + (server or 0.0)
    bound = (os.cpu_count() or 1) * 1000 / total if total else 0.0
    return f"{every:>8.2f}{server if server is not None else 0.0:>8.2f}{bound:>8.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=400)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--db", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--modes", nargs="+", default=["floor", "off", "on"])
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs per row, before and after alternating; medians are printed")
    parser.add_argument("--before", help="another checkout to run side by side")
    parser.add_argument("--profile", metavar="DIR",
                        help="write a cProfile of each run's child to DIR (view with pstats)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--db-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    roots = [("after", str(ROOT))] + ([("before", args.before)] if args.before else [])
    server, base_url = _fake_server()
    # The load average is printed per row: the machine may be shared.
    print(f"{'db':<11}{'mode':<10}{'C':>3}  {'code':<7}{'replies/s':>10}{'p50 ms':>9}"
          f"{'p95 ms':>9}{'lag p99':>9}{'cpu ms':>8}{'all cpu':>8}{'srv cpu':>8}"
          f"{'cpu r/s':>8}{'load':>6}")
    try:
        for db in args.db:
            for mode in args.modes:
                if mode.startswith("floor") and db != args.db[0]:
                    continue  # the floor has no database
                for concurrency in args.concurrency:
                    runs: dict[str, list[dict[str, float]]] = {label: [] for label, _ in roots}
                    for round_ in range(args.rounds):
                        # Alternate which code goes first, so neither always runs warmer.
                        for label, root in roots[::1 if round_ % 2 == 0 else -1]:
                            runs[label].append(_run(args, base_url, db, mode, concurrency,
                                                    label, root, round_, server.pid))
                    for label, _ in roots:
                        r = {k: statistics.median(run[k] for run in runs[label])
                             for k in runs[label][0]}
                        shown = "-" if mode.startswith("floor") else db
                        print(f"{shown:<11}{mode:<10}{concurrency:>3}  "
                              f"{label:<7}{r['replies_s']:>10.1f}{r['p50_ms']:>9.1f}"
                              f"{r['p95_ms']:>9.1f}{r['lag_p99_ms']:>9.1f}"
                              f"{r.get('cpu_ms', 0.0):>8.2f}{_cpu_columns(r)}"
                              f"{os.getloadavg()[0]:>6.1f}", flush=True)
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
