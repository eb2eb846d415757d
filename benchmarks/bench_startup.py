"""Start-up of each one-shot command and of ``boternity chat``, before and after, in one run.

    git worktree add --detach /tmp/before COMMIT   # the code to compare against
    .venv/bin/python benchmarks/bench_startup.py --before /tmp/before [--rounds 3] [--facts 300]
        [--typed-after 3] [--no-demo | --only-demo]

Each command runs as a fresh ``python -m adapters.cli`` process of each
checkout (``PYTHONPATH`` points at it), alternating before/after, on the same
configuration and data (shaped like deploy/boternity.example.toml, memory on,
``--facts`` memories imported first). What is timed:

- every admin command, start to exit (``providers``, ``usage``, ``memory
  list|export|why|forget``, ``shared list|verify``, and a bad ``--importance``:
  how long until the user hears about the typo);
- ``chat``: start until its first answer reaches stdout, against a zero-latency
  fake provider (so nothing but start-up and the reply path is timed), with
  the seeded memories (recall opens the model and LanceDB) and with a fresh
  data directory (no memory yet: what a new user's first chat pays);
- ``chat`` on the demo (the embedded config, the local SmolLM2 model): the
  same, generation included, once per round with a fresh data directory;
  and its first token: start until the first byte of the answer on stdout,
  generation excluded. A scripted chat writes each answer whole, so this
  run goes through ``FIRST_TOKEN_PROBE``, which starts the same CLI with
  the scripted chat writing the answer's deltas as they arrive (the one
  change: ``terminal.answer`` streams), in the same process;
- with ``--only-demo``: the demo rows alone (the admin commands and the fake
  chats are skipped);
- with ``--typed-after S``: both chats again, the line written S seconds
  after the start as a person would type it, timed from the line to the
  answer (what start-up work is left once the prompt has waited).

Medians are printed with the after/before ratio, the fastest run of each
side, and the load average at the start and the end. Wall-clock numbers
depend on the machine and its load; the ratios in one run are the point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes.openai_server import start_openai_fake

HERE = Path(__file__).resolve().parent.parent
CONFIG = """
[storage]
data_dir = "{data}"

[providers.primary]
kind = "openai_compatible"
base_url = "{base_url}"
model = "fake-model"
api_key_env = "BENCH_KEY"

[bots.demo]
persona = "You are a helpful assistant."
chain = ["primary"]
footer = "on_failover"
history_messages = 30

[bots.demo.memory]
extract = false                      # the fake answers no JSON: nothing to learn
"""

# ``python -c FIRST_TOKEN_PROBE chat ...``: ``boternity chat ...`` whose scripted
# answers stream (deltas written as they come), so stdout's first byte is the
# first token. Both checkouts have ``terminal.answer(conversation, message, out,
# *, stream)``.
FIRST_TOKEN_PROBE = """
import runpy, sys
from adapters.platforms import terminal
answer = terminal.answer
terminal.answer = lambda conversation, message, out, *, stream: answer(
    conversation, message, out, stream=True)
