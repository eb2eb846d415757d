"""Background jobs with a bounded queue: submit returns at once, the work runs later.

``Background`` is what fact extraction runs on (the reply never waits for
it). Contract:

- ``submit(label, job)`` never blocks and never raises: it enqueues a
  zero-argument coroutine function and returns True, or returns False (and
  logs) when the queue is full, so a flood of messages sheds background work
  instead of growing memory without bound.
- ``workers`` jobs run at a time; a job's exception is logged with its label
  and never stops the worker.
- ``drain(within_s)`` waits until everything queued so far has finished;
  ``aclose(within_s)`` drains, then cancels what is still running. The object
  is also an async context manager (``aclose`` on exit).

Workers start lazily on the first ``submit`` (it must run inside the loop),
so a component can be built before the loop serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]


class Background:
    """A bounded queue of labelled jobs served by a few worker tasks."""

    def __init__(self, *, max_pending: int = 256, workers: int = 2, name: str = "background"):
        if max_pending < 1 or workers < 1:
            raise ValueError("max_pending and workers must be at least 1")
        self.name = name
        self._queue: asyncio.Queue[tuple[str, Job]] = asyncio.Queue(maxsize=max_pending)
        self._workers = workers
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.dropped = 0
        self.failed = 0
        self.done = 0
        self._pending = 0

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return self._pending

    def submit(self, label: str, job: Job) -> bool:
        """Queue ``job``; False (logged) when closed or full. Never blocks, never raises."""
        if self._closed:
            log.warning("%s: closed, dropping job %s", self.name, label)
            self.dropped += 1
            return False
        try:
            self._queue.put_nowait((label, job))
        except asyncio.QueueFull:
            log.warning("%s: queue full (%d), dropping job %s",
                        self.name, self._queue.maxsize, label)
            self.dropped += 1
            return False
        self._pending += 1
        self._start()
        return True

    def _start(self) -> None:
        while len(self._tasks) < self._workers:
            task = asyncio.get_running_loop().create_task(
                self._work(), name=f"{self.name}-worker"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _work(self) -> None:
        while True:
            label, job = await self._queue.get()
            try:
                await job()
                self.done += 1
            except asyncio.CancelledError:
                raise
            except Exception:
                self.failed += 1
                log.exception("%s: job %s failed", self.name, label)
            finally:
                self._pending -= 1
                self._queue.task_done()

    async def drain(self, within_s: float | None = None) -> bool:
        """Wait until every job queued so far finished; False after ``within_s`` seconds."""
        try:
            await asyncio.wait_for(self._queue.join(), within_s)
        except TimeoutError:
            return False
        return True

    async def aclose(self, within_s: float = 10.0) -> None:
        """Refuse new jobs, give queued ones ``within_s`` seconds, cancel the rest."""
        self._closed = True
        # drain() can time out just as the last job finishes: only a real
        # leftover is worth a warning (a clean exit must stay quiet).
        if not await self.drain(within_s) and self._pending > 0:
            log.warning("%s: %d jobs unfinished at shutdown, cancelling",
                        self.name, self._pending)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> Background:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
