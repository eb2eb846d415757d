"""A fake Slack (Web API + Socket Mode + file hosting) for the REAL slack-sdk / bolt.

Point the SDK at it with ``AsyncWebClient(token=..., base_url=fake.api_base)``
(the trailing slash of ``api_base`` matters). One route ``* /api/{method}``
merges query string, form and JSON bodies, like Slack does.

- ``auth.test``, ``apps.connections.open`` (returns this fake's websocket),
  ``chat.postMessage``, ``chat.update``, ``files.info``, ``users.info``,
  ``conversations.history`` and ``conversations.replies`` (the bot's messages).
- ``lose_post_answers = N`` posts the next N messages but answers only after
  ``lost_answer_delay_s`` (longer than the client's timeout): a timed-out
  post that landed.
- Socket Mode: ``push(type, payload)`` sends an envelope to the connected
  client and returns its ack (the ``payload`` of the ack, e.g. a slash
  command's text).
- Files: ``add_file`` hosts bytes at a ``url_private`` that demands the bot
  token as ``Authorization: Bearer``; ``files.info`` returns it.
- ``response_url`` for slash commands: ``POST /respond/{id}``, recorded in
  ``responses``.

Rate limits like Slack's: ``chat.postMessage`` 1 per second per channel
("short bursts allowed": a token bucket of ``post_burst``); ``chat.update``
Tier 3 (``update_limit`` per ``update_window_s`` per workspace, a fixed
window, 50/min by default). Past a limit: HTTP 429, ``Retry-After``
(whole seconds, as Slack sends) and ``{"ok": false, "error": "ratelimited"}``;
each counted in ``rate_limited``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import WSMsgType, web

from tests.fakes.serve import serve, wait_until

BOT_TOKEN = "xoxb-fake-bot-token"
APP_TOKEN = "xapp-fake-app-token"
BOT_USER = "UBOT0000001"
TEAM = "T00000001"


@dataclass
class FakeMessage:
    """A message the bot posted, with every text it had (``texts[-1]`` is current)."""

    channel: str
    ts: str
    texts: list[str]
    thread_ts: str | None
    sent_at: float
    edited_at: list[float] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.texts[-1]

    @property
    def edits(self) -> int:
        return len(self.texts) - 1


class _Window:
    """A fixed-window counter: ``limit`` uses per ``window_s`` per key."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit, self.window_s = limit, window_s
        self._state: dict[str, tuple[float, int]] = {}

    def take(self, key: str) -> float:
        """0 when allowed (and counted), else the seconds until the window resets."""
        now = time.monotonic()
        start, used = self._state.get(key, (now, 0))
        if now - start >= self.window_s:
            start, used = now, 0
        if used >= self.limit:
            return start + self.window_s - now
        self._state[key] = (start, used + 1)
        return 0.0


