"""What the engine costs per reply, and how much memory `boternity chat` needs.

    .venv/bin/python benchmarks/bench_engine.py [--runs 200]

1. Per-reply overhead, side by side in one run, against the same fake OpenAI
   server on 127.0.0.1 and the same short streamed answer:

       bare SDK        AsyncOpenAI streaming directly (no Boternity)
       conversation    Conversation.reply: store the message in SQLite, load
                       history, build the prompt, stream through the real
                       FallbackChain and provider, store the answer

   Both scenarios run interleaved (ABAB...) after a warm-up; medians and their
   ratio are reported. Each conversation run uses a new chat so the prompt
   stays the same size as the bare one.

2. Peak RSS of `boternity chat` on the embedded demo config answering one
   line, the chat process and the local llama.cpp model's server process
   together (summed from /proc, sampled every 10 ms: Linux), with long-term
   memory on (the default: embedding model and LanceDB) and off.

Absolute numbers depend on the machine and its load; the ratio is the point.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from openai import AsyncOpenAI  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from engine.conversation import Conversation  # noqa: E402
from engine.providers.fallback import Breakers, FallbackChain  # noqa: E402
from engine.providers.openai_compat import OpenAICompatProvider  # noqa: E402
from engine.types import IncomingMessage, Reply  # noqa: E402
from persistence.sql.conversations import SqlConversationStore  # noqa: E402
from persistence.sql.database import Database  # noqa: E402
from tests.fakes.openai_server import FakeOpenAI, Text, start_openai_fake  # noqa: E402

CHUNKS = ("The", " answer", " is", " forty", "-two.")
QUESTION = "What is the answer?"
PERSONA = "You are terse."


async def bare_sdk(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="m", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": PERSONA}, {"role": "user", "content": QUESTION}],
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "".join(CHUNKS)


async def overhead(runs: int) -> dict[str, float]:
    async with start_openai_fake(default=Text(CHUNKS, usage=(10, 5))) as fake:
        return await _overhead(fake, runs)


async def _overhead(fake: FakeOpenAI, runs: int) -> dict[str, float]:
    client = AsyncOpenAI(base_url=fake.base_url, api_key="sk-bench", max_retries=0)
    tmp = tempfile.TemporaryDirectory()
    provider = OpenAICompatProvider(name="primary", model="m", base_url=fake.base_url,
                                    api_key=SecretStr("sk-bench"))
    async with Database(f"sqlite+aiosqlite:///{tmp.name}/bench.db") as db, provider:
        conversation = Conversation(
            bot="bench", persona=PERSONA, chain=FallbackChain([provider], Breakers()),
            store=SqlConversationStore(db),
        )
        counter = iter(range(10**9))

        async def engine_reply() -> None:
            message = IncomingMessage(platform="terminal", bot="bench",
                                      chat=f"c{next(counter)}", user="u", text=QUESTION)
            final = [i async for i in conversation.reply(message) if isinstance(i, Reply)]
            assert final[0].text == "".join(CHUNKS)

        async def bare() -> None:
            await bare_sdk(client)

        scenarios: dict[str, Callable[[], Awaitable[None]]] = {
            "bare SDK": bare, "conversation": engine_reply,
        }
        timings: dict[str, list[float]] = {name: [] for name in scenarios}
        for _ in range(10):  # warm-up: connections, caches, JIT-free but lazy imports
            for run in scenarios.values():
                await run()
        for _ in range(runs):
            for name, run in scenarios.items():
                start = time.perf_counter()
                await run()
                timings[name].append(time.perf_counter() - start)
        await client.close()
    tmp.cleanup()
    return {name: statistics.median(values) * 1000 for name, values in timings.items()}


# Peak of the summed RSS of the chat and its descendants (the local model's
# server is a child process), sampled from /proc every 10 ms (Linux): the
# kernel's RUSAGE_CHILDREN maximum is that of the largest process, not the sum.
RSS_PROBE = """
import os, subprocess, sys, time
def tree_kib(root):
    parent, rss = {}, {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                parent[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{p}/status") as f:
                rss[int(p)] = next(int(x.split()[1]) for x in f if x.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass  # gone meanwhile, or a kernel thread
    tree, todo = set(), [root]
    while todo:
        tree.add(p := todo.pop())
        todo += [c for c, pp in parent.items() if pp == p and c not in tree]
    return sum(rss.get(p, 0) for p in tree)
proc = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, text=True)
proc.stdin.write("Say hello.\\n")
proc.stdin.close()
peak = 0
while proc.poll() is None:
    peak = max(peak, tree_kib(proc.pid))
    time.sleep(0.01)
print(peak)
"""


def peak_rss_chat(config: str | None = None) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one `boternity chat` answering one line:
    the chat process and its children (the local model's server) together."""
    script = Path(sys.executable).parent / "boternity"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "adapters.cli"]
    if config:
        command += ["--config", config]
    with tempfile.TemporaryDirectory() as cwd:
        start = time.perf_counter()
        probe = subprocess.run([sys.executable, "-c", RSS_PROBE, *command, "chat"],
                               capture_output=True, text=True, cwd=cwd, timeout=600, check=True)
        wall = time.perf_counter() - start
    return int(probe.stdout.strip()) / 1024, wall  # KiB


def memory_off_config(directory: str) -> str:
    """The demo config with long-term memory off (no embedding model, no LanceDB)."""
    example = (ROOT / "deploy" / "boternity.example.toml").read_text(encoding="utf-8")
    path = Path(directory) / "no-memory.toml"
    path.write_text(example + "\n[bots.demo.memory]\nenabled = false\n", encoding="utf-8")
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    if not args.skip_rss:
        print("peak RSS of `boternity chat` answering one line (with the model's server process)")
        with tempfile.TemporaryDirectory() as tmp:
            for label, config in (("demo config", None),
                                  ("demo config, memory off", memory_off_config(tmp))):
                rss, wall = peak_rss_chat(config)
                print(f"  {label:<26}{rss:>6.0f} MiB  ({wall:.1f} s wall)")

    medians = asyncio.run(overhead(args.runs))
    bare, engine = medians["bare SDK"], medians["conversation"]
    print(f"\nper-reply latency, median of {args.runs} interleaved runs (fake server, 127.0.0.1)")
    print(f"{'scenario':<16}{'median ms':>10}{'ratio':>8}")
    for name, value in medians.items():
        print(f"{name:<16}{value:>10.2f}{value / bare:>8.2f}")
    print(f"engine overhead per reply: {engine - bare:+.2f} ms")


if __name__ == "__main__":
    main()
