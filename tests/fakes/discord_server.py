"""A fake Discord (REST API v10 + gateway) for the REAL discord.py, on 127.0.0.1.

Point discord.py at it (process-global hooks, see TESTING.md)::

    discord.http.Route.BASE = fake.api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)

What it speaks:
- REST: ``GET /users/@me``, ``GET /oauth2/applications/@me``, channel message
  create/edit, ``PUT /applications/{app}/commands`` (tree.sync), interaction
  callbacks and ``@original`` edits, and ``GET /cdn/{id}/{name}`` for attachments.
- Gateway: HELLO, heartbeat ACK, IDENTIFY -> READY + GUILD_CREATE, then whatever
  the test dispatches (``message_create``, ``interaction``).

Rate limits like Discord's: message writes (create + edit) share a bucket per
channel (``channel_limit`` per ``channel_window_s``), reported in the
``X-RateLimit-*`` headers; past it the fake answers 429 with ``retry_after`` in
the JSON body (and ``Via``, without which discord.py reads 429 as a Cloudflare
ban). Every 429 is counted in ``rate_limited``.

Gotcha handled here: discord.py decodes JSON only when Content-Type is exactly
``application/json``, so responses are built by hand, not with ``json_response``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.serve import serve, wait_until

BOT_ID = 900000000000000001
APP_ID = 900000000000000002
GUILD_ID = 900000000000000003
TIMESTAMP = "2026-11-25T10:00:00.000000+00:00"


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(data).encode(), status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def user_payload(user_id: int, name: str, *, bot: bool = False) -> dict[str, Any]:
    return {"id": str(user_id), "username": name, "discriminator": "0",
            "global_name": name, "avatar": None, "bot": bot}


@dataclass
class FakeMessage:
    """A message the bot sent, with every text it had (``texts[-1]`` is current)."""

    id: int
    channel_id: int
    texts: list[str]
    sent_at: float
    edited_at: list[float] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.texts[-1]

    @property
    def edits(self) -> int:
        return len(self.texts) - 1


@dataclass
class _Bucket:
    used: int = 0
    reset_at: float = 0.0


class FakeDiscord:
    """In-process fake of Discord's REST API and gateway; ``async with`` it."""

    def __init__(self, *, channels: tuple[int, ...] = (), channel_limit: int = 5,
                 channel_window_s: float = 5.0, bot_name: str = "boternity",
                 token: str | None = None, privileged_intents: bool = True) -> None:
        self.channels = list(channels) or [800000000000000001]
        self.token = token  # when set, any other token gets 401
        self.privileged_intents = privileged_intents  # False: close 4014 on IDENTIFY
        self.channel_limit = channel_limit
        self.channel_window_s = channel_window_s
        self.bot_name = bot_name
        self.messages: dict[int, FakeMessage] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.rate_limited = 0
        self.identify: dict[str, Any] | None = None
        self.ready = asyncio.Event()
        self.command_puts: list[list[dict[str, Any]]] = []
        self.interaction_callbacks: list[dict[str, Any]] = []
        self.original_edits: dict[str, list[str]] = {}
        self.original_edited = asyncio.Event()
        self.files: dict[str, bytes] = {}
        self.changed = asyncio.Event()  # set on every message create/edit
        self._ids = itertools.count(700000000000000001)
        self._buckets: dict[int, _Bucket] = {}
        self._sockets: list[web.WebSocketResponse] = []
        self._seq = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle ---------------------------------------------------------
    async def __aenter__(self) -> FakeDiscord:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("GET", "/gateway", self._gateway)
        app.router.add_route("GET", "/cdn/{id}/{name}", self._cdn)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        self._runner, self.port = await serve(app)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # --- what tests use ----------------------------------------------------
    def next_id(self) -> int:
        return next(self._ids)

    def add_file(self, name: str, data: bytes) -> str:
        """Host an attachment; returns its CDN url."""
        file_id = str(self.next_id())
        self.files[file_id] = data
        return f"{self.url}/cdn/{file_id}/{name}"

    def in_channel(self, channel_id: int) -> list[FakeMessage]:
        return [m for m in self.messages.values() if m.channel_id == channel_id]

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        for ws in list(self._sockets):
            await ws.send_str(json.dumps({"op": 0, "t": event, "s": next(self._seq), "d": data}))

    async def message_create(
        self, *, channel_id: int, content: str, author_id: int = 500000000000000001,
        author_name: str = "alice", author_bot: bool = False, mention_bot: bool = False,
        guild: bool = True, attachments: list[dict[str, Any]] | None = None,
        reply_to: FakeMessage | None = None,
    ) -> int:
        """Deliver MESSAGE_CREATE as if a user wrote ``content``; returns its id."""
        message_id = self.next_id()
        author = user_payload(author_id, author_name, bot=author_bot)
        data: dict[str, Any] = {
            "id": str(message_id), "channel_id": str(channel_id), "author": author,
            "content": content, "timestamp": TIMESTAMP, "edited_timestamp": None,
            "tts": False, "mention_everyone": False,
            "mentions": [user_payload(BOT_ID, self.bot_name, bot=True)] if mention_bot else [],
            "mention_roles": [], "attachments": attachments or [], "embeds": [],
            "pinned": False, "type": 19 if reply_to else 0, "flags": 0, "components": [],
        }
        if guild:
            data["guild_id"] = str(GUILD_ID)
            data["member"] = {"roles": [], "joined_at": TIMESTAMP, "deaf": False, "mute": False,
                              "flags": 0}
        if reply_to is not None:
            data["message_reference"] = {"message_id": str(reply_to.id),
                                         "channel_id": str(channel_id), "type": 0}
            data["referenced_message"] = self._message_payload(reply_to)
        await self.dispatch("MESSAGE_CREATE", data)
        return message_id

    async def interaction(
        self, *, name: str, args: str | None, channel_id: int, user_id: int,
        user_name: str = "alice", administrator: bool = False,
    ) -> str:
        """Deliver a slash command (INTERACTION_CREATE type 2); returns its token."""
        token = f"itoken{self.next_id()}"
        options = [] if args is None else [{"name": "args", "type": 3, "value": args}]
        data = {
            "id": str(self.next_id()), "application_id": str(APP_ID), "type": 2,
            "token": token, "version": 1, "guild_id": str(GUILD_ID),
            "channel_id": str(channel_id),
            "channel": {"id": str(channel_id), "type": 0, "guild_id": str(GUILD_ID),
                        "name": f"chan-{channel_id}", "position": 0,
                        "permission_overwrites": []},
            "member": {"user": user_payload(user_id, user_name), "roles": [],
                       "joined_at": TIMESTAMP, "deaf": False, "mute": False, "flags": 0,
                       "permissions": str(8 if administrator else 0)},
            "data": {"id": str(self.next_id()), "name": name, "type": 1, "options": options},
            "app_permissions": "0", "locale": "en-US", "guild_locale": "en-US",
            "entitlements": [], "authorizing_integration_owners": {}, "context": 0,
            "attachment_size_limit": 8 * 1024 * 1024,
        }
        await self.dispatch("INTERACTION_CREATE", data)
        return token

    async def wait_for(self, predicate: Any, within_s: float = 30.0) -> None:
        """Wait until ``predicate()`` holds, woken by every message create/edit."""
        await wait_until(self.changed, predicate, within_s)

    # --- gateway -----------------------------------------------------------
    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                payload = json.loads(msg.data)
                if payload["op"] == 1:
                    await ws.send_str(json.dumps({"op": 11}))
                elif payload["op"] == 2:
                    self.identify = payload["d"]
                    if not self.privileged_intents and payload["d"]["intents"] & (1 << 15):
                        await ws.close(code=4014, message=b"Disallowed intent(s).")
                        break
                    await self._send_ready(ws)
        finally:
            self._sockets.remove(ws)
        return ws

    async def _send_ready(self, ws: web.WebSocketResponse) -> None:
        ready = {
            "v": 10, "user": user_payload(BOT_ID, self.bot_name, bot=True),
            "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
            "session_id": "fake-session", "resume_gateway_url": self.gateway_url,
            "application": {"id": str(APP_ID), "flags": 0}, "shard": [0, 1],
        }
        await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": next(self._seq), "d": ready}))
        everyone = {"id": str(GUILD_ID), "name": "@everyone", "permissions": "0",
                    "position": 0, "color": 0, "hoist": False, "managed": False,
                    "mentionable": False, "flags": 0}
        guild = {
            "id": str(GUILD_ID), "name": "fake guild", "owner_id": "1", "roles": [everyone],
            "channels": [{"id": str(c), "type": 0, "name": f"chan-{c}", "position": i,
                          "permission_overwrites": [], "guild_id": str(GUILD_ID)}
                         for i, c in enumerate(self.channels)],
            "members": [], "member_count": 2, "emojis": [], "stickers": [], "features": [],
            "threads": [], "voice_states": [], "presences": [], "large": False,
            "unavailable": False, "joined_at": TIMESTAMP, "verification_level": 0,
            "default_message_notifications": 0, "explicit_content_filter": 0,
            "mfa_level": 0, "nsfw_level": 0, "premium_tier": 0, "preferred_locale": "en-US",
            "system_channel_flags": 0,
        }
        await ws.send_str(json.dumps(
            {"op": 0, "t": "GUILD_CREATE", "s": next(self._seq), "d": guild}))
        self.ready.set()

    # --- REST --------------------------------------------------------------
    def _message_payload(self, message: FakeMessage) -> dict[str, Any]:
        return {
            "id": str(message.id), "channel_id": str(message.channel_id),
            "author": user_payload(BOT_ID, self.bot_name, bot=True), "content": message.text,
            "timestamp": TIMESTAMP, "edited_timestamp": TIMESTAMP if message.edits else None,
            "tts": False, "mention_everyone": False, "mentions": [], "mention_roles": [],
            "attachments": [], "embeds": [], "pinned": False, "type": 0, "flags": 0,
            "components": [],
        }

    def _take(self, channel_id: int) -> tuple[bool, dict[str, str], float]:
        """Spend one write from the channel's bucket: (allowed, headers, retry_after)."""
        now = time.monotonic()
        bucket = self._buckets.setdefault(channel_id, _Bucket())
        if now >= bucket.reset_at:
            bucket.used, bucket.reset_at = 0, now + self.channel_window_s
        reset_after = max(bucket.reset_at - now, 0.001)
        allowed = bucket.used < self.channel_limit
        if allowed:
            bucket.used += 1
        headers = {
            "X-RateLimit-Limit": str(self.channel_limit),
            "X-RateLimit-Remaining": str(self.channel_limit - bucket.used),
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": "channel-messages",
        }
        return allowed, headers, reset_after

    async def _rest(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        raw = await request.read()
        body: Any = None
        if raw and request.content_type == "application/json":
            body = json.loads(raw)
        self.requests.append((request.method, path, body))
        if self.token is not None and not path.startswith(("interactions/", "webhooks/")) \
                and request.headers.get("Authorization") != f"Bot {self.token}":
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        parts = path.split("/")
        if request.method == "GET" and path == "users/@me":
            return _json(user_payload(BOT_ID, self.bot_name, bot=True))
        if request.method == "GET" and path == "oauth2/applications/@me":
            return _json({"id": str(APP_ID), "name": self.bot_name, "icon": None,
                          "description": "", "bot_public": True, "bot_require_code_grant": False,
                          "verify_key": "0" * 64, "flags": 0,
                          "owner": user_payload(1, "owner")})
        if parts[0] == "channels" and len(parts) >= 3 and parts[2] == "messages":
            return self._channel_message(request.method, int(parts[1]), parts, body)
        if parts[0] == "applications" and parts[-1] == "commands" and request.method == "PUT":
            self.command_puts.append(body)
            return _json([{**c, "id": str(self.next_id()), "application_id": str(APP_ID),
                           "version": "1", "default_member_permissions": None,
                           "dm_permission": True, "nsfw": False} for c in body])
        if parts[0] == "interactions" and parts[-1] == "callback":
            self.interaction_callbacks.append(body)
            return _json({"interaction": {"id": parts[1], "type": 2,
                                          "response_message_loading": body.get("type") == 5,
                                          "response_message_ephemeral": True},
                          "resource": None})
        if parts[0] == "webhooks" and parts[-1] == "@original":
            token = parts[2]
            self.original_edits.setdefault(token, []).append(body.get("content", ""))
            self.original_edited.set()
            message = FakeMessage(self.next_id(), 0, [body.get("content", "")], time.monotonic())
            return _json(self._message_payload(message))
        return _json({"message": f"fake: unknown route {request.method} {path}", "code": 0},
                     status=404)

    def _channel_message(self, method: str, channel_id: int, parts: list[str],
                         body: Any) -> web.Response:
        allowed, headers, retry_after = self._take(channel_id)
        if not allowed:
            self.rate_limited += 1
            return _json({"message": "You are being rate limited.", "retry_after": retry_after,
                          "global": False},
                         status=429, headers={**headers, "X-RateLimit-Remaining": "0",
                                              "Retry-After": f"{retry_after:.3f}",
                                              "X-RateLimit-Scope": "user", "Via": "1.1 fake"})
        now = time.monotonic()
        if method == "POST" and len(parts) == 3:
            content = body.get("content", "")
            if len(content) > 2000:
                return _json({"message": "Invalid Form Body", "code": 50035}, status=400)
            message = FakeMessage(self.next_id(), channel_id, [content], now)
            self.messages[message.id] = message
        elif method == "PATCH" and len(parts) == 4:
            message = self.messages[int(parts[3])]
            content = body.get("content", "")
            if len(content) > 2000:
                return _json({"message": "Invalid Form Body", "code": 50035}, status=400)
            message.texts.append(content)
            message.edited_at.append(now)
        else:
            return _json({"message": "fake: unsupported", "code": 0}, status=404)
        self.changed.set()
        return _json(self._message_payload(message), headers=headers)

    async def _cdn(self, request: web.Request) -> web.Response:
        data = self.files.get(request.match_info["id"])
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="application/octet-stream")
