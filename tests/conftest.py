"""Shared fixtures. Append yours; keep each fake peer in its own tests/fakes/ module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakes.openai_server import FakeOpenAI, start_openai_fake


@pytest.fixture
async def openai_fake() -> AsyncIterator[FakeOpenAI]:
    """A running fake OpenAI-compatible server (see tests/fakes/openai_server.py)."""
    async with start_openai_fake() as fake:
        yield fake
