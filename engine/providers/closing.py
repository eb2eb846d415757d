"""``async with provider:`` for every provider: enter returns the provider,
exit awaits its ``aclose()``.

Contract: a subclass implements ``aclose`` (idempotent: safe to call twice and
on a provider that never opened anything); it may override ``__aenter__`` to
open eagerly (Bedrock does, to report a config mistake at startup).
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class ClosesOnExit:
    """Mixin: the async context manager half of a provider."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        raise NotImplementedError
