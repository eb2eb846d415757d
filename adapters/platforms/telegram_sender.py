"""Telegram's ``MessageSender``: the outbound scheduler's way to send and edit.

``TelegramSender`` renders Markdown to text + entities (``adapters.chat.render``);
PTB's ``RetryAfter`` becomes ours, ``TimedOut`` and network trouble become
``DeliveryTimeout``, other refusals ``DeliveryError``, and "message is not
modified" counts as success. Used by ``telegram.py`` only.
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Awaitable
from typing import Any

from telegram import Bot, Message, MessageEntity, ReplyParameters
from telegram import error as tg_error
from telegram.warnings import PTBDeprecationWarning

from adapters.chat.outbound import TELEGRAM, DeliveryError, DeliveryTimeout, Limits, RetryAfter
from adapters.chat.render import to_telegram
from adapters.chat.splitting import utf16_len


def _retry_after(exc: tg_error.RetryAfter) -> float:
    # PTB 22 warns that the int will become a timedelta; accept both.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)


class TelegramSender:
    """``MessageSender`` over a PTB ``Bot`` (see the module docstring)."""

    def __init__(self, bot: Bot, scope: str, limits: Limits = TELEGRAM) -> None:
        self.bot = bot
        self.scope = scope
        self.limits = limits

    def _render(self, text: str) -> tuple[str, list[MessageEntity]]:
        plain, entities = to_telegram(text)
        if utf16_len(plain) > self.limits.max_len:
            # The splitter measured the Markdown; should rendering ever make it
            # longer, send the source as plain text rather than have it refused.
            return text, []
        return plain, [MessageEntity(**{k: v for k, v in e.items() if k != "user"})
                       for e in entities]

    async def send(self, chat: str, text: str, reply_to: str | None = None) -> str:
        plain, entities = self._render(text)
        reply = (ReplyParameters(message_id=int(reply_to), allow_sending_without_reply=True)
                 if reply_to else None)
        message = await self._call(self.bot.send_message(
            chat_id=int(chat), text=plain, entities=entities, reply_parameters=reply))
        assert isinstance(message, Message)
        return str(message.message_id)

    async def typing(self, chat: str) -> None:
        await self._call(self.bot.send_chat_action(chat_id=int(chat), action="typing"))

    async def edit(self, chat: str, message_id: str, text: str) -> None:
        plain, entities = self._render(text)
        try:
            await self._call(self.bot.edit_message_text(
                chat_id=int(chat), message_id=int(message_id), text=plain, entities=entities))
        except DeliveryError as exc:
            if "not modified" not in str(exc):  # a retried edit that had landed
                raise

    @staticmethod
    async def _call(call: Awaitable[Any]) -> Any:
        try:
            return await call
        except tg_error.RetryAfter as exc:
            raise RetryAfter(_retry_after(exc)) from exc
        except tg_error.TimedOut as exc:
            raise DeliveryTimeout(str(exc)) from exc
        except tg_error.BadRequest as exc:
            raise DeliveryError(exc.message) from exc
        except tg_error.NetworkError as exc:
            # Connection trouble: like a timeout, the call may or may not have landed.
            raise DeliveryTimeout(str(exc)) from exc
        except tg_error.TelegramError as exc:
            raise DeliveryError(str(exc)) from exc
