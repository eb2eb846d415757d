"""engine.background: shutdown warns only about jobs really left unfinished."""

from __future__ import annotations

import asyncio
import logging

import pytest

from engine.background import Background


async def test_clean_shutdown_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    ran = asyncio.Event()

    async def job() -> None:
        ran.set()

    caplog.set_level(logging.WARNING, logger="engine.background")
    async with Background(name="t") as jobs:
        assert jobs.submit("one", job)
    assert ran.is_set() and jobs.done == 1
    assert not [r for r in caplog.records if r.name == "engine.background"]


async def test_shutdown_names_the_running_jobs_it_cancels(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started, never = asyncio.Event(), asyncio.Event()

    async def stuck() -> None:
        started.set()
        await never.wait()

    caplog.set_level(logging.WARNING, logger="engine.background")
    jobs = Background(name="t", workers=1)
    jobs.submit("stuck", stuck)
    jobs.submit("queued", stuck)
    await started.wait()
    await jobs.aclose(within_s=0.01)
    # The running job counts too (the queue alone holds only the second one).
    assert [r.getMessage() for r in caplog.records if r.name == "engine.background"] == [
        "t: 2 jobs unfinished at shutdown, cancelling"
    ]
