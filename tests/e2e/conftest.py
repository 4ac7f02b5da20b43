"""Browser fixtures of the end-to-end tests: one Debian Chromium per session, driven by
Playwright's async API on pytest-asyncio's session loop; a fresh context (own cookies) per
test; the artefacts directory for screenshots.

Peers (the broker on a real loopback port, the launcher, SimpleSAMLphp, the node OP) are
started per module by the test modules, with the helpers in `tests/e2e/support.py`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, async_playwright

from tests.e2e.support import CHROMIUM, CHROMIUM_ARGS, artifacts_dir

# Records Content-Security-Policy violations the page itself sees (init scripts run before the
# page's own and are not subject to its CSP).
CSP_WATCH = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', function (e) {
  window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI);
});
"""


@dataclass
class Console:
    """Console errors and uncaught exceptions of every page of one context."""

    errors: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        url = message.location.get("url", "")
        # The browser's own favicon probe is not the page's doing (the broker serves none).
        if message.type == "error" and not url.endswith("/favicon.ico"):
            self.errors.append(f"{message.text} @ {url}")

    def on_page_error(self, error: Exception) -> None:
        self.errors.append(f"uncaught: {error}")

    def watch(self, page: Page) -> None:
        page.on("console", self.on_console)
        page.on("pageerror", self.on_page_error)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """$BROKER_TEST_ARTIFACTS, else <repo>/.test-artifacts/e2e (created)."""
    return artifacts_dir()


@pytest_asyncio.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium")
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            await chromium.close()


async def new_context(browser: Browser, console: Console, **options: object) -> BrowserContext:
    context = await browser.new_context(**options)  # type: ignore[arg-type]
    context.set_default_timeout(10_000)
    await context.add_init_script(CSP_WATCH)
    context.on("page", console.watch)
    return context


@pytest.fixture
def console() -> Console:
    return Console()


@pytest_asyncio.fixture
async def context(browser: Browser, console: Console) -> AsyncIterator[BrowserContext]:
    """A fresh browser profile (no cookies) with JavaScript on."""
    ctx = await new_context(browser, console)
    try:
        yield ctx
    finally:
        await ctx.close()


@pytest_asyncio.fixture
async def page(context: BrowserContext) -> Page:
    return await context.new_page()


@pytest_asyncio.fixture
async def nojs_context(browser: Browser, console: Console) -> AsyncIterator[BrowserContext]:
    """A fresh browser profile with JavaScript disabled."""
    ctx = await new_context(browser, console, java_script_enabled=False)
    try:
        yield ctx
    finally:
        await ctx.close()
