"""Does an operator watching the console slow the bots' replies? One run, side by side.

    .venv/bin/python benchmarks/bench_console.py [--rounds 12] [--burst 20]

One process runs the real app (SQLite, the openai SDK against the fake on
127.0.0.1, the fallback chain with the usage observer, the admin API and
console on the ``[http]`` server), as ``boternity run`` does. Each round
sends a burst of concurrent replies (5 deltas each, 10 ms apart, like a
model typing) and times each reply. Rounds alternate, in random order:

    quiet      no console traffic
    console    meanwhile a client in another process (as a browser is),
               fetches the console pages (overview, providers, usage,
               conversations) and the API (providers, overview, replies),
               logged in as an operator, at ``--rate`` requests per second
               (default 10: several operators with the providers page
               refreshing itself every 5 s; ``--rate 0`` = back to back, a flood)

The ratio of the medians (console / quiet) is the answer; 1.0 is "not
measurably slower". Absolute numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from tests.console_service import TOKEN, Service, console_service  # noqa: E402
from tests.fakes.openai_server import Text, start_openai_fake  # noqa: E402

PAGES = ("/", "/providers", "/usage", "/conversations?bot=demo")
API = ("/api/v1/providers", "/api/v1/overview", "/api/v1/replies?limit=200")


async def console_load(url: str, rate: float, limit_s: float = 120) -> None:
    """``--load URL``: an operator's browser, in its own process; prints "ready"
    once logged in, then fetches until stdin closes (or ``limit_s`` passes),
    then prints how many pages it got."""
    served = 0
    closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.post(f"{url}/login", data={"token": TOKEN}) as r:
            assert r.status == 200
        print("ready", flush=True)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        deadline = time.monotonic() + limit_s
        while not closed.done() and time.monotonic() < deadline:
            for path in PAGES + API:
                async with http.get(url + path, headers=auth) as r:
                    await r.read()
                    assert r.status == 200, (path, r.status)
                served += 1
                if rate > 0:
                    await asyncio.sleep(1 / rate)
    print(served, flush=True)


async def start_load(url: str, rate: float) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--load", url, "--rate", str(rate),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    assert (await proc.stdout.readline()).strip() == b"ready"
    return proc


async def stop_load(proc: asyncio.subprocess.Process) -> int:
    out, _ = await proc.communicate(b"")  # stdin closes: the operator stops
    return int(out.split()[-1])


async def burst(service: Service, n: int, round_no: int) -> list[float]:
    async def one(i: int) -> float:
        started = time.perf_counter()
        await service.say(f"question {i}", chat=f"r{round_no}-{i}", user=str(i))
        return time.perf_counter() - started

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def main(rounds: int, size: int, rate: float) -> None:
    logging.disable(logging.WARNING)
    async with start_openai_fake(Text(("One", " two", " three", " four", " five."),
                                      gap_s=0.01)) as fake:
        with tempfile.TemporaryDirectory() as tmp:
            async with console_service(Path(tmp), fake) as service:
                await burst(service, size, -1)  # warm-up
                times: dict[str, list[float]] = {"quiet": [], "console": []}
                pages = 0
                order = ["quiet", "console"] * rounds
                random.shuffle(order)
                for round_no, kind in enumerate(order):
                    load = await start_load(service.url, rate) if kind == "console" else None
                    times[kind] += await burst(service, size, round_no)
                    if load is not None:
                        pages += await stop_load(load)
    print(f"{rounds} rounds each, bursts of {size} concurrent replies; console load "
          f"{'back to back' if rate <= 0 else f'{rate:g}/s'}: {pages} pages/API calls served")
    for kind, values in times.items():
        q = statistics.quantiles(values, n=4)
        print(f"  {kind:<8} reply latency  p25 {q[0] * 1000:7.1f} ms  median "
              f"{q[1] * 1000:7.1f} ms  p75 {q[2] * 1000:7.1f} ms  (n={len(values)})")
    ratio = statistics.median(times["console"]) / statistics.median(times["quiet"])
    print(f"  ratio of medians, console / quiet: {ratio:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        asyncio.run(console_load(args.load, args.rate))
    else:
        asyncio.run(main(args.rounds, args.burst, args.rate))
