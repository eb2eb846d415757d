"""The admin API and the console's access rules, against a running app (real
breakers, SQLite, the openai SDK against the fake, the aiohttp server on port 0).

Who can see what: nobody without the admin token gets any data (no token,
a wrong token, an expired session, a cross-site form post); every change
from the console needs the session's CSRF token.
"""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from adapters.console import Auth, mount
from adapters.console.sources import Sources
from tests.console_service import TOKEN, Service, console_service
from tests.fakes.openai_server import FakeOpenAI, Status, Text

pytestmark = pytest.mark.usefixtures("restore_logging")


def client() -> aiohttp.ClientSession:
    # aiohttp's jar ignores cookies from bare IP hosts unless told (browsers keep them)
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def open_primary(service: Service, fake: FakeOpenAI) -> None:
    fake.script(Status(500), model="primary-model")
    fake.script(Text(("Backup", " here.")), model="backup-model")
    reply = await service.say("hello?")
    assert reply.served_by == "backup" and reply.failures[0].provider == "primary"


async def login(http: aiohttp.ClientSession, url: str) -> str:
    """Log in as the console does; returns the page's CSRF token."""
    async with http.post(f"{url}/login", data={"token": TOKEN}, allow_redirects=True) as r:
        assert r.status == 200
        page = await r.text()
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page[:500]
    return found.group(1)


async def test_api_shows_the_breaker_the_service_opened_and_resets_it(
    tmp_path: Path, openai_fake: FakeOpenAI
) -> None:
    async with console_service(tmp_path, openai_fake) as service, \
            client() as http:
        await open_primary(service, openai_fake)
        async with http.get(f"{service.url}/api/v1/providers", headers=service.headers) as r:
            assert r.status == 200 and r.headers["X-Boternity-Worker"]
            body = await r.json()
        rows = {p["name"]: p for p in body["providers"]}
        assert rows["primary"]["state"] == "open"
        assert rows["primary"]["last_error"] and rows["primary"]["last_error_at"]
        assert (rows["primary"]["failed"], rows["backup"]["served"]) == (1, 1)
        assert rows["backup"]["state"] == "closed"
        assert set(rows["primary"]) >= {"name", "kind", "model", "state", "last_error",
                                        "last_error_at", "cooldown_until", "served", "failed"}
        async with http.post(f"{service.url}/api/v1/providers/primary/reset",
                             headers=service.headers) as r:
            assert r.status == 200 and (await r.json())["state"] == "closed"
        assert service.app.breakers.state("primary") == "closed"
        async with http.post(f"{service.url}/api/v1/providers/nope/reset",
                             headers=service.headers) as r:
            assert r.status == 400 and "unknown provider" in (await r.json())["error"]
        # replies, overview and usage tell the same story
        async with http.get(f"{service.url}/api/v1/replies", headers=service.headers) as r:
            [entry] = (await r.json())["replies"]
        assert entry["served_by"] == "backup" and entry["failovers"] == ["primary"]
        assert entry["cost_usd"] > 0 and "text" not in entry  # never the words
        async with http.get(f"{service.url}/api/v1/overview", headers=service.headers) as r:
            overview = await r.json()
        assert overview["replies"] == 1 and overview["failovers"] == 1
        assert overview["cost_today_usd"] > 0 and overview["bots"][0]["chain"] == \
            ["primary", "backup"]
        async with http.get(f"{service.url}/api/v1/usage", headers=service.headers) as r:
            [line] = (await r.json())["days"]
        assert (line["bot"], line["provider"], line["replies"]) == ("demo", "backup", 1)


async def test_nobody_without_the_token_gets_data(
    tmp_path: Path, openai_fake: FakeOpenAI
) -> None:
    async with console_service(tmp_path, openai_fake) as service, \
            client() as http:
        await service.say("my secret plan", chat="99")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            for path in ("/api/v1/providers", "/api/v1/bots/demo/conversations/99",
                         "/api/v1/replies"):
                async with http.get(service.url + path, headers=headers) as r:
                    assert r.status == 401
                    assert "secret plan" not in await r.text()
            async with http.post(f"{service.url}/api/v1/bots/demo/conversations/99/reset",
                                 headers=headers) as r:
                assert r.status == 401
        # the console without a session: the login page, no data; a POST: refused
        async with http.get(f"{service.url}/conversations?bot=demo&chat=99") as r:
            assert str(r.url).endswith("/login") and "secret plan" not in await r.text()
        async with http.post(f"{service.url}/providers/primary/reset") as r:
            assert r.status == 403
        async with http.post(f"{service.url}/login", data={"token": "wrong"}) as r:
            assert r.status == 401 and "boternity_session" not in r.cookies
        # the history is intact: nothing was reset by the refused calls
        async with http.get(f"{service.url}/api/v1/bots/demo/conversations/99",
                            headers=service.headers) as r:
            assert next(m["content"] for m in (await r.json())["messages"]) == "my secret plan"