class _Bucket:
    """A token bucket per key: ``rate`` per second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """0 when allowed (and spent), else the seconds until a token is back."""
        now = time.monotonic()
        tokens, at = self._state.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._state[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._state[key] = (tokens - 1.0, now)
        return 0.0


class FakeSlack:
    """In-process fake of Slack's Web API and Socket Mode; ``async with`` it."""

    def __init__(self, *, post_limit: int = 1, post_window_s: float = 1.0, post_burst: int = 2,
                 update_limit: int = 50, update_window_s: float = 60.0,
                 admins: tuple[str, ...] = ()) -> None:
        self.messages: dict[str, FakeMessage] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.rate_limited = 0
        self.responses: list[dict[str, Any]] = []
        self.responded = asyncio.Event()
        self.changed = asyncio.Event()
        self.connected = asyncio.Event()
        self.files: dict[str, dict[str, Any]] = {}
        self.file_bytes: dict[str, bytes] = {}
        self.downloads: list[str] = []  # Authorization headers seen on downloads
        self.admins = set(admins)
        self._post = _Bucket(post_limit / post_window_s, post_burst)
        self._update = _Window(update_limit, update_window_s)
        self._last_ts = 0.0
        self.lose_post_answers = 0  # post the next N messages but answer too late
        self.lost_answer_delay_s = 3.0
        self._ids = itertools.count(1)
        self._socket: web.WebSocketResponse | None = None
        self._acks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle ---------------------------------------------------------
    async def __aenter__(self) -> FakeSlack:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_route("GET", "/socket", self._socket_mode)
        app.router.add_route("GET", "/files-pri/{id}/{name}", self._download)
        app.router.add_route("POST", "/respond/{id}", self._respond)
        self._runner, self.port = await serve(app)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._socket is not None:
            await self._socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.url}/api/"

    # --- what tests use ----------------------------------------------------
    def add_file(self, name: str, data: bytes, mimetype: str) -> dict[str, Any]:
        """Host a file; returns the (short) file object a message event carries."""
        file_id = f"F{next(self._ids):08d}"
        self.file_bytes[file_id] = data
        self.files[file_id] = {
            "id": file_id, "name": name, "title": name, "mimetype": mimetype,
            "size": len(data), "url_private": f"{self.url}/files-pri/{file_id}/download",
            "url_private_download": f"{self.url}/files-pri/{file_id}/download",
        }
        # Slack's message events may carry only the id of a file: the app asks files.info.
        return {"id": file_id, "name": name, "mimetype": mimetype, "size": len(data)}

    def response_url(self) -> str:
        return f"{self.url}/respond/{next(self._ids)}"

    def in_channel(self, channel: str) -> list[FakeMessage]:
        return [m for m in self.messages.values() if m.channel == channel]

    def calls_of(self, method: str) -> list[dict[str, Any]]:
        return [args for name, args in self.calls if name == method]

    async def push(self, kind: str, payload: dict[str, Any], *,
                   retry_attempt: int = 0, within_s: float = 30.0) -> dict[str, Any]:
        """Send a Socket Mode envelope; returns the ack's payload ({} when none)."""
        await asyncio.wait_for(self.connected.wait(), within_s)
        assert self._socket is not None
        envelope_id = f"env-{next(self._ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._acks[envelope_id] = future
        await self._socket.send_str(json.dumps({
            "envelope_id": envelope_id, "type": kind, "payload": payload,
            "accepts_response_payload": kind != "events_api",
            "retry_attempt": retry_attempt, "retry_reason": "timeout" if retry_attempt else "",
        }))
        ack = await asyncio.wait_for(future, within_s)
        return dict(ack.get("payload") or {})

    async def wait_for(self, predicate: Any, within_s: float = 30.0) -> None:
        """Wait until ``predicate()`` holds, woken by every post, update and response."""
        await wait_until(self.changed, predicate, within_s)

    # --- Web API -----------------------------------------------------------
    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args: dict[str, Any] = dict(request.query)
        raw = await request.read()
        if raw:
            if request.content_type == "application/json":
                args.update(json.loads(raw))
            else:
                args.update(parse_qsl(raw.decode()))
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        args.setdefault("token", token)
        self.calls.append((method, args))
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return web.json_response({"ok": False, "error": "unknown_method"})
        result = handler(args)
        if method == "chat.postMessage" and self.lose_post_answers > 0:
            self.lose_post_answers -= 1
            await asyncio.sleep(self.lost_answer_delay_s)  # applied, answered too late
        if isinstance(result, web.Response):
            return result
        return web.json_response({"ok": True, **result})

    def _ratelimited(self, wait_s: float) -> web.Response:
        self.rate_limited += 1
        return web.json_response({"ok": False, "error": "ratelimited"}, status=429,
                                 headers={"Retry-After": str(max(1, math.ceil(wait_s)))})

    def _m_auth_test(self, args: dict[str, Any]) -> dict[str, Any] | web.Response:
        if args["token"] != BOT_TOKEN:
            return web.json_response({"ok": False, "error": "invalid_auth"})
        return {"url": f"{self.url}/", "team": "Fake", "user": "boternity", "team_id": TEAM,
                "user_id": BOT_USER, "bot_id": "B00000001", "is_enterprise_install": False}

    def _m_apps_connections_open(self, args: dict[str, Any]) -> dict[str, Any] | web.Response:
        if args["token"] != APP_TOKEN:
            return web.json_response({"ok": False, "error": "invalid_auth"})
        return {"url": f"ws://127.0.0.1:{self.port}/socket"}

    def _m_chat_postMessage(self, args: dict[str, Any]) -> dict[str, Any] | web.Response:
        channel = str(args["channel"])
        wait_s = self._post.take(channel)
        if wait_s:
            return self._ratelimited(wait_s)
        # Slack's ts is its clock (unique per channel): conversations.history's oldest uses it.
        self._last_ts = max(time.time(), self._last_ts + 1e-6)
        ts = f"{self._last_ts:.6f}"
        text = str(args.get("text", ""))
        if len(text) > 40000:
            return web.json_response({"ok": False, "error": "msg_too_long"})
        self.messages[ts] = FakeMessage(channel, ts, [text], args.get("thread_ts"),
                                        time.monotonic())
        self.changed.set()
        return {"channel": channel, "ts": ts, "message": {"type": "message", "text": text,
                                                          "user": BOT_USER, "ts": ts}}

    def _m_chat_update(self, args: dict[str, Any]) -> dict[str, Any] | web.Response:
        wait_s = self._update.take(TEAM)
        if wait_s:
            return self._ratelimited(wait_s)
        message = self.messages.get(str(args["ts"]))
        if message is None or message.channel != str(args["channel"]):
            return web.json_response({"ok": False, "error": "message_not_found"})
        text = str(args.get("text", ""))
        if len(text) > 40000:
            return web.json_response({"ok": False, "error": "msg_too_long"})
        message.texts.append(text)
        message.edited_at.append(time.monotonic())
        self.changed.set()
        return {"channel": message.channel, "ts": message.ts, "text": text}

    def _history(self, args: dict[str, Any], thread: str | None) -> dict[str, Any]:
        oldest = float(args.get("oldest") or 0)
        found = [m for m in self.messages.values() if m.channel == str(args["channel"])
                 and float(m.ts) > oldest and (thread is None or m.thread_ts == thread)]
        return {"messages": [{"type": "message", "ts": m.ts, "text": m.text, "user": BOT_USER,
                              "bot_id": "B00000001", "thread_ts": m.thread_ts}
                             for m in reversed(found)]}  # newest first, as Slack

    def _m_conversations_history(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._history(args, None)

    def _m_conversations_replies(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._history(args, str(args["ts"]))

    def _m_files_info(self, args: dict[str, Any]) -> dict[str, Any] | web.Response:
        file = self.files.get(str(args.get("file")))
        if file is None:
            return web.json_response({"ok": False, "error": "file_not_found"})
        return {"file": file}

    def _m_users_info(self, args: dict[str, Any]) -> dict[str, Any] | web.Response:
        user = str(args.get("user"))
        admin = user in self.admins
        return {"user": {"id": user, "name": user.lower(), "is_bot": False,
                         "is_admin": admin, "is_owner": False}}

    # --- files, response_url, Socket Mode ----------------------------------
    async def _download(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        self.downloads.append(auth)
        if auth != f"Bearer {BOT_TOKEN}":
            # Slack answers an HTML login page, not an error status.
            return web.Response(text="<html>sign in</html>", content_type="text/html")
        data = self.file_bytes.get(request.match_info["id"])
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type=self.files[request.match_info["id"]]
                            ["mimetype"])

    async def _respond(self, request: web.Request) -> web.Response:
        self.responses.append(await request.json())
        self.responded.set()
        self.changed.set()
        return web.Response(text="ok")

    async def _socket_mode(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._socket = ws
        await ws.send_str(json.dumps({"type": "hello", "num_connections": 1,
                                      "connection_info": {"app_id": "A00000001"}}))
        self.connected.set()
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                ack = json.loads(msg.data)
                future = self._acks.pop(str(ack.get("envelope_id")), None)
                if future is not None and not future.done():
                    future.set_result(ack)
        finally:
            self.connected.clear()
            if self._socket is ws:
                self._socket = None
        return ws
