"""Slack's ``MessageSender``: ``chat.postMessage`` / ``chat.update`` for the outbound scheduler.

Markdown is rendered to mrkdwn; a 429 becomes ``RetryAfter`` (Retry-After
header), a timeout or a connection error ``DeliveryTimeout``, any other refusal
``DeliveryError``. A chat id is ``"<channel>"`` or, for a reply inside a
thread, ``"<channel>/<thread_ts>"`` so every part of a split reply stays in the
thread. Used by ``slack.py`` only.
"""

from __future__ import annotations

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.chat.outbound import SLACK, DeliveryError, DeliveryTimeout, Limits, RetryAfter
from adapters.chat.render import to_slack


def split_chat(chat: str) -> tuple[str, str | None]:
    """``"C1/169.1"`` -> (channel, thread_ts); ``"C1"`` -> (channel, None)."""
    channel, _, thread = chat.partition("/")
    return channel, thread or None


class SlackSender:
    """``MessageSender`` over the Web API of one workspace."""

    def __init__(self, client: AsyncWebClient, *, team: str, limits: Limits = SLACK,
                 bot_id: str = "") -> None:
        self.client = client
        self.scope = f"slack:{team}"
        self.limits = limits
        self.bot_id = bot_id  # ours: what find_sent looks for

    async def send(self, chat: str, text: str, reply_to: str | None = None) -> str:
        channel, thread = split_chat(chat)
        response = await self._call(
            "chat.postMessage", channel=channel, text=to_slack(text), thread_ts=thread,
            mrkdwn=True, unfurl_links=False, unfurl_media=False,
        )
        return str(response["ts"])

    async def find_sent(self, chat: str, text: str, since: float) -> str | None:
        """The ts of our message showing ``text`` posted since ``since`` (a
        chat.postMessage that timed out may have landed; Slack has no
        idempotency key, so look before posting it again)."""
        channel, thread = split_chat(chat)
        # A minute of slack for the difference between our clock and Slack's.
        window = {"channel": channel, "oldest": f"{since - 60:.6f}", "limit": 100}
        response = await (self._call("conversations.replies", ts=thread, **window) if thread
                          else self._call("conversations.history", **window))
        wanted, messages = to_slack(text), response.get("messages")
        for message in messages if isinstance(messages, list) else []:
            if (message.get("bot_id") == self.bot_id and message.get("text") == wanted
                    and message.get("ts") != thread):
                return str(message["ts"])
        return None

    async def edit(self, chat: str, message_id: str, text: str) -> None:
        channel, _ = split_chat(chat)
        await self._call("chat.update", channel=channel, ts=message_id, text=to_slack(text))

    async def _call(self, method: str, **kwargs: object) -> dict[str, object]:
        params = {k: v for k, v in kwargs.items() if v is not None}
        try:
            response = await self.client.api_call(method, json=params)
        except SlackApiError as exc:
            status = exc.response.status_code
            if status == 429:
                raise RetryAfter(_retry_after(exc.response.headers)) from exc
            error = exc.response.get("error", "error")
            raise DeliveryError(f"slack {method}: {error}") from exc
        except TimeoutError as exc:  # aiohttp's timeouts are TimeoutError subclasses
            raise DeliveryTimeout(f"slack {method}: no answer in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            # The request may or may not have landed: the scheduler retries it.
            raise DeliveryTimeout(f"slack {method}: {type(exc).__name__}") from exc
        return dict(response.data) if isinstance(response.data, dict) else {}


def _retry_after(headers: object) -> float:
    try:
        value = headers.get("Retry-After") or headers.get("retry-after")  # type: ignore[attr-defined]
        return float(value)
    except (AttributeError, TypeError, ValueError):
        return 1.0
