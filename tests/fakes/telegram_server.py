"""A fake Telegram Bot API server for the real python-telegram-bot.

An in-process aiohttp app on 127.0.0.1, port 0. Point the library at it with
``Application.builder().base_url(f"{fake.url}/bot").base_file_url(f"{fake.url}/file/bot")``
(or our ``api_base_url = fake.url``). Calls arrive as ``POST /bot{token}/{method}``
(form-urlencoded or multipart; non-string values are JSON strings), downloads
as ``GET /file/bot{token}/{path}``.

It ENFORCES Telegram's limits and answers ``429`` with ``retry_after`` (an
integer number of seconds, as Telegram does) when one is exceeded:

- one chat: a send or edit at least ``dm_gap_s`` (1.0 s) after the previous
  one in a private chat, ``group_gap_s`` (3.0 s) in a group, and at most 20
  per minute in a group;
- the whole bot: at most 30 sends/edits in any one second;
- text: 1..4096 UTF-16 units, else 400 (``message is too long`` / ``text is empty``);
- editing to the same text and entities: 400 ``message is not modified``.
- a private chat the person never wrote in: 403 ``Forbidden: bot can't
  initiate conversation with a user`` (a bot cannot DM someone first).

``lose_edit_answers = N`` applies the next N edits but answers only after
``lost_answer_delay_s`` (longer than the client's timeout): a timed-out edit
that did land, the case that must never produce a second copy.

Tests drive it with ``push_message(...)`` (becomes an update for the long
poll), ``add_file(...)`` (for getFile + download), and read ``messages``
(what each chat shows, with edit counts and times), ``calls``, ``count_429``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.serve import serve, wait_until

BOT_ID = 1000


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


@dataclass
class SentMessage:
    chat_id: int
    message_id: int
    text: str
    entities: list[dict[str, Any]]
    reply_to: int | None
    sent_at: float
    edits: int = 0
    last_edit_at: float | None = None
    history: list[str] = field(default_factory=list)


class FakeTelegram:
    """State and handlers of the fake (see module docstring)."""

    def __init__(self, token: str = "123:TEST", *, bot_username: str = "demo_bot",
                 dm_gap_s: float = 1.0, group_gap_s: float = 3.0,
                 group_per_minute: int = 20, global_per_second: int = 30) -> None:
        self.token = token
        self.bot_username = bot_username
        self.dm_gap_s, self.group_gap_s = dm_gap_s, group_gap_s
        self.group_per_minute, self.global_per_second = group_per_minute, global_per_second
        self.url = ""
        self.updates: list[dict[str, Any]] = []
        self._new_update = asyncio.Event()
        self._closing = False
        self._ids = itertools.count(1)
        self._update_ids = itertools.count(1)
        self.messages: dict[tuple[int, int], SentMessage] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.count_429 = 0
        self.lose_edit_answers = 0  # apply the next N edits but answer too late
        self.lost_answer_delay_s = 3.0
        self.limit_hits: Counter[str] = Counter()  # which limit each 429 enforced
        self.commands: list[dict[str, Any]] | None = None
        self.webhook: dict[str, Any] | None = None  # what setWebhook registered
        self.files: dict[str, tuple[str, bytes]] = {}  # file_id -> (path, bytes)
        self.chat_admins: dict[int, set[int]] = defaultdict(set)
        self.chat_types: dict[int, str] = {}
        self._ops: dict[int, deque[float]] = defaultdict(deque)  # per chat op times
        self._all_ops: deque[float] = deque()
        self.pushed_at: dict[tuple[int, int], float] = {}  # (chat, user msg id) -> time
        self._changed = asyncio.Event()

    # ---------------------------------------------------------- test driving

    def push_message(
        self, chat_id: int, text: str = "", *, user_id: int = 7, chat_type: str = "private",
        username: str = "alice", is_bot: bool = False, mention: bool = False,
        reply_to_bot: bool = False, document: dict[str, Any] | None = None,
        caption: str | None = None, photo: list[dict[str, Any]] | None = None,
        sender_chat: dict[str, Any] | None = None,
        **fields: Any,
    ) -> int:
        """Queue an update carrying a user message (for getUpdates); returns its message_id.

        ``fields`` are more Message fields as the Bot API sends them
        (``voice={...}``, ``sticker={...}``, ``location={...}``).
        """
        update = self.make_update(
            chat_id, text, user_id=user_id, chat_type=chat_type, username=username,
            is_bot=is_bot, mention=mention, reply_to_bot=reply_to_bot, document=document,
            caption=caption, photo=photo, sender_chat=sender_chat, **fields)
        self.updates.append(update)
        self._new_update.set()
        return int(update["message"]["message_id"])

    def make_update(
        self, chat_id: int, text: str = "", *, user_id: int = 7, chat_type: str = "private",
        username: str = "alice", is_bot: bool = False, mention: bool = False,
        reply_to_bot: bool = False, document: dict[str, Any] | None = None,
        caption: str | None = None, photo: list[dict[str, Any]] | None = None,
        sender_chat: dict[str, Any] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """An update carrying a user message (what getUpdates or a webhook delivers).

        ``sender_chat``: posted on behalf of a chat (a channel, an anonymous
        group admin, an automatic forward); ``user_id`` is then Telegram's
        placeholder account (136817688, 1087968824 or 777000).
        """
        self.chat_types[chat_id] = chat_type
        if mention:
            text = f"@{self.bot_username} {text}"
        message_id = next(self._ids)
        message: dict[str, Any] = {
            "message_id": message_id, "date": int(time.time()),
            "chat": {"id": chat_id, "type": chat_type,
                     **({"title": f"group {chat_id}"} if chat_type != "private" else
                        {"first_name": username})},
            "from": {"id": user_id, "is_bot": is_bot, "first_name": username,
                     "username": username},
        }
        if text:
            message["text"] = text
            entities = []
            if mention:
                entities.append({"type": "mention", "offset": 0,
                                 "length": len(self.bot_username) + 1})
            if text.startswith("/"):
                entities.append({"type": "bot_command", "offset": 0,
                                 "length": len(text.split(" ", 1)[0])})
            if entities:
                message["entities"] = entities
        if sender_chat is not None:
            message["sender_chat"] = sender_chat
        if caption is not None:
            message["caption"] = caption
        if document is not None:
            message["document"] = document
        if photo is not None:
            message["photo"] = photo
        message.update(fields)
        if reply_to_bot:
            message["reply_to_message"] = {
                "message_id": 999_999, "date": int(time.time()),
                "chat": message["chat"],
                "from": {"id": BOT_ID, "is_bot": True, "first_name": "Demo",
                         "username": self.bot_username},
                "text": "an earlier answer"}
        self.pushed_at[(chat_id, message_id)] = time.monotonic()
        return {"update_id": next(self._update_ids), "message": message}

    def add_file(self, file_id: str, data: bytes, path: str = "documents/file") -> None:
        self.files[file_id] = (path, data)

    def in_chat(self, chat_id: int) -> list[SentMessage]:
        return sorted((m for (c, _), m in self.messages.items() if c == chat_id),
                      key=lambda m: m.message_id)

    async def wait_for(self, predicate: Any, limit_s: float = 60.0) -> None:
        """Wait until ``predicate()`` holds (re-checked after each API call)."""
        await wait_until(self._changed, predicate, limit_s)

    def calls_of(self, method: str) -> list[dict[str, Any]]:
        return [params for name, params in self.calls if name == method]

    # ------------------------------------------------------------- limits

    def _limit(self, chat_id: int) -> int | None:
        """Seconds to wait if an op in ``chat_id`` now would break a limit, else None."""
        now = time.monotonic()
        ops = self._ops[chat_id]
        while ops and now - ops[0] > 60:
            ops.popleft()
        while self._all_ops and now - self._all_ops[0] > 1:
            self._all_ops.popleft()
        group = self.chat_types.get(chat_id, "private") != "private"
        gap = self.group_gap_s if group else self.dm_gap_s
        waits = []
        if ops and now - ops[-1] < gap:
            waits.append(gap - (now - ops[-1]))
            self.limit_hits["chat gap"] += 1
        if group and len(ops) >= self.group_per_minute:
            waits.append(60 - (now - ops[0]))
            self.limit_hits["group per minute"] += 1
        if len(self._all_ops) >= self.global_per_second:
            waits.append(1 - (now - self._all_ops[0]))
            self.limit_hits["bot per second"] += 1
        if waits:
            return max(1, math.ceil(max(waits)))
        ops.append(now)
        self._all_ops.append(now)
        return None

    # ----------------------------------------------------------- handlers

    async def _params(self, request: web.Request) -> dict[str, Any]:
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            raw = {k: v for k, v in form.items() if isinstance(v, str)}
        elif request.content_type == "application/json":
            raw = await request.json()
        else:
            raw = dict(await request.post()) if request.can_read_body else {}
        params: dict[str, Any] = {}
        for key, value in raw.items():
            if isinstance(value, str) and value[:1] in "[{" :
                with suppress(ValueError):
                    value = json.loads(value)
            params[key] = value
        return params

    async def api(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        method = request.match_info["method"]
        params = await self._params(request)
        self.calls.append((method, params))
        handler = getattr(self, f"_m_{method}", None)
        try:
            if handler is None:
                return _error(404, "Not Found: method not found")
            return await handler(params)
        finally:
            self._changed.set()

    async def _m_getMe(self, p: dict[str, Any]) -> web.Response:
        return _ok({"id": BOT_ID, "is_bot": True, "first_name": "Demo",
                    "username": self.bot_username, "can_join_groups": True,
                    "can_read_all_group_messages": False, "supports_inline_queries": False})

    async def _m_deleteWebhook(self, p: dict[str, Any]) -> web.Response:
        return _ok(True)

    async def _m_setMyCommands(self, p: dict[str, Any]) -> web.Response:
        self.commands = p.get("commands")
        return _ok(True)

    async def _m_setWebhook(self, p: dict[str, Any]) -> web.Response:
        self.webhook = {"url": p.get("url"), "secret_token": p.get("secret_token")}
        return _ok(True)

    async def _m_sendChatAction(self, p: dict[str, Any]) -> web.Response:
        return _ok(True)

    async def _m_getChatMember(self, p: dict[str, Any]) -> web.Response:
        chat, user = int(p["chat_id"]), int(p["user_id"])
        status = "administrator" if user in self.chat_admins[chat] else "member"
        member: dict[str, Any] = {
            "status": status,
            "user": {"id": user, "is_bot": False, "first_name": "u"}}
        if status == "administrator":
            member.update({key: False for key in (
                "can_be_edited", "is_anonymous", "can_manage_chat", "can_delete_messages",
                "can_manage_video_chats", "can_restrict_members", "can_promote_members",
                "can_change_info", "can_invite_users", "can_post_stories",
                "can_edit_stories", "can_delete_stories")})
        return _ok(member)

    async def _m_getUpdates(self, p: dict[str, Any]) -> web.Response:
        offset = int(p.get("offset", 0) or 0)
        timeout = float(p.get("timeout", 0) or 0)
        self.updates = [u for u in self.updates if u["update_id"] >= offset]
        if not self.updates and timeout > 0 and not self._closing:
            self._new_update.clear()
            with suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._new_update.wait()
        return _ok(list(self.updates[:100]))

    def _check_text(self, text: str) -> web.Response | None:
        if not text.strip():
            return _error(400, "Bad Request: message text is empty")
        if utf16_len(text) > 4096:
            return _error(400, "Bad Request: message is too long")
        return None

    async def _m_sendMessage(self, p: dict[str, Any]) -> web.Response:
        chat_id, text = int(p["chat_id"]), str(p.get("text", ""))
        if (bad := self._check_text(text)) is not None:
            return bad
        if chat_id > 0 and chat_id not in self.chat_types:
            # Like Telegram: a bot writes to a person only after they wrote to it.
            return _error(403, "Forbidden: bot can't initiate conversation with a user")
        if (wait := self._limit(chat_id)) is not None:
            return self._too_many(wait)
        reply = p.get("reply_parameters") or {}
        message = SentMessage(chat_id, next(self._ids), text, p.get("entities") or [],
                              reply.get("message_id") if isinstance(reply, dict) else None,
                              time.monotonic(), history=[text])
        self.messages[(chat_id, message.message_id)] = message
        return _ok(self._message_json(message))

    async def _m_editMessageText(self, p: dict[str, Any]) -> web.Response:
        chat_id, message_id = int(p["chat_id"]), int(p["message_id"])
        text = str(p.get("text", ""))
        message = self.messages.get((chat_id, message_id))
        if message is None:
            return _error(400, "Bad Request: message to edit not found")
        if (bad := self._check_text(text)) is not None:
            return bad
        entities = p.get("entities") or []
        if text == message.text and entities == message.entities:
            return _error(400, "Bad Request: message is not modified: specified new message "
                               "content and reply markup are exactly the same")
        if (wait := self._limit(chat_id)) is not None:
            return self._too_many(wait)
        message.text, message.entities = text, entities
        message.edits += 1
        message.last_edit_at = time.monotonic()
        message.history.append(text)
        if self.lose_edit_answers > 0:
            # The edit is applied, but the answer never reaches the client in time.
            self.lose_edit_answers -= 1
            await asyncio.sleep(self.lost_answer_delay_s)
        return _ok(self._message_json(message))

    async def _m_getFile(self, p: dict[str, Any]) -> web.Response:
        file_id = str(p["file_id"])
        if file_id not in self.files:
            return _error(400, "Bad Request: invalid file_id")
        path, data = self.files[file_id]
        return _ok({"file_id": file_id, "file_unique_id": f"u{file_id}",
                    "file_size": len(data), "file_path": path})

    async def download(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return web.Response(status=401)
        path = request.match_info["path"]
        for stored_path, data in self.files.values():
            if stored_path == path:
                return web.Response(body=data, content_type="application/octet-stream")
        return web.Response(status=404)

    def _too_many(self, wait: int) -> web.Response:
        self.count_429 += 1
        return web.json_response({
            "ok": False, "error_code": 429,
            "description": f"Too Many Requests: retry after {wait}",
            "parameters": {"retry_after": wait}}, status=429)

    def _message_json(self, m: SentMessage) -> dict[str, Any]:
        chat_type = self.chat_types.get(m.chat_id, "private")
        return {
            "message_id": m.message_id, "date": int(time.time()),
            "chat": {"id": m.chat_id, "type": chat_type},
            "from": {"id": BOT_ID, "is_bot": True, "first_name": "Demo",
                     "username": self.bot_username},
            "text": m.text, **({"entities": m.entities} if m.entities else {}),
        }

    def close(self) -> None:
        """Release any open long-poll (the library's updater.stop() waits for it)."""
        self._closing = True
        self._new_update.set()


def _ok(result: Any) -> web.Response:
    return web.json_response({"ok": True, "result": result})


def _error(code: int, description: str) -> web.Response:
    return web.json_response({"ok": False, "error_code": code, "description": description},
                             status=code)


@asynccontextmanager
async def start_telegram_fake(**kwargs: Any) -> AsyncIterator[FakeTelegram]:
    fake = FakeTelegram(**kwargs)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/bot{token}/{method}", fake.api)
    app.router.add_get("/file/bot{token}/{path:.+}", fake.download)
    runner, port = await serve(app, shutdown_timeout=0.5)
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        fake.close()
        await runner.cleanup()
