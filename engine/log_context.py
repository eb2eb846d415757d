"""Who a log line is about: bot, platform, chat, provider, via contextvars.

Any layer binds what it knows for the duration of a block; every log line
emitted inside it (including by libraries, and by tasks created inside it,
which copy the context) carries those fields. ``adapters/ops/logs.py`` puts
them on each record. Stdlib only, so the engine and its providers can bind::

    with bind(bot="helper", platform="telegram", chat="42"):
        ...
        with bind(provider="primary"):
            ...
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

FIELDS = ("bot", "platform", "chat", "provider")

_context: ContextVar[dict[str, str]] = ContextVar("boternity_log_context", default={})  # noqa: B039


@contextmanager
def bind(**fields: str | None) -> Iterator[None]:
    """Add fields (None values are skipped) for the duration of the block."""
    merged = {**_context.get(), **{k: str(v) for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        try:
            _context.reset(token)
        except ValueError:
            # An async generator finalized from another task's context: that
            # context is gone anyway.
            pass


def current() -> dict[str, str]:
    """The fields bound here (a copy)."""
    return dict(_context.get())
