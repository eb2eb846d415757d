"""The web console: server-rendered pages (jinja2) at ``/``, a light touch of htmx.

Pages: overview, providers (live breakers, reset, each bot's chain), memory
(search, list with history, forget, why, shared memory with trust and tamper
status), conversations (read, reset), usage (cost per day chart), files.
Every asset is served from ``static/`` inside the package (vendored htmx and
uPlot with their licenses): nothing loads from elsewhere, and the
Content-Security-Policy says so. Every page needs a session (``auth.py``);
every POST needs the session's CSRF token, else 403 and no change.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from adapters.console.api import file_response
from adapters.console.auth import Auth, Session
from adapters.console.sources import Sources
from engine.errors import AdminError, StorageError

HERE = Path(__file__).parent
NAV = (("/", "Overview"), ("/providers", "Providers"), ("/memory", "Memory"),
       ("/conversations", "Conversations"), ("/usage", "Usage"), ("/files", "Files"))
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
Page = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]


class Pages:
    def __init__(self, sources: Sources, auth: Auth) -> None:
        self.s = sources
        self.auth = auth
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)

    def routes(self, app: web.Application) -> None:
        get, post = app.router.add_get, app.router.add_post
        app.router.add_static("/static", HERE / "static", append_version=False)
        get("/login", self.login_form)
        post("/login", self.login)
        post("/logout", self.page(self.logout))
        get("/", self.page(self.overview))
        get("/providers", self.page(self.providers))
        get("/providers/table", self.page(self.providers_table))
        post("/providers/{name}/reset", self.page(self.reset))
        get("/memory", self.page(self.memory))
        post("/memory/{bot}/{id}/forget", self.page(self.forget))
        get("/conversations", self.page(self.conversations))
        post("/conversations/{bot}/reset", self.page(self.reset_chat))
        get("/usage", self.page(self.usage))
        get("/files", self.page(self.files))
        get("/files/{bot}/{id}", self.page(self.download))
        post("/files/{bot}/{id}/delete", self.page(self.delete_file))

    # --- plumbing -------------------------------------------------------------
    def render(self, name: str, status: int = 200, **values: Any) -> web.Response:
        html = self.env.get_template(name).render(nav=NAV, **values)
        response = web.Response(text=html, content_type="text/html", status=status)
        secure(response)
        return response

    def page(self, handler: Page) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            session = self.auth.session(request)
            if session is None:
                if request.method != "GET":
                    return web.Response(status=403, text="log in first")
                return redirect("/login")
            if request.method == "POST" and not await self.auth.change_ok(request, session):
                return web.Response(status=403, text="missing or wrong CSRF token")
            try:
                return await handler(request, session)
            except (AdminError, StorageError) as exc:
                return self.render("base.html", status=400, title="Error", csrf=session.csrf,
                                   error=str(exc), here="")

        return guarded

    def _bot(self, request: web.Request) -> str:
        bots = list(self.s.chains)
        chosen = request.query.get("bot") or (bots[0] if bots else "")
        if chosen not in bots:
            raise AdminError(f"unknown bot '{chosen}'")
        return chosen

    # --- login ----------------------------------------------------------------
    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if self.auth.session(request) is not None:
            return redirect("/")
        return self.render("login.html", title="Log in", csrf="", here="")

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        if not self.auth.token_ok(str(form.get("token", ""))):
            return self.render("login.html", status=401, title="Log in", csrf="", here="",
                               error="That is not the admin token.")
        response = redirect("/")
        self.auth.login(response, request)
        return response

    async def logout(self, request: web.Request, _s: Session) -> web.StreamResponse:
        response = redirect("/login")
        self.auth.logout(request, response)
        return response

    # --- pages ----------------------------------------------------------------
    async def overview(self, _r: web.Request, s: Session) -> web.StreamResponse:
        o = await self.s.overview()
        minutes = [f"-{60 - i}m" for i in range(60)]
        latencies = o["latencies"]
        return self.render(
            "overview.html", title="Overview", csrf=s.csrf, here="/", o=o,
            per_minute={"x": minutes, "series": {"replies": o["per_minute"]}, "kind": "bars",
                        "xlabel": "minute"},
            latency={"x": [str(i + 1) for i in range(len(latencies))],
                     "series": {"latency": latencies}, "kind": "line", "unit": " s",
                     "xlabel": "reply"})

    async def _providers_values(self, s: Session) -> dict[str, Any]:
        providers = await self.s.providers()
        return {"providers": providers, "chains": self.s.chains, "csrf": s.csrf,
                "states": {p["name"]: p["state"] for p in providers}, "worker": self.s.worker}

    async def providers(self, _r: web.Request, s: Session) -> web.StreamResponse:
        return self.render("providers.html", title="Providers", here="/providers",
                           **await self._providers_values(s))

    async def providers_table(self, _r: web.Request, s: Session) -> web.StreamResponse:
        return self.render("providers_table.html", **await self._providers_values(s))

    async def reset(self, request: web.Request, s: Session) -> web.StreamResponse:
        self.s.reset(request.match_info["name"])
        if request.headers.get("HX-Request"):
            return await self.providers_table(request, s)
        return redirect("/providers")

    async def memory(self, request: web.Request, s: Session) -> web.StreamResponse:
        bot = self._bot(request)
        q, chat = request.query.get("q", "").strip(), request.query.get("chat", "").strip()
        user = request.query.get("user") if request.query.get("user") else None
        return self.render(
            "memory.html", title="Memory", csrf=s.csrf, here="/memory", bots=list(self.s.chains),
            bot=bot, user=user, q=q, chat=chat, notice=request.query.get("notice", ""),
            users=await self.s.memory_users(bot),
            found=await self.s.memory_search(bot, q, user) if q else [],
            facts=await self.s.memory_list(bot, user),
            why=await self.s.memory_why(bot, chat) if chat else None,
            shared=await self.s.shared(bot, verify=True))

    async def forget(self, request: web.Request, _s: Session) -> web.StreamResponse:
        bot, fact = request.match_info["bot"], request.match_info["id"]
        done = await self.s.memory_forget(bot, fact)
        form = await request.post()
        query = {"bot": bot, "notice": f"Forgot {fact}." if done else f"No memory {fact}."}
        if form.get("user"):
            query["user"] = str(form["user"])
        return redirect(f"/memory?{urlencode(query)}")

    async def conversations(self, request: web.Request, s: Session) -> web.StreamResponse:
        bot = self._bot(request)
        chat = request.query.get("chat", "")
        admin = self.s.conversations
        return self.render(
            "conversations.html", title="Conversations", csrf=s.csrf, here="/conversations",
            bots=list(self.s.chains), bot=bot, chat=chat, chats=await admin.chats(bot),
            messages=await admin.read(bot, chat) if chat else [],
            notice=request.query.get("notice", ""))

    async def reset_chat(self, request: web.Request, _s: Session) -> web.StreamResponse:
        bot, chat = request.match_info["bot"], str((await request.post()).get("chat", ""))
        removed = await self.s.conversations.reset(bot, chat)
        notice = f"Chat {chat} reset ({removed} messages removed)."
        return redirect(f"/conversations?{urlencode({'bot': bot, 'notice': notice})}")

    async def usage(self, _r: web.Request, s: Session) -> web.StreamResponse:
        chart = await self.s.usage_chart(14)
        return self.render(
            "usage.html", title="Usage", csrf=s.csrf, here="/usage", rows=chart["rows"],
            cost={"x": [d[5:] for d in chart["days"]], "series": chart["series"],
                  "kind": "bars", "unit": " $", "xlabel": "day"})

    async def files(self, request: web.Request, s: Session) -> web.StreamResponse:
        bot = self._bot(request)
        return self.render("files.html", title="Files", csrf=s.csrf, here="/files",
                           bots=list(self.s.chains), bot=bot, files=await self.s.file_list(bot),
                           notice=request.query.get("notice", ""))

    async def download(self, request: web.Request, _s: Session) -> web.StreamResponse:
        found = await self.s.file_get(request.match_info["bot"], _number(request))
        if found is None or not found[1].is_file():
            raise web.HTTPNotFound()
        return file_response(*found)

    async def delete_file(self, request: web.Request, _s: Session) -> web.StreamResponse:
        bot = request.match_info["bot"]
        done = await self.s.file_delete(bot, _number(request))
        notice = "File deleted." if done else "No such file."
        return redirect(f"/files?{urlencode({'bot': bot, 'notice': notice})}")


def _number(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise AdminError("a file id is a number") from None


def redirect(location: str) -> web.Response:
    """303 See Other: after a POST the browser GETs the page (no resubmit on reload)."""
    return web.Response(status=303, headers={"Location": location})


def secure(response: web.StreamResponse) -> None:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" on
    # form posts, and the origin check would refuse the console its own forms.
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
