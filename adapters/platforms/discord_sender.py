"""Discord's ``MessageSender``: send and edit (2000 chars) for the outbound scheduler.

- Mentions in bot output never ping anyone (``AllowedMentions.none()``).
- Rate limits, and who handles them: discord.py has its own per-bucket limiter
  (it reads ``X-RateLimit-*`` and waits pre-emptively, and sleeps and retries a
  429 itself). We keep it for SHORT waits, since it knows the real buckets, and
  cap it with ``max_ratelimit_timeout=30`` (the smallest discord.py accepts):
  a longer wait raises ``discord.RateLimited``, which becomes our
  ``RetryAfter`` so the outbound scheduler coalesces text instead of a call
  hanging. Our scheduler paces 1 operation/s per chat (Discord allows 5 per
  5 s per channel), so in practice discord.py's limiter stays idle.
- A send that timed out is retried with the SAME nonce (discord.py sends it
  with ``enforce_nonce``), so Discord returns the first message instead of
  posting a second copy.
- Used by ``discord.py`` only.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import aiohttp
import discord

from adapters.chat.outbound import DISCORD, DeliveryError, DeliveryTimeout, Limits, RetryAfter
from adapters.chat.render import to_discord

MAX_RATELIMIT_TIMEOUT_S = 30.0


class DiscordSender:
    """``MessageSender`` over one logged-in ``discord.Client``."""

    def __init__(self, client: discord.Client, *, scope: str, limits: Limits = DISCORD) -> None:
        self.client = client
        self.scope = scope
        self.limits = limits
        self._nonces: dict[str, int] = {}  # chat -> nonce of a send that timed out

    async def send(self, chat: str, text: str, reply_to: str | None = None) -> str:
        channel = self.client.get_partial_messageable(int(chat))
        extra: dict[str, Any] = {}
        if reply_to:
            extra["reference"] = channel.get_partial_message(int(reply_to)).to_reference(
                fail_if_not_exists=False)
        nonce = self._nonces.pop(chat, None) or secrets.randbits(63)
        content = to_discord(text)
        try:
            message = await channel.send(
                content, nonce=nonce, mention_author=False,
                allowed_mentions=discord.AllowedMentions.none(), **extra,
            )
        except Exception as exc:
            mapped = _map_error(exc, "send")
            if isinstance(mapped, DeliveryTimeout):
                self._nonces[chat] = nonce  # the retry must not post a second copy
            raise mapped from exc
        if message.content != content:
            # enforce_nonce gave back an earlier attempt's message: bring it up to date.
            await self.edit(chat, str(message.id), text)
        return str(message.id)

    async def edit(self, chat: str, message_id: str, text: str) -> None:
        channel = self.client.get_partial_messageable(int(chat))
        try:
            await channel.get_partial_message(int(message_id)).edit(
                content=to_discord(text), allowed_mentions=discord.AllowedMentions.none())
        except Exception as exc:
            raise _map_error(exc, "edit") from exc


def _map_error(exc: Exception, what: str) -> DeliveryError:
    if isinstance(exc, discord.RateLimited):
        return RetryAfter(exc.retry_after)
    if isinstance(exc, discord.HTTPException) and exc.status == 429:
        # discord.py already retried 5 times: let the scheduler wait instead.
        retry = exc.response.headers.get("Retry-After") if exc.response else None
        return RetryAfter(float(retry or 1.0))
    if isinstance(exc, discord.DiscordServerError):
        return DeliveryTimeout(f"discord {what}: server error {exc.status}")
    if isinstance(exc, discord.HTTPException):
        return DeliveryError(f"discord {what}: {exc.status} {exc.text[:200]}")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, aiohttp.ClientError, OSError)):
        return DeliveryTimeout(f"discord {what}: {type(exc).__name__}")
    if isinstance(exc, discord.DiscordException):
        return DeliveryError(f"discord {what}: {exc}")
    raise exc
