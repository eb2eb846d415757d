"""The web console in a real headless Chromium (Playwright driving Debian's Chromium).

Scenario: log in, see the provider whose breaker the running service opened,
reset it, search memory, forget a fact, read a conversation, see the usage
chart drawn. Every page is screenshotted (``BOTERNITY_SCREENSHOTS=DIR``
copies them there: that is how docs/console/ was made).

No browser here: skipped with the reason; under ``CI=true`` that is a
failure instead (``deploy/boternity.sh test`` installs Chromium when it can).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.console_service import TOKEN, console_service
from tests.fakes.openai_server import FakeOpenAI, Status, Text

pytestmark = pytest.mark.usefixtures("restore_logging")


def chromium() -> str:
    """The browser's path, or skip (fail under CI) saying why."""
    why = ""
    try:
        import playwright  # noqa: F401
    except ImportError:
        why = "playwright is not installed (pip install -e '.[dev]')"
    found = os.environ.get("BOTERNITY_CHROMIUM") or shutil.which("chromium") or \
        shutil.which("chromium-browser")
    if not why and not found:
        why = "no Chromium (apt-get install chromium, or set BOTERNITY_CHROMIUM)"
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run under CI: {why}")
        pytest.skip(f"browser tests skipped: {why}")
    assert found
    return found


async def shot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    if where := os.environ.get("BOTERNITY_SCREENSHOTS"):
        target = Path(where)
        target.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (a test helper, once per page)
        shutil.copy(path, target / path.name)


async def chart_drawn(page: Any, chart: str) -> bool:
    """The uPlot canvas under ``[data-chart=chart]`` has coloured pixels."""
    await page.wait_for_selector(f'[data-chart="{chart}"] canvas')
    result: bool = await page.evaluate("""(chart) => {
        const c = document.querySelector(`[data-chart="${chart}"] canvas`);
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        for (let i = 3; i < d.length; i += 4) if (d[i] > 0) return true;
        return false; }""", chart)
    return result


async def test_console_scenario_in_a_real_browser(
    tmp_path: Path, openai_fake: FakeOpenAI
) -> None:
    browser_path = chromium()
    from playwright.async_api import async_playwright, expect

    openai_fake.script(Status(500), model="primary-model")
    openai_fake.default = Text(("Noted", ", Ada."), usage=(1200, 300))
    async with console_service(tmp_path, openai_fake, memory=True) as service:
        await service.say("hello? I am Ada and I do not eat meat")
        assert service.app.breakers.state("primary") == "open"
        memory = service.app.memory_admin
        assert memory is not None
        veggie = await memory.add("demo", "Ada is vegetarian", user="telegram:7")
        await memory.add("demo", "Ada lives in London", user="telegram:7")
        await memory.add("demo", "Grace prefers tea", user="telegram:8")

        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=browser_path,
                                              args=["--no-sandbox"])
            page = await browser.new_page(viewport={"width": 1200, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("requestfailed", lambda req: errors.append(req.url))
            await page.goto(f"{service.url}/providers")
            assert page.url.endswith("/login")  # no session: the login page
            await shot(page, tmp_path, "login")
            await page.fill("input[name=token]", TOKEN)
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{service.url}/")
            assert await chart_drawn(page, "per-minute")
            await shot(page, tmp_path, "overview")

            # providers: the breaker the service opened, then reset by hand (htmx)
            await page.goto(f"{service.url}/providers")
            primary = page.locator('tr[data-provider="primary"]')
            await expect(primary.locator(".state")).to_have_text("open")
            await expect(page.locator(".chain .link")).to_have_text(
                ["primary open", "backup closed"])
            await shot(page, tmp_path, "providers")
            await primary.get_by_role("button", name="Reset").click()
            await expect(page.locator('tr[data-provider="primary"] .state')).to_have_text(
                "closed")
            assert service.app.breakers.state("primary") == "closed"

            # memory: search, forget a fact, history and shared status shown
            await page.goto(f"{service.url}/memory?bot=demo")
            await page.fill("input[name=q]", "what does Ada eat?")
            await page.click("form[action='/memory'] button[type=submit]")
            found = page.locator(f'tr[data-fact="{veggie.id}"]').first
            await expect(found).to_contain_text("Ada is vegetarian")
            await shot(page, tmp_path, "memory")
            await found.get_by_role("button", name="Forget").click()
            await expect(page.get_by_role("status")).to_contain_text(f"Forgot {veggie.id}")
            await expect(page.locator(f'tr[data-fact="{veggie.id}"]')).to_have_count(0)
            assert await memory.store.get("demo", veggie.id) is None
            await expect(page.locator("body")).to_contain_text("Grace prefers tea")

            # conversations: read the chat
            await page.goto(f"{service.url}/conversations?bot=demo")
            await page.get_by_role("link", name="7", exact=True).click()
            await expect(page.locator("#messages")).to_contain_text(
                "I am Ada and I do not eat meat")
            await expect(page.locator("#messages")).to_contain_text("served by backup")
            await shot(page, tmp_path, "conversations")

            # usage: the cost chart is drawn
            await page.goto(f"{service.url}/usage")
            assert await chart_drawn(page, "cost")
            assert await page.locator('[data-chart="cost"]').get_attribute("data-drawn") == "yes"
            await shot(page, tmp_path, "usage")
            await page.goto(f"{service.url}/files")
            await shot(page, tmp_path, "files")

            # a phone in dark mode: readable, nothing wider than the screen
            phone = await browser.new_page(viewport={"width": 390, "height": 844},
                                           color_scheme="dark")
            await phone.context.add_cookies(await page.context.cookies())
            await phone.goto(f"{service.url}/")
            assert await chart_drawn(phone, "per-minute")
            background = await phone.evaluate(
                "getComputedStyle(document.body).backgroundColor")
            assert background == "rgb(18, 19, 22)"  # the dark palette
            await shot(phone, tmp_path, "overview-phone-dark")
            overflow = await phone.evaluate(
                "document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0
            await browser.close()
        assert errors == []  # no script error, no asset failed (nothing loads elsewhere)
