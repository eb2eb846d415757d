"""A stream's timeout: one timer for all the awaits of an answer, a deadline that moves.

    timer = Deadline(loop, loop.time() + first_token_timeout_s)
    try:
        while True:
            event = await timer.wait(anext(events))   # TimeoutError past timer.at
            ...
            yield chunk                               # consumer time never counts
            timer.at = loop.time() + idle_timeout_s   # a float store, no timer work
    finally:
        timer.cancel()

Why not ``asyncio.timeout_at`` around each ``anext``: that schedules and
cancels a timer per chunk (about 5 us of loop time each, 2 timer-heap
operations) for a deadline that almost never fires. Here the timer is
scheduled once per answer and re-arms itself only when it fires early, so a
moving deadline costs nothing per chunk. Never wrap a ``yield`` in
``asyncio.timeout``: it would cancel the consumer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

_T = TypeVar("_T")


class Deadline:
    """``asyncio.timeout_at`` for the awaits of one stream, with a deadline that moves.

    ``await timer.wait(aw)`` raises ``TimeoutError`` once ``timer.at`` (loop
    time) passes while ``aw`` runs, like a fresh ``asyncio.timeout_at(timer.at)``
    around each await; time between two ``wait`` calls (the consumer's work)
    never counts, and nothing is cancelled then. One timer serves the whole
    answer: moving ``at`` is a float store, and the timer re-arms itself only
    when it fires before the moved deadline, instead of a timeout context (a
    timer scheduled and cancelled) per chunk.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        self._at = at
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = 0.0
        self._task: asyncio.Task[Any] | None = None  # set while a ``wait`` runs
        self._expired = False

    @property
    def at(self) -> float:
        """The deadline (loop time)."""
        return self._at

    @at.setter
    def at(self, value: float) -> None:
        self._at = value
        # Later: a float store (the timer re-arms when it fires). Earlier (an idle
        # limit shorter than the first-token one): the armed timer would fire too late.
        if self._handle is not None and value < self._armed_at:
            self._handle.cancel()
            self._arm()

    async def wait(self, awaitable: Awaitable[_T]) -> _T:
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        if self._handle is None:
            self._arm()
        self._task = task
        try:
            return await awaitable
        except asyncio.CancelledError as exc:
            # Ours, and no one else asked to cancel: a timeout (as asyncio.Timeout).
            if self._expired and task.uncancel() <= cancelling:
                raise TimeoutError from exc
            raise
        finally:
            self._task = None

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self) -> None:
        self._armed_at = self.at
        self._handle = self._loop.call_at(self.at, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if self.at > self._armed_at:
            self._arm()  # the deadline moved on since: wait for the new one
        elif self._task is not None:
            self._expired = True
            self._task.cancel()
        # Else the consumer is busy between chunks: the next ``wait`` re-arms.
