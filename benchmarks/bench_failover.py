"""What a failover costs: time to a complete short answer, side by side, in one run.

    .venv/bin/python benchmarks/bench_failover.py [--runs 50]

Every row streams the same short answer from the same fake OpenAI server on
127.0.0.1 through the real ``openai`` SDK; only the path differs:

    bare SDK            AsyncOpenAI streaming directly (reference, no Boternity)
    backup alone        a chain with only the backup provider
    primary refused     primary's port refuses connections, backup answers
    primary 500         primary answers HTTP 500, backup answers
    breaker open        primary's breaker is open (no request), backup answers

"added" is the median minus the "backup alone" median; "ratio" is median /
"backup alone". Medians of --runs runs after a warm-up, the scenarios interleaved round-robin;
absolute numbers depend on the machine, the ratios are the point.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openai import AsyncOpenAI

from engine.providers.fallback import Breakers, FallbackChain
from engine.providers.openai_compat import OpenAICompatProvider
from engine.types import CompletionRequest, Message
from tests.fakes.openai_server import FakeOpenAI, Status, Text, start_openai_fake

REQUEST = CompletionRequest((Message("user", "What is the answer?"),))
ANSWER = Text(["The answer", " is", " forty-two."])


def _refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # closed: connecting is refused


async def _interleaved(
    scenarios: list[tuple[str, Callable[[], Awaitable[None]]]], runs: int
) -> list[tuple[str, float, float]]:
    """Round-robin over the scenarios so machine noise hits every row alike."""
    times: dict[str, list[float]] = {label: [] for label, _ in scenarios}
    for _, fn in scenarios:
        await fn()  # warm-up: connection pools, imports
    for _ in range(runs):
        for label, fn in scenarios:
            start = time.perf_counter()
            await fn()
            times[label].append(time.perf_counter() - start)
    rows = []
    for label, values in times.items():
        values.sort()
        p90 = values[max(0, int(len(values) * 0.9) - 1)]
        rows.append((label, statistics.median(values) * 1000, p90 * 1000))
    return rows


async def _bench(fake: FakeOpenAI, runs: int) -> list[tuple[str, float, float]]:
    def provider(name: str, model: str, url: str) -> OpenAICompatProvider:
        return OpenAICompatProvider(name=name, model=model, base_url=url, timeout_s=5)

    backup = provider("backup", "b", fake.base_url)
    refused = provider("primary", "a", _refused_url())
    failing = provider("primary", "a", fake.base_url)
    fake.default = ANSWER
    sdk = AsyncOpenAI(base_url=fake.base_url, api_key="sk-bench", max_retries=0)

    async def bare() -> None:
        stream = await sdk.chat.completions.create(
            model="b", messages=[{"role": "user", "content": "What is the answer?"}],
            stream=True, stream_options={"include_usage": True})
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "The answer is forty-two."

    async def through(chain: FallbackChain, served_by: str = "backup") -> None:
        run = chain.run(REQUEST)
        text = "".join([c.text async for c in run])
        assert text == "The answer is forty-two." and run.served_by == served_by

    never_trips = Breakers(fail_max=10**9)  # keep the refused primary in play every run
    open_breakers = Breakers(fail_max=1, reset_timeout_s=3600)
    open_breakers.get("primary").open()

    async def failing_500() -> None:
        fake.script(Status(500), model="a")
        await through(FallbackChain([failing, backup], never_trips))

    scenarios: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("bare SDK", bare),
        ("backup alone", lambda: through(FallbackChain([backup], Breakers()))),
        ("primary refused", lambda: through(FallbackChain([refused, backup], never_trips))),
        ("primary 500", failing_500),
        ("breaker open", lambda: through(FallbackChain([refused, backup], open_breakers))),
    ]
    rows = await _interleaved(scenarios, runs)
    for p in (backup, refused, failing):
        await p.aclose()
    await sdk.close()
    return rows


async def main(runs: int) -> None:
    async with start_openai_fake() as fake:
        rows = await _bench(fake, runs)
    base = dict((label, m) for label, m, _ in rows)["backup alone"]
    print(f"failover latency, median of {runs} runs (fake server on 127.0.0.1, real openai SDK)")
    print(f"{'path':<18}{'median ms':>11}{'p90 ms':>9}{'added ms':>10}{'ratio':>8}")
    for label, median, p90 in rows:
        print(f"{label:<18}{median:>11.2f}{p90:>9.2f}{median - base:>+10.2f}"
              f"{median / base:>8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    logging.basicConfig(level=logging.ERROR)  # every failover logs a warning: not timed output
    asyncio.run(main(parser.parse_args().runs))