async def test_console_changes_need_the_csrf_token_and_the_same_origin(
    tmp_path: Path, openai_fake: FakeOpenAI
) -> None:
    async with console_service(tmp_path, openai_fake) as service, \
            client() as http:
        await open_primary(service, openai_fake)
        for proto, secure in (("http", False), ("https", True)):
            async with aiohttp.ClientSession() as raw, raw.post(
                    f"{service.url}/login", data={"token": TOKEN}, allow_redirects=False,
                    headers={"X-Forwarded-Proto": proto}) as r:
                cookie = r.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert ("Secure" in cookie) is secure  # behind an HTTPS proxy: Secure
        csrf = await login(http, service.url)
        async with http.get(f"{service.url}/providers") as r:
            page = await r.text()
        assert re.search(r'data-provider="primary".*?state-open">open', page, re.S)
        reset = f"{service.url}/providers/primary/reset"
        async with http.post(reset, allow_redirects=False) as r:
            assert r.status == 403  # no CSRF token
        async with http.post(reset, data={"csrf": "forged"}, allow_redirects=False) as r:
            assert r.status == 403
        async with http.post(reset, data={"csrf": csrf}, allow_redirects=False,
                             headers={"Origin": "https://evil.example"}) as r:
            assert r.status == 403  # a cross-site form post
        assert service.app.breakers.state("primary") == "open"
        async with http.post(reset, data={"csrf": csrf}, allow_redirects=False,
                             headers={"Origin": service.url}) as r:
            assert r.status == 303
        assert service.app.breakers.state("primary") == "closed"
        async with http.post(reset, headers={"X-CSRF-Token": csrf, "HX-Request": "true"}) as r:
            assert r.status == 200 and 'id="providers"' in await r.text()  # htmx partial
        # conversations: read, then reset with the token
        async with http.get(f"{service.url}/conversations?bot=demo&chat=7") as r:
            assert "hello?" in await r.text()
        async with http.post(f"{service.url}/conversations/demo/reset",
                             data={"chat": "7"}) as r:
            assert r.status == 403
        async with http.post(f"{service.url}/conversations/demo/reset",
                             data={"chat": "7", "csrf": csrf}) as r:
            assert r.status == 200 and "2 messages removed" in await r.text()
        assert await service.app.messages.history("demo", "7") == []
        for path in ("/", "/usage", "/files", "/memory"):
            async with http.get(service.url + path) as r:
                assert r.status in (200, 400), path  # memory is off here: a clear 400 page
                assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        async with http.get(f"{service.url}/memory") as r:
            assert "long-term memory is not enabled" in await r.text()


async def test_an_expired_session_gets_nothing(tmp_path: Path, openai_fake: FakeOpenAI) -> None:
    async with console_service(tmp_path, openai_fake) as service:
        await service.say("remember the tulips", chat="5")
        sources: Sources = service.app.extras["console"]
        now = [1000.0]
        auth = Auth(SecretStr(TOKEN), ttl_s=60, clock=lambda: now[0])
        web_app = web.Application()
        mount(web_app, sources, auth)
        async with TestServer(web_app, host="127.0.0.1") as server, \
                client() as http:
            url = str(server.make_url("")).rstrip("/")
            csrf = await login(http, url)
            async with http.get(f"{url}/conversations?bot=demo&chat=5") as r:
                assert "remember the tulips" in await r.text()
            now[0] += 61  # the session's lifetime passed
            async with http.get(f"{url}/conversations?bot=demo&chat=5") as r:
                assert str(r.url).endswith("/login")
                assert "remember the tulips" not in await r.text()
            async with http.post(f"{url}/conversations/demo/reset",
                                 data={"chat": "5", "csrf": csrf}) as r:
                assert r.status == 403
        assert len(await service.app.messages.history("demo", "5")) == 2


