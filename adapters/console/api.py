"""The admin API: JSON under ``/api/v1/``, ``Authorization: Bearer <token>``.

    GET  /api/v1/providers                      breakers: state, last error, cooldown, counts
    POST /api/v1/providers/{name}/reset         close a breaker by hand
    GET  /api/v1/bots                           bots, their chains, platforms connected since
    GET  /api/v1/replies?limit=&bot=            recent replies (this worker)
    GET  /api/v1/overview                       replies/min, failovers, latency p50/p95, cost
    GET  /api/v1/usage?days=                    usage per day, bot, provider
    GET  /api/v1/bots/{bot}/memory?user=        facts (history included)
    GET  /api/v1/bots/{bot}/memory/search?q=&user=
    POST /api/v1/bots/{bot}/memory/{id}/forget
    GET  /api/v1/bots/{bot}/memory/why?chat=
    GET  /api/v1/bots/{bot}/shared?verify=1     shared memory the bot may read, tamper status
    GET  /api/v1/bots/{bot}/conversations       chats, most recent first
    GET  /api/v1/bots/{bot}/conversations/{chat}
    POST /api/v1/bots/{bot}/conversations/{chat}/reset
    GET  /api/v1/bots/{bot}/files
    GET  /api/v1/bots/{bot}/files/{id}          the file's bytes
    POST /api/v1/bots/{bot}/files/{id}/delete

Every answer names the ``worker`` that served it in the ``X-Boternity-Worker``
header: replies and counters are per process; breakers (with Redis), usage,
conversations and memory are the shared truth. Errors: 401 without a valid
token (no data), 400 with ``{"error": ...}`` for a bad request, 404 when a
thing does not exist, 503 when a store failed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from adapters.console.auth import Auth
from adapters.console.sources import Sources, plain
from engine.errors import AdminError, StorageError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _int(request: web.Request, key: str, default: int) -> int:
    try:
        return int(request.query.get(key, default))
    except ValueError:
        raise AdminError(f"{key} must be a number") from None


class Api:
    def __init__(self, sources: Sources, auth: Auth) -> None:
        self.s = sources
        self.auth = auth

    def guard(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self.auth.bearer_ok(request):
                return web.json_response({"error": "unauthorized"}, status=401,
                                         headers={"WWW-Authenticate": "Bearer"})
            try:
                response = await handler(request)
            except AdminError as exc:
                response = web.json_response({"error": str(exc)}, status=400)
            except StorageError as exc:
                response = web.json_response({"error": str(exc)}, status=503)
            response.headers["X-Boternity-Worker"] = self.s.worker
            response.headers["Cache-Control"] = "no-store"
            return response

        return guarded

    def routes(self, app: web.Application) -> None:
        get, post = app.router.add_get, app.router.add_post
        g = self.guard
        get("/api/v1/providers", g(self.providers))
        post("/api/v1/providers/{name}/reset", g(self.reset))
        get("/api/v1/bots", g(self.bots))
        get("/api/v1/replies", g(self.replies))
        get("/api/v1/overview", g(self.overview))
        get("/api/v1/usage", g(self.usage))
        get("/api/v1/bots/{bot}/memory", g(self.memory))
        get("/api/v1/bots/{bot}/memory/search", g(self.search))
        get("/api/v1/bots/{bot}/memory/why", g(self.why))
        post("/api/v1/bots/{bot}/memory/{id}/forget", g(self.forget))
        get("/api/v1/bots/{bot}/shared", g(self.shared))
        get("/api/v1/bots/{bot}/conversations", g(self.chats))
        get("/api/v1/bots/{bot}/conversations/{chat}", g(self.chat))
        post("/api/v1/bots/{bot}/conversations/{chat}/reset", g(self.reset_chat))
        get("/api/v1/bots/{bot}/files", g(self.files))
        get("/api/v1/bots/{bot}/files/{id}", g(self.download))
        post("/api/v1/bots/{bot}/files/{id}/delete", g(self.delete_file))

    @staticmethod
    def _json(data: Any, status: int = 200) -> web.Response:
        return web.json_response(data, status=status)

    async def providers(self, _r: web.Request) -> web.Response:
        return self._json({"worker": self.s.worker, "providers": await self.s.providers()})

    async def reset(self, r: web.Request) -> web.Response:
        return self._json(self.s.reset(r.match_info["name"]))

    async def bots(self, _r: web.Request) -> web.Response:
        return self._json(await self.s.bots())

    async def replies(self, r: web.Request) -> web.Response:
        return self._json({"worker": self.s.worker, "replies": self.s.recent(
            _int(r, "limit", 50), r.query.get("bot") or None)})

    async def overview(self, _r: web.Request) -> web.Response:
        return self._json(await self.s.overview())

    async def usage(self, r: web.Request) -> web.Response:
        return self._json({"days": await self.s.usage_days(_int(r, "days", 14))})

    async def memory(self, r: web.Request) -> web.Response:
        bot, user = r.match_info["bot"], r.query.get("user")
        return self._json({"users": await self.s.memory_users(bot),
                           "facts": await self.s.memory_list(bot, user)})

    async def search(self, r: web.Request) -> web.Response:
        return self._json({"facts": await self.s.memory_search(
            r.match_info["bot"], r.query.get("q", ""), r.query.get("user") or None)})

    async def why(self, r: web.Request) -> web.Response:
        return self._json({"recall": await self.s.memory_why(
            r.match_info["bot"], r.query.get("chat"))})

    async def forget(self, r: web.Request) -> web.Response:
        done = await self.s.memory_forget(r.match_info["bot"], r.match_info["id"])
        return self._json({"forgotten": done}, 200 if done else 404)

    async def shared(self, r: web.Request) -> web.Response:
        return self._json(await self.s.shared(r.match_info["bot"],
                                              verify=r.query.get("verify") == "1"))

    async def chats(self, r: web.Request) -> web.Response:
        chats = await self.s.conversations.chats(r.match_info["bot"])
        return self._json({"chats": plain(chats)})

    async def chat(self, r: web.Request) -> web.Response:
        messages = await self.s.conversations.read(r.match_info["bot"], r.match_info["chat"])
        return self._json({"messages": plain(messages)})

    async def reset_chat(self, r: web.Request) -> web.Response:
        removed = await self.s.conversations.reset(r.match_info["bot"], r.match_info["chat"])
        return self._json({"removed": removed})

    async def files(self, r: web.Request) -> web.Response:
        return self._json({"files": await self.s.file_list(r.match_info["bot"])})

    async def download(self, r: web.Request) -> web.StreamResponse:
        found = await self.s.file_get(r.match_info["bot"], _file_id(r))
        if found is None or not found[1].is_file():
            return self._json({"error": "no such file"}, 404)
        return file_response(*found)

    async def delete_file(self, r: web.Request) -> web.Response:
        done = await self.s.file_delete(r.match_info["bot"], _file_id(r))
        return self._json({"deleted": done}, 200 if done else 404)


def _file_id(r: web.Request) -> int:
    try:
        return int(r.match_info["id"])
    except ValueError:
        raise AdminError("a file id is a number") from None


def file_response(stored: Any, path: Any) -> web.FileResponse:
    """The bytes as an attachment (never rendered inline: it is user content)."""
    response = web.FileResponse(path, headers={
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f'attachment; filename="{_safe(stored.name)}"',
        "X-Content-Type-Options": "nosniff"})
    return response


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._- " else "_" for c in name)[:200] or "file"
