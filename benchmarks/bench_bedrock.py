"""What our Bedrock provider costs per reply over the bare SDK, side by side in one run.

    .venv/bin/python benchmarks/bench_bedrock.py [--runs 200]

Every row streams the same short answer (5 deltas + usage) from the same fake
Bedrock runtime (``tests/fakes/bedrock_server.py``, AWS event-stream framing)
on 127.0.0.1 through the real aioboto3 client; only the path differs:

    bare aioboto3       client.converse_stream + iterate the events (reference)
    BedrockProvider     our provider's stream(): message mapping, our timeouts,
                        error mapping, usage chunk
    chain               the same provider inside a FallbackChain (breaker,
                        skip rules incl. the budget rule reading SQLite)
    conversation+usage  Conversation.reply (SQLite history, prompt, chain) with
                        the usage observer writing one row per reply

Every path uses one long-lived client (the provider keeps its own, as in
production). The scenarios run interleaved, in a new random order each round,
after a warm-up; quartiles, and the medians' difference and ratio to the
bare SDK, are reported. Absolute numbers depend on the machine and its load;
the ratios are the point.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aioboto3  # noqa: E402
from botocore.config import Config  # noqa: E402

from engine.conversation import Conversation  # noqa: E402
from engine.providers.bedrock import BedrockProvider  # noqa: E402
from engine.providers.fallback import Breakers, FallbackChain  # noqa: E402
from engine.types import (  # noqa: E402
    Capabilities,
    CompletionRequest,
    IncomingMessage,
    Message,
    Reply,
)
from engine.usage import Budget, Price, UsageAccounting  # noqa: E402
from persistence.sql.conversations import SqlConversationStore  # noqa: E402
from persistence.sql.database import Database  # noqa: E402
from persistence.sql.usage import SqlUsageStore  # noqa: E402
from tests.fakes.bedrock_server import Behaviour, FakeBedrock  # noqa: E402

CHUNKS = ("The", " answer", " is", " forty", "-two.")
ANSWER = "".join(CHUNKS)
MODEL = "anthropic.claude-bench"
PERSONA = "You are terse."
QUESTION = "What is the answer?"


async def _run(fake: FakeBedrock, runs: int, data: Path) -> dict[str, list[float]]:
    session = aioboto3.Session()
    config = Config(retries={"total_max_attempts": 1})
    provider = BedrockProvider(name="aws", model=MODEL, capabilities=Capabilities(vision=True),
                               endpoint_url=fake.url)
    request = CompletionRequest(messages=(Message("system", PERSONA),
                                          Message("user", QUESTION)))
    async with session.client("bedrock-runtime", endpoint_url=fake.url, config=config) \
            as client, provider, Database(f"sqlite+aiosqlite:///{data / 'bench.db'}") as db:
        usage = UsageAccounting(SqlUsageStore(db), prices={"aws": Price(3.0, 15.0)},
                                budgets={"bench": Budget(bot_usd_per_day=1000.0)})
        chain = FallbackChain([provider], Breakers(), skip=usage.skip_for("bench"))
        conversation = Conversation(bot="bench", persona=PERSONA, chain=chain,
                                    store=SqlConversationStore(db), observers=[usage])
        counter = iter(range(10**9))

        async def bare() -> None:
            response = await client.converse_stream(
                modelId=MODEL, system=[{"text": PERSONA}],
                messages=[{"role": "user", "content": [{"text": QUESTION}]}],
                inferenceConfig={"maxTokens": 1024},
            )
            parts: list[str] = []
            event: dict[str, Any]
            async for event in response["stream"]:
                if "contentBlockDelta" in event:
                    parts.append(event["contentBlockDelta"]["delta"].get("text", ""))
            assert "".join(parts) == ANSWER

        async def ours() -> None:
            text = "".join([c.text async for c in provider.stream(request)])
            assert text == ANSWER

        async def in_chain() -> None:
            run = chain.run(request)
            assert "".join([c.text async for c in run]) == ANSWER
            assert run.served_by == "aws"

        async def reply() -> None:
            message = IncomingMessage(platform="terminal", bot="bench",
                                      chat=f"c{next(counter)}", user="u", text=QUESTION)
            final = [i async for i in conversation.reply(message) if isinstance(i, Reply)]
            assert final[0].text == ANSWER and final[0].served_by == "aws"

        scenarios: dict[str, Callable[[], Awaitable[None]]] = {
            "bare aioboto3": bare, "BedrockProvider": ours, "chain": in_chain,
            "conversation+usage": reply,
        }
        timings: dict[str, list[float]] = {name: [] for name in scenarios}
        for _ in range(10):  # warm-up: connections, lazy imports, SQLite pages
            for scenario in scenarios.values():
                await scenario()
        order = list(scenarios)
        shuffle = random.Random(7).shuffle
        for _ in range(runs):
            # A new order every round: the fake shares this event loop, and the
            # request right after another one pays for that one's server-side
            # cleanup; shuffling spreads that cost evenly.
            shuffle(order)
            for name in order:
                start = time.perf_counter()
                await scenarios[name]()
                timings[name].append(time.perf_counter() - start)
    return {name: [q * 1000 for q in statistics.quantiles(values, n=4)]
            for name, values in timings.items()}


async def measure(runs: int) -> dict[str, list[float]]:
    # The standard AWS chain, pointed at dummies: never a real account or ~/.aws.
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update({
            "AWS_ACCESS_KEY_ID": "AKIDBENCH", "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": f"{tmp}/config", "AWS_SHARED_CREDENTIALS_FILE": f"{tmp}/creds",
        })
        async with FakeBedrock(default=Behaviour(chunks=CHUNKS)) as fake:
            return await _run(fake, runs, Path(tmp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    quartiles = asyncio.run(measure(args.runs))
    bare = quartiles["bare aioboto3"][1]
    print(f"per-reply latency of {args.runs} interleaved runs (fake Bedrock, 127.0.0.1)")
    print(f"{'scenario':<20}{'p25 ms':>8}{'median ms':>10}{'p75 ms':>8}{'added ms':>10}"
          f"{'ratio':>7}")
    for name, (p25, median, p75) in quartiles.items():
        print(f"{name:<20}{p25:>8.2f}{median:>10.2f}{p75:>8.2f}{median - bare:>+10.2f}"
              f"{median / bare:>7.2f}")


if __name__ == "__main__":
    main()