async def test_without_a_token_the_api_and_console_are_off_and_the_log_says_so(
    tmp_path: Path, openai_fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    async with console_service(tmp_path, openai_fake, token=None) as service, \
            client() as http:
        for path in ("/api/v1/providers", "/", "/login"):
            async with http.get(service.url + path, headers=service.headers) as r:
                assert r.status == 404
        async with http.get(f"{service.url}/healthz") as r:
            assert r.status == 200  # the ops endpoint itself still runs
    said = [r.getMessage() for r in caplog.records if "admin API" in r.getMessage()]
    assert len(said) == 1 and "BOTERNITY_ADMIN_TOKEN" in said[0]
    assert TOKEN not in caplog.text


async def test_files_list_download_delete_only_with_the_token(
    tmp_path: Path, openai_fake: FakeOpenAI
) -> None:
    async with console_service(tmp_path, openai_fake) as service, \
            client() as http:
        from adapters.wiring.platforms import files

        async def chunks():  # type: ignore[no-untyped-def]
            yield b"name,city\nAda,London\n"

        stored = await files(service.app).save(
            bot="demo", platform="telegram", chat="7", uploader="telegram:7",
            name="people.csv", mime_type="text/csv", chunks=chunks())
        base = f"{service.url}/api/v1/bots/demo/files"
        async with http.get(f"{base}/{stored.id}") as r:
            assert r.status == 401 and b"Ada" not in await r.read()
        async with http.get(base, headers=service.headers) as r:
            assert [f["name"] for f in (await r.json())["files"]] == ["people.csv"]
        async with http.get(f"{base}/{stored.id}", headers=service.headers) as r:
            assert await r.read() == b"name,city\nAda,London\n"
            assert r.headers["Content-Disposition"].startswith("attachment")
        async with http.post(f"{base}/{stored.id}/delete", headers=service.headers) as r:
            assert (await r.json())["deleted"] is True
        async with http.get(base, headers=service.headers) as r:
            assert (await r.json())["files"] == []


async def test_memory_per_user_forget_why_and_shared_tamper_status(
    tmp_path: Path, openai_fake: FakeOpenAI
) -> None:
    from tests.test_shared_memory import raw_table

    async with console_service(tmp_path, openai_fake, memory=True) as service, \
            client() as http:
        admin = service.app.memory_admin
        assert admin is not None
        ada = await admin.add("demo", "Ada is vegetarian", user="telegram:7")
        await admin.add("demo", "Grace prefers tea", user="telegram:8")
        await service.say("Am I vegetarian?")
        base = f"{service.url}/api/v1/bots/demo"
        async with http.get(f"{base}/memory?user=telegram:8") as r:
            assert r.status == 401 and "tea" not in await r.text()
        async with http.get(f"{base}/memory?user=telegram:8", headers=service.headers) as r:
            body = await r.json()
        assert [f["text"] for f in body["facts"]] == ["Grace prefers tea"]  # that user's only
        assert body["users"] == ["telegram:7", "telegram:8"]
        async with http.get(f"{base}/memory/search", params={"q": "meat", "user": "telegram:7"},
                            headers=service.headers) as r:
            found = [f["text"] for f in (await r.json())["facts"]]
        assert found == ["Ada is vegetarian"]  # Grace's fact is not searched for Ada
        async with http.get(f"{base}/memory/why?chat=7", headers=service.headers) as r:
            recall = (await r.json())["recall"]
        assert recall["chat"] == "7" and [f["id"] for f in recall["facts"]] == [ada.id]
        async with http.post(f"{base}/memory/{ada.id}/forget", headers=service.headers) as r:
            assert (await r.json())["forgotten"] is True
        assert await admin.store.get("demo", ada.id) is None
        async with http.get(f"{base}/memory/why?chat=7", headers=service.headers) as r:
            assert (await r.json())["recall"]["facts"] == []  # scrubbed from the recall log
        # shared memory: trust level, author; an edit on disk shows as tampered
        grace = (await admin.list_facts("demo", user="telegram:8"))[0]
        published = await admin.publish("demo", grace.id, level="public")
        async with http.get(f"{base}/shared?verify=1", headers=service.headers) as r:
            shared = await r.json()
        [row] = shared["facts"]
        assert (row["trust_level"], row["author_bot"], row["tampered"]) == \
            ("public", "demo", False)
        assert shared["verify"]["ok"] is True
        table = await raw_table(tmp_path / "data" / "lancedb")
        await table.update(updates={"text": "Grace prefers coffee"},
                           where=f"id = '{published.id}'")
        async with http.get(f"{base}/shared?verify=1", headers=service.headers) as r:
            shared = await r.json()
        assert shared["facts"] == []  # hidden from every bot
        assert shared["verify"]["tampered"] == [published.id] and not shared["verify"]["ok"]
        await login(http, service.url)
        async with http.get(f"{service.url}/memory?bot=demo") as r:
            page = await r.text()
        assert "tampered" in page and published.id in page