sys.argv[0] = "boternity"
runpy.run_module("adapters.cli", run_name="__main__", alter_sys=True)
"""

COMMANDS: dict[str, list[str]] = {
    "providers": ["providers"],
    "usage": ["usage"],
    "memory list": ["memory", "list"],
    "memory export": ["memory", "export"],
    "memory why": ["memory", "why"],
    "memory forget --user": ["memory", "forget", "--user", "telegram:nobody"],
    "shared list": ["shared", "list"],
    "shared verify": ["shared", "verify"],
    "bad --importance": ["memory", "add", "x", "--importance", "7"],
}


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LANCEDB_LOG", "PYTHONPATH")}
    env.update(PYTHONPATH=str(root), BENCH_KEY="sk-bench", HF_HUB_OFFLINE="1")
    return env


async def timed(root: Path, args: list[str], cwd: Path, *, stdin: str | None = None,
                typed_after: float = 0.0, first_token: bool = False) -> float:
    """Seconds from spawn to exit; with ``stdin``, to the first line on stdout;
    with ``typed_after``, ``stdin`` is written that many seconds after the
    spawn (a person typing) and the time from then to the answer is returned;
    with ``first_token``, the chat runs through ``FIRST_TOKEN_PROBE`` and the
    time is to the first byte on stdout."""
    start = time.perf_counter()
    program = ["-c", FIRST_TOKEN_PROBE] if first_token else ["-m", "adapters.cli"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *program, *args, cwd=cwd, env=_env(root),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    if stdin is None:
        proc.stdin.close()
        await proc.wait()
        return time.perf_counter() - start
    if typed_after:
        await asyncio.sleep(typed_after)
        start = time.perf_counter()
    proc.stdin.write(stdin.encode())
    await proc.stdin.drain()
    line = await (proc.stdout.read(1) if first_token else proc.stdout.readline())
    elapsed = time.perf_counter() - start
    if not line.strip():
        raise RuntimeError(f"{root}: chat printed no answer")
    proc.stdin.close()
    await proc.wait()
    return elapsed


async def supports_yes(root: Path, cwd: Path) -> bool:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "adapters.cli", "memory", "forget", "--help", cwd=cwd,
        env=_env(root), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    return b"--yes" in out


async def demo_rounds(sides: dict[str, Path], work: Path, round_no: int,
                      times: dict[str, dict[str, list[float]]]) -> None:
    """One round of the demo chat (line piped in at the start, a fresh data
    directory each time), alternating the sides: to the whole answer, then to
    its first token."""
    for name, first_token in (("chat, first answer (demo)", False),
                              ("chat, first token (demo)", True)):
        for side, root in sides.items():
            demo = work / f"demo-{side}-{round_no}-{int(first_token)}"
            demo.mkdir()
            seconds = await timed(root, ["chat"], demo, stdin="hello\n",
                                  first_token=first_token)
            times.setdefault(name, {}).setdefault(side, []).append(seconds)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the old code")
    parser.add_argument("--after", type=Path, default=HERE, help="default: this checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--facts", type=int, default=300)
    parser.add_argument("--no-demo", action="store_true", help="skip the local-model chat")
    parser.add_argument("--only-demo", action="store_true",
                        help="only the local-model chat (its answer and its first token)")
    parser.add_argument("--typed-after", type=float, default=0.0, metavar="S",
                        help="also time the chats' answer to a line written S seconds after "
                             "the start (a person typing), from the line to the answer")
    opts = parser.parse_args()
    sides = {"before": opts.before.resolve(), "after": opts.after.resolve()}
    load_at_start = os.getloadavg()
    times: dict[str, dict[str, list[float]]] = {}

    async with start_openai_fake() as fake:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            config = work / "boternity.toml"
            config.write_text(CONFIG.format(data=work / "data", base_url=fake.base_url))
            facts = "".join(json.dumps({"text": f"fact {i} about the office",
                                        "user": f"telegram:{i % 7}"}) + "\n"
                            for i in range(opts.facts))
            (work / "facts.jsonl").write_text(facts)
            if not opts.only_demo:
                seed = await timed(sides["after"], ["--config", str(config), "memory",
                                                    "import", "facts.jsonl"], work)
                print(f"seeded {opts.facts} facts ({seed:.1f} s)", file=sys.stderr)
            yes = {side: await supports_yes(root, work) for side, root in sides.items()}
            for round_no in range(opts.rounds):
                if opts.only_demo:
                    await demo_rounds(sides, work, round_no, times)
                    print(f"round {round_no + 1}/{opts.rounds} done", file=sys.stderr)
                    continue
                for name, args in COMMANDS.items():
                    for side, root in sides.items():
                        extra = ["--yes"] if name.startswith("memory forget") and yes[side] else []
                        seconds = await timed(root, ["--config", str(config), *args, *extra],
                                              work)
                        times.setdefault(name, {}).setdefault(side, []).append(seconds)
                for side, root in sides.items():
                    seconds = await timed(root, ["--config", str(config), "chat"], work,
                                          stdin="hello\n")
                    times.setdefault("chat, first answer (fake)", {}).setdefault(
                        side, []).append(seconds)
                    fresh = work / f"fresh-{side}-{round_no}"
                    fresh.mkdir()
                    (fresh / "boternity.toml").write_text(
                        CONFIG.format(data=fresh / "data", base_url=fake.base_url))
                    seconds = await timed(root, ["chat"], fresh, stdin="hello\n")
                    times.setdefault("chat, first answer (fake, new)", {}).setdefault(
                        side, []).append(seconds)
                    if opts.typed_after:
                        seconds = await timed(root, ["--config", str(config), "chat"], work,
                                              stdin="hello\n", typed_after=opts.typed_after)
                        times.setdefault("typed: chat (fake), line to answer", {}).setdefault(
                            side, []).append(seconds)
                    if opts.typed_after and not opts.no_demo:
                        demo = work / f"demo-typed-{side}-{round_no}"
                        demo.mkdir()
                        seconds = await timed(root, ["chat"], demo, stdin="hello\n",
                                              typed_after=opts.typed_after)
                        times.setdefault("typed: chat (demo), line to answer", {}).setdefault(
                            side, []).append(seconds)
                if not opts.no_demo:
                    await demo_rounds(sides, work, round_no, times)
                print(f"round {round_no + 1}/{opts.rounds} done", file=sys.stderr)

    loads = " -> ".join(", ".join(f"{x:.2f}" for x in avg)
                        for avg in (load_at_start, os.getloadavg()))
    print(f"load average (1, 5, 15 min) at start -> end: {loads}")
    # The fastest run too: on a shared machine it is the one least disturbed.
    print(f"{'command':<32} {'before s':>9} {'after s':>9} {'after/before':>13} "
          f"{'fastest: before':>16} {'after':>6}")
    for name, by_side in times.items():
        before, after = (statistics.median(by_side[s]) for s in ("before", "after"))
        print(f"{name:<32} {before:>9.2f} {after:>9.2f} {after / before:>13.2f} "
              f"{min(by_side['before']):>16.2f} {min(by_side['after']):>6.2f}")


if __name__ == "__main__":
    asyncio.run(main())
