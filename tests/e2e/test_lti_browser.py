"""An LTI 1.3 launch in a real browser (Chromium through Playwright), end to end:

course link at the platform (`lti1p3platform`, on another site: localhost) -> the broker's
login initiation -> the platform's auth endpoint -> its cross-site auto-POST of the id_token
to the broker's launch URL (parked and resumed by the hand-off, which brings the SameSite=Lax
flow cookie) -> signed in -> the broker auto-POSTs a launch ticket to the notebook launch URL
at the launcher, which verifies it against the broker's JWKS. Then the broker's start page shows
the browser signed in, with the course groups.
"""

from __future__ import annotations

import html
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from playwright.async_api import Page, expect

from tests.e2e.conftest import Console
from tests.e2e.support import free_port, needs_chromium, serve, verify_broker_jwt
from tests.peers.lti_platform import (
    INSTRUCTOR,
    LEARNER,
    LtiPlatform,
    LtiPlatforms,
    LtiTool,
    Scenario,
    run_lti_tool,
)

pytestmark = needs_chromium


@dataclass
class NotebookLauncher:
    """Receives the broker's launch ticket at its notebook launch URLs; shows who launched."""

    url: str
    broker_url: str = ""
    tickets: list[dict[str, Any]] = field(default_factory=list)
    fields: list[list[str]] = field(default_factory=list)

    async def launch(self, request: web.Request) -> web.Response:
        form = await request.post()
        ticket = form.get("lti_ticket")
        if not isinstance(ticket, str):
            return web.Response(status=400, text="no ticket")
        claims = await verify_broker_jwt(self.broker_url, ticket, audience=self.url)
        if claims["target_link_uri"] != str(request.url):
            return web.Response(status=400, text="ticket for another URL")
        self.tickets.append(claims)
        self.fields.append(sorted(form))
        repo = claims["lti"]["custom"].get("repo", "")
        return web.Response(
            text="<!doctype html><html lang=en><title>Notebook</title><link rel=icon href=data:,>"
            f"<h1>Launching {html.escape(repo)}</h1>"
            f'<p id="who">{html.escape(claims["name"])}</p>',
            content_type="text/html",
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v2/gh/{owner}/{repo}/{ref}", self.launch)
        return app


@dataclass
class Env:
    tool: LtiTool
    lms: LtiPlatform
    launcher: NotebookLauncher
    target: str


@pytest_asyncio.fixture(scope="module")
async def env(
    tmp_path_factory: pytest.TempPathFactory,
    lti_vault: tuple[Any, Any],
    lti_platforms: LtiPlatforms,
) -> AsyncIterator[Env]:
    lms = lti_platforms.start("lmse2e", host="localhost")
    port = free_port()
    launcher = NotebookLauncher(url=f"http://127.0.0.1:{port}")
    target = f"{launcher.url}/v2/gh/course/week1/HEAD"
    async with (
        run_lti_tool(tmp_path_factory.mktemp("e2e-lti"), lti_vault, {"lms": lms}, [target]) as tool,
        serve(launcher.app(), port),
    ):
        launcher.broker_url = tool.url
        yield Env(tool, lms, launcher, target)


async def test_course_link_lands_signed_in_at_the_notebook(
    env: Env, page: Page, console: Console
) -> None:
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url))
    scenario = Scenario(
        user_id="student-42",
        roles=[LEARNER],
        name="Sam Student",
        custom={"repo": "course/week1"},
    )
    await page.goto(env.lms.launch(scenario))
    await expect(page.get_by_role("heading", name="Launching course/week1")).to_be_visible()
    assert page.url == env.target
    await expect(page.locator("#who")).to_have_text("Sam Student")
    assert env.lms.errors == []
    ticket = env.launcher.tickets[-1]
    assert ticket["lti"]["context"]["id"] == "course-101"
    assert "lti:lms:course-101#Learner" in ticket["groups"]
    # The platform's post was cross-site: the hand-off brought the flow cookie.
    launch = f"{env.tool.url}/lti/lms/launch"
    assert any(url.startswith(f"{launch}?handoff=") for url in seen), seen
    # The launcher got only the broker's ticket, never the platform's id_token.
    assert env.launcher.fields[-1] == ["lti_ticket"]
    assert ticket["iss"] == env.tool.url and ticket["aud"] == env.launcher.url
    # Signed in at the broker, in this browser.
    await page.goto(f"{env.tool.url}/")
    await expect(page.locator("main")).to_contain_text("Signed in as Sam Student")
    await expect(page.locator("main")).to_contain_text("lti:lms:course-101#Learner")
    assert [e for e in console.errors if env.tool.url in e] == []


async def test_instructor_places_a_notebook_link(env: Env, page: Page) -> None:
    """Deep Linking in the browser: the picker, the signed response auto-posted to the
    platform, which verifies it and stores the link."""
    await page.goto(env.lms.launch(Scenario(user_id="prof", roles=[INSTRUCTOR], deep_linking=True)))
    await expect(page.get_by_role("heading", name="Place a notebook link")).to_be_visible()
    await page.get_by_label("Notebook 1").check()
    await page.get_by_role("button", name="Place link").click()
    await expect(page.get_by_role("heading", name="Link placed")).to_be_visible()
    await expect(page.locator("#items")).to_have_text("Notebook 1")
    assert env.lms.deep_link_items[-1]["url"] == env.target
    assert env.lms.errors == []
