"""CPU per reply of the provider path: the bare SDK, our provider, our chain.

    .venv/bin/python benchmarks/bench_stream.py [--replies 200] [--chunks 4 100]
        [--rounds 3] [--concurrency 1] [--before PATH] [--profile VARIANT]

A zero-latency fake OpenAI server (tests/fakes/openai_server.py) runs in
another process, so the CPU time a variant's process spends (``process_time``)
is the client's alone: building the request, sending it, parsing the SSE, and
what wraps each chunk. Every reply sends the same prompt: a system prompt and
30 history messages (what the throughput benchmark's chats carry), and gets an
answer of ``--chunks`` chunks:

    sdk        ``AsyncOpenAI.chat.completions.create`` with the same messages (the floor)
    provider   ``OpenAICompatProvider.stream``
    chain      ``FallbackChain([provider]).run`` (breaker, repetition guard, ...)

``--before PATH`` runs provider and chain from another checkout too (e.g.
``git worktree add /tmp/before main``). Each variant is its own process, run
round-robin ``--rounds`` times so machine noise hits every row alike; the
table gives the median over rounds. ``--profile VARIANT`` prints a cProfile of
one child instead. Absolute numbers depend on the machine; compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HISTORY = 30
VOCABULARY = ("the", "a", "train", "leaves", "at", "nine", "pack", "light", "shoes", "for",
              "rain", "and", "sun", "tickets", "are", "in", "your", "email", "Ana", "Bo",
              "coast", "hotel", "map", "snacks", "charger", "towel", "book", "early")
SYSTEM = ("You are a helpful assistant in a group chat. Answer briefly and kindly. " * 8).strip()


def _messages() -> list[tuple[str, str]]:
    out = [("system", SYSTEM)]
    for i in range(HISTORY):
        if i % 2 == 0:
            out.append(("user", f"Message {i}: what do you remember about the trip to "
                                f"the coast we planned for week {i}, and who is coming?"))
        else:
            out.append(("assistant", f"Answer {i}: you planned to leave on Friday; Ana and "
                                     f"Bo are coming, and you asked me to remind you of "
                                     f"the tickets. " * 2))
    out.append(("user", "And what should I pack?"))
    return out


async def _run(variant: str, base_url: str, replies: int, concurrency: int) -> dict[str, float]:
    from engine.types import CompletionRequest, Message

    pairs = _messages()
    request = CompletionRequest(tuple(Message(role, text) for role, text in pairs))  # type: ignore[arg-type]
    send: Any
    if variant == "sdk":
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
        dicts = [{"role": role, "content": text} for role, text in pairs]

        async def send() -> None:
            stream = await client.chat.completions.create(
                model="m", messages=dicts, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True}, max_tokens=1024)
            async for _ in stream:
                pass
    else:
        from engine.providers.fallback import Breakers, FallbackChain
        from engine.providers.openai_compat import OpenAICompatProvider

        provider = OpenAICompatProvider(name="fast", model="m", base_url=base_url)
        chain = FallbackChain([provider], Breakers())

        async def send() -> None:
            source = provider.stream(request) if variant == "provider" else chain.run(request)
            async for _ in source:
                pass

    async def worker(n: int) -> None:
        for _ in range(n):
            await send()

    for _ in range(5):  # warm-up: connection pool, imports, caches
        await send()
    cpu, wall = time.process_time(), time.perf_counter()
    per = max(1, replies // concurrency)
    await asyncio.gather(*(worker(per) for _ in range(concurrency)))
    done = per * concurrency
    return {"cpu_ms": (time.process_time() - cpu) * 1000 / done,
            "wall_ms": (time.perf_counter() - wall) * 1000 / done}


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, args.root)
    coro = _run(args.variant, args.base_url, args.replies, args.concurrency)
    if not args.profile:
        print(json.dumps(asyncio.run(coro)))
        return
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    result = asyncio.run(coro)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
    print(json.dumps(result))


def _fake_server(chunks: int) -> tuple[subprocess.Popen[str], str]:
    sys.path.insert(0, str(ROOT))  # this script runs from benchmarks/
    from tests.fakes.openai_server import spawn_openai_fake

    # Token-sized pieces of prose that never loop (the repetition guard scans it all).
    rng = random.Random(7)
    words = tuple(f" {rng.choice(VOCABULARY)}" for _ in range(chunks))
    return spawn_openai_fake(words, (900, chunks))


def _spawn(args: argparse.Namespace, variant: str, root: str, base_url: str,
           profile: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, __file__, "--child", "--variant", variant, "--root", root,
         "--base-url", base_url, "--replies", str(args.replies),
         "--concurrency", str(args.concurrency)] + (["--profile", variant] if profile else []),
        capture_output=True, text=True, check=False, cwd=tempfile.gettempdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=200)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--before", help="another checkout to run side by side")
    parser.add_argument("--profile", help="cProfile one variant (sdk, provider, chain)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    variants = [("sdk", "-", str(ROOT))]
    for name in ("provider", "chain"):
        if args.before:
            variants.append((name, "before", args.before))
        variants.append((name, "after", str(ROOT)))
    for chunks in args.chunks:
        server, base_url = _fake_server(chunks)
        try:
            if args.profile:
                out = _spawn(args, args.profile, str(ROOT), base_url, profile=True)
                print(out.stdout, out.stderr)
                continue
            results: dict[tuple[str, str], list[dict[str, float]]] = {}
            for _ in range(args.rounds):
                for variant, label, root in variants:
                    out = _spawn(args, variant, root, base_url)
                    if out.returncode != 0:
                        sys.exit(f"{variant} {label} failed:\n{out.stderr}")
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    results.setdefault((variant, label), []).append(r)
            floor = statistics.median(r["cpu_ms"] for r in results[("sdk", "-")])
            print(f"\n{chunks} chunks per answer, {args.replies} replies x {args.rounds} rounds,"
                  f" C={args.concurrency}")
            print(f"{'variant':<10}{'code':<8}{'CPU ms/reply':>13}{'vs sdk':>8}{'wall ms':>9}")
            for (variant, label), rs in results.items():
                cpu = statistics.median(r["cpu_ms"] for r in rs)
                wall = statistics.median(r["wall_ms"] for r in rs)
                print(f"{variant:<10}{label:<8}{cpu:>13.2f}{cpu / floor:>8.2f}{wall:>9.2f}",
                      flush=True)
        finally:
            server.terminate()


if __name__ == "__main__":
    main()
