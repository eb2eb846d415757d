"""Event de-duplication: each platform event is handled once.

Platforms redeliver: Slack retries an event it thinks was not acknowledged
(``X-Slack-Retry-Num``; ``retry_attempt`` in Socket Mode) and sends a mention
both as ``message`` and ``app_mention``; Telegram redelivers webhooks; two
workers may receive one event. An adapter ``claim``s a key naming the event
(e.g. ``slack:<team>:<channel>:<ts>``) before handling it and handles it only
when the claim succeeds. ``release`` gives a claim back (handling failed
before anything was sent) so a redelivery is handled.

``MemoryDedupe`` serves one process; a Redis implementation (``SET NX`` with
expiry) shares claims between workers behind the same Protocol.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol


class Dedupe(Protocol):
    async def claim(self, key: str, ttl_s: float = 600.0) -> bool:
        """True for the first claim of ``key`` within ``ttl_s``; False for a repeat."""
        ...

    async def release(self, key: str) -> None:
        """Forget a claim so the event is handled again if redelivered."""
        ...


class MemoryDedupe:
    """``Dedupe`` for one process: an expiring, size-bounded set of keys."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._expires: OrderedDict[str, float] = OrderedDict()

    async def claim(self, key: str, ttl_s: float = 600.0) -> bool:
        now = time.monotonic()
        expires = self._expires.get(key)
        if expires is not None and expires > now:
            return False
        self._expires[key] = now + ttl_s
        self._expires.move_to_end(key)
        while len(self._expires) > self.max_keys:
            self._expires.popitem(last=False)
        return True

    async def release(self, key: str) -> None:
        self._expires.pop(key, None)
