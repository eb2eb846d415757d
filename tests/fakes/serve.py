"""Start a fake peer's aiohttp app on 127.0.0.1, on a free port.

Every fake under ``tests/fakes`` listens the same way, and lets tests wait
for what it saw the same way; these are those ways. ``runner.cleanup()``
stops the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web


async def serve(app: web.Application, *, shutdown_timeout: float = 60.0
                ) -> tuple[web.AppRunner, int]:
    """Returns the started runner and the port the OS picked.

    ``shutdown_timeout`` bounds how long cleanup waits for open requests
    (fakes that hang on purpose want a short one)."""
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])


async def wait_until(changed: asyncio.Event, predicate: Callable[[], bool],
                     within_s: float) -> None:
    """Wait until ``predicate()`` holds, re-checked each time the fake sets
    ``changed`` (an event, never a polling sleep); TimeoutError after ``within_s``.

    No await separates the check from ``clear()``, so no change is missed."""
    async with asyncio.timeout(within_s):
        while not predicate():
            changed.clear()
            await changed.wait()
