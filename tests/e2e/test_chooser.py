"""The sign-in chooser in a real browser: accessible (labels, keyboard), plain, searchable with
and without JavaScript, remembers the last choice, honours an `idp` hint, and an error page
that shows the request id but no internals. Screenshots land in the artefacts directory.

The broker runs (dev mode) with two plain upstreams and a SAML federation whose metadata lists
30 IdPs; the made-up IdPs' SSO endpoints are answered by the browser context itself (routed),
so following a result shows where the broker sent the browser without any network.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_asyncio
from playwright.async_api import BrowserContext, Locator, Page, Response, expect

from adapters.vault import AppRoleAuth
from broker.devvault import DevVault
from broker.oauth.clients import hash_secret
from tests.e2e.conftest import Console
from tests.e2e.support import (
    CAMPUS_NAME,
    FEDERATION_NAMES,
    FakeIdps,
    Launcher,
    RunningBroker,
    approve_consent,
    fake_entity_id,
    fake_sso_url,
    federation_metadata,
    free_port,
    launcher_client,
    needs_chromium,
    run_broker,
    saml_upstream,
    serve,
    sp_keys,
    verify_broker_jwt,
)
from tests.peers.broker import audit_events, make_settings

pytestmark = needs_chromium

FEDERATION = "campus"
FEDERATION_TITLE = "Campus federation"
WORKSHOP = "workshop"
WORKSHOP_TITLE = "Workshop guest sign-in"


@dataclass
class Env:
    broker: RunningBroker
    launcher: Launcher
    idps: FakeIdps

    @property
    def url(self) -> str:
        return self.broker.url


@pytest_asyncio.fixture(scope="module")
async def env(
    tmp_path_factory: pytest.TempPathFactory, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[Env]:
    workdir = tmp_path_factory.mktemp("e2e-chooser")
    broker_url = f"http://127.0.0.1:{free_port()}"
    launcher_port = free_port()
    launcher = Launcher(url=f"http://127.0.0.1:{launcher_port}", broker_url=broker_url)
    idps_port = free_port()
    idps = FakeIdps(f"http://127.0.0.1:{idps_port}")
    metadata = workdir / "federation.xml"
    metadata.write_bytes(federation_metadata(idps.base))
    upstreams = [
        {"type": "dev", "id": "dev"},
        {"type": "dev", "id": WORKSHOP, "display_name": WORKSHOP_TITLE, "groups": ["guests"]},
        saml_upstream(FEDERATION, FEDERATION_TITLE, sp_keys(workdir / "sp"), metadata),
    ]
    settings = make_settings(
        workdir,
        openbao.address,
        vault_approle,
        mode="dev",
        server={"public_url": broker_url, "cookie_secure": False},
        upstreams=upstreams,
        clients=[launcher_client(hash_secret, launcher.url)],
    )
    async with (
        run_broker(settings, dev_mode=True) as broker,
        serve(launcher.app(), launcher_port),
        serve(idps.app(), idps_port),
    ):
        yield Env(broker, launcher, idps)


def search_box(page: Page) -> Locator:
    return page.get_by_role("searchbox", name="Find your institution")


def results(page: Page) -> Locator:
    return page.locator(f"#r-{FEDERATION} li a")


async def focused(page: Page) -> dict[str, str]:
    described: dict[str, str] = await page.evaluate(
        """() => { const e = document.activeElement;
                   return {tag: e.tagName.toLowerCase(), id: e.id || '', type: e.type || '',
                           text: (e.textContent || '').trim(), href: e.getAttribute('href') || ''};
                 }"""
    )
    return described


async def csp_violations(page: Page) -> list[str]:
    found: list[str] = await page.evaluate("() => window.__cspViolations || []")
    return found


def assert_saml_request_to(env: Env, url: str, name: str) -> None:
    """`url` is the made-up IdP `name`'s SSO endpoint carrying a signed AuthnRequest, and
    the IdP (the FakeIdps server) received it."""
    assert url.split("?")[0] == fake_sso_url(name, env.idps.base), url
    query = parse_qs(urlsplit(url).query)
    assert query.keys() >= {"SAMLRequest", "RelayState", "SigAlg", "Signature"}, query.keys()
    assert url in env.idps.requests


async def test_chooser_is_labelled_plain_and_screenshotted(
    env: Env, page: Page, console: Console, artifacts: Path
) -> None:
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    response = await page.goto(f"{env.url}/login")
    assert response is not None and response.status == 200
    assert await page.title() == "Sign in · binder-broker"
    assert await page.get_attribute("html", "lang") == "en"
    unlabelled = await page.evaluate(
        """() => Array.from(document.querySelectorAll('input, select, textarea'))
              .filter(e => e.type !== 'hidden')
              .filter(e => !Array.from(e.labels || []).some(l => l.textContent.trim())
                           && !e.getAttribute('aria-label'))
              .map(e => e.outerHTML)"""
    )
    assert unlabelled == []
    nameless = await page.evaluate(
        """() => Array.from(document.querySelectorAll('a, button'))
              .filter(e => !e.textContent.trim() && !e.getAttribute('aria-label'))
              .map(e => e.outerHTML)"""
    )
    assert nameless == []
    await expect(search_box(page)).to_be_visible()  # the label is tied to the box
    await expect(page.get_by_role("button", name="Search")).to_be_visible()
    await expect(page.get_by_role("link", name=WORKSHOP_TITLE)).to_be_visible()
    await expect(page.get_by_role("heading", name=FEDERATION_TITLE)).to_be_visible()
    # Every IdP of the federation (30 < the page's 50) is listed before any search.
    await expect(results(page)).to_have_count(len(FEDERATION_NAMES) + 1)
    # Plain: the document is all there is to load (no fonts, images, scripts, trackers).
    page_requests = [u for u in requested if not u.endswith("/favicon.ico")]
    assert page_requests == [f"{env.url}/login"]
    assert len(await response.body()) < 32_000
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and re.search(r"script-src 'nonce-[^']+'", csp)
    await page.screenshot(path=str(artifacts / "chooser.png"), full_page=True)
    assert await csp_violations(page) == []
    assert console.errors == []


async def test_type_ahead_narrows_as_you_type(
    env: Env, page: Page, console: Console, artifacts: Path
) -> None:
    await page.goto(f"{env.url}/login")
    box = search_box(page)
    await box.click()
    counts = []
    for text in ("c", "camp", "campus"):
        async with page.expect_response(lambda r: "/login/idps?" in r.url) as answer:
            await box.fill(text)
        reply = await answer.value
        assert reply.status == 200
        expected = len((await reply.json())["idps"])
        await expect(results(page)).to_have_count(expected)
        counts.append(expected)
    assert counts[0] > counts[1] > counts[2] == 1, counts
    await expect(results(page)).to_have_text([CAMPUS_NAME])
    # Narrowed in place: the form was never submitted.
    assert "q=" not in page.url
    async with page.expect_response(lambda r: "/login/idps?" in r.url):
        await box.fill("camp")
    await expect(results(page)).to_have_text(["Campbell Ridge College", CAMPUS_NAME])
    await page.screenshot(path=str(artifacts / "chooser-search.png"), full_page=True)
    async with page.expect_response(lambda r: "/login/idps?" in r.url):
        await box.fill("no such place")
    await expect(results(page)).to_have_count(0)
    await expect(page.locator(f"#s-{FEDERATION}")).to_have_text("No institution matches.")
    assert await csp_violations(page) == []
    assert console.errors == []


async def test_keyboard_reaches_search_and_follows_a_result(
    env: Env, page: Page, console: Console
) -> None:
    await page.goto(f"{env.url}/login")
    visited = []
    for _ in range(20):
        await page.keyboard.press("Tab")
        visited.append(await focused(page))
        if visited[-1]["type"] == "search":
            break
    assert visited[-1]["type"] == "search", visited
    # Every plain upstream was passed on the way: reachable by keyboard as well.
    assert {WORKSHOP_TITLE, "Development sign-in (no password)"} <= {v["text"] for v in visited}
    async with page.expect_response(lambda r: "/login/idps?" in r.url):
        await page.keyboard.type("campus", delay=20)
    await expect(results(page)).to_have_text([CAMPUS_NAME])
    for _ in range(3):
        await page.keyboard.press("Tab")
        if (await focused(page))["text"] == CAMPUS_NAME:
            break
    current = await focused(page)
    assert current["tag"] == "a" and current["text"] == CAMPUS_NAME, current
    async with page.expect_response(f"{env.idps.base}/**") as sent:
        await page.keyboard.press("Enter")
    assert_saml_request_to(env, (await sent.value).url, CAMPUS_NAME)
    assert console.errors == []


async def test_search_works_without_javascript(
    env: Env, nojs_context: BrowserContext, console: Console
) -> None:
    page = await nojs_context.new_page()
    await page.goto(f"{env.url}/login")
    assert await page.evaluate("1 + 1") == 2  # evaluate() still works; the page's JS does not
    await search_box(page).fill("camp")
    async with page.expect_navigation():
        await page.get_by_role("button", name="Search").click()
    query = parse_qs(urlsplit(page.url).query)
    assert query["q"] == ["camp"] and query["idp"] == [FEDERATION]
    await expect(results(page)).to_have_text(["Campbell Ridge College", CAMPUS_NAME])
    await expect(search_box(page)).to_have_value("camp")
    href = await results(page).nth(1).get_attribute("href")
    assert href is not None and parse_qs(urlsplit(href).query)["entity"] == [
        fake_entity_id(CAMPUS_NAME)
    ]
    await search_box(page).fill("no such place")
    async with page.expect_navigation():
        await search_box(page).press("Enter")
    await expect(results(page)).to_have_count(0)
    await expect(page.locator(f"#s-{FEDERATION}")).to_contain_text("No institution matches")
    assert console.errors == []


async def test_last_choice_is_offered_on_the_next_visit(env: Env, page: Page) -> None:
    await page.goto(f"{env.url}/login")
    await expect(page.get_by_text("Last time you used")).to_have_count(0)
    await page.get_by_role("link", name=WORKSHOP_TITLE).click()
    await expect(page.get_by_role("heading", name=f"Sign in: {WORKSHOP_TITLE}")).to_be_visible()
    await page.goto(f"{env.url}/login")
    last = page.locator("p", has_text="Last time you used")
    await expect(last.get_by_role("link")).to_have_text(WORKSHOP_TITLE)

    await search_box(page).fill("campus")
    await expect(results(page)).to_have_text([CAMPUS_NAME])
    async with page.expect_response(f"{env.idps.base}/**"):
        await results(page).first.click()
    await page.goto(f"{env.url}/login")
    await expect(last.get_by_role("link")).to_have_text(CAMPUS_NAME)
    async with page.expect_response(f"{env.idps.base}/**") as sent:
        await last.get_by_role("link").click()
    assert_saml_request_to(env, (await sent.value).url, CAMPUS_NAME)


async def test_idp_hint_skips_the_chooser_and_the_launcher_gets_tokens(
    env: Env, page: Page, console: Console
) -> None:
    login_pages: list[Response] = []
    page.on("response", lambda r: login_pages.append(r) if "/login?" in r.url else None)
    await page.goto(f"{env.launcher.url}/start?idp={WORKSHOP}")
    await expect(page.get_by_role("heading", name=f"Sign in: {WORKSHOP_TITLE}")).to_be_visible()
    assert [parse_qs(urlsplit(r.url).query)["idp"] for r in login_pages] == [[WORKSHOP]]
    assert "Choose how to sign in" not in await page.content()
    await dev_sign_in(page, "ada")
    await expect(page.get_by_role("heading", name="Allow access?")).to_be_visible()
    await approve_consent(page)
    await expect(page.get_by_role("heading", name="Signed in")).to_be_visible()
    state = (await page.locator("#state").text_content()) or ""
    tokens = env.launcher.tokens[state]
    claims = await verify_broker_jwt(
        env.url, tokens["id_token"], audience="launcher", nonce=env.launcher.nonces[state]
    )
    assert claims["name"] == "ada" and claims["groups"] == ["guests"]
    assert console.errors == []


async def dev_sign_in(page: Page, username: str) -> None:
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("guests").check()
    await page.get_by_role("button", name="Sign in").click()


async def test_a_returning_user_goes_straight_back_to_the_launcher(
    env: Env, page: Page, context: BrowserContext, console: Console
) -> None:
    """Consent is asked once; the next sign-in's form POST ends at the launcher directly."""
    await page.goto(f"{env.launcher.url}/start?idp={WORKSHOP}")
    await dev_sign_in(page, "grace")
    await expect(page.get_by_role("heading", name="Allow access?")).to_be_visible()
    await approve_consent(page)
    await expect(page.get_by_role("heading", name="Signed in")).to_be_visible()
    await context.clear_cookies()  # a new browser session; the approval is on the server
    await page.goto(f"{env.launcher.url}/start?idp={WORKSHOP}")
    await dev_sign_in(page, "grace")
    await expect(page.get_by_role("heading", name="Signed in")).to_be_visible()
    state = (await page.locator("#state").text_content()) or ""
    assert "id_token" in env.launcher.tokens[state]
    assert console.errors == []


async def test_deny_at_consent_sends_access_denied_and_no_code(
    env: Env, page: Page, context: BrowserContext
) -> None:
    before = set(env.launcher.tokens)
    await page.goto(f"{env.launcher.url}/start?idp={WORKSHOP}")
    await dev_sign_in(page, "heidi")
    await expect(page.get_by_role("heading", name="Allow access?")).to_be_visible()
    async with page.expect_response(f"{env.launcher.url}/callback?*") as answer:
        await page.get_by_role("button", name="Deny").click()
    query = parse_qs(urlsplit((await answer.value).url).query)
    assert query["error"] == ["access_denied"] and "code" not in query
    assert set(env.launcher.tokens) == before
    assert env.launcher.errors[query["state"][0]]["error"] == "access_denied"
    denied = audit_events(env.broker.services, "consent.denied")
    assert denied and denied[-1]["data"]["client"] == "launcher"


async def test_idp_hint_with_an_entity_id_goes_straight_to_that_idp(env: Env, page: Page) -> None:
    entity = fake_entity_id("Harborview University")
    async with page.expect_response(f"{env.idps.base}/**") as sent:
        await page.goto(f"{env.launcher.url}/start?idp={entity}")
    assert_saml_request_to(env, (await sent.value).url, "Harborview University")
    await expect(page.get_by_role("heading")).to_have_text("IdP harborview-university")


async def test_error_page_shows_the_request_id_and_no_internals(
    env: Env, page: Page, context: BrowserContext, console: Console, artifacts: Path
) -> None:
    await page.goto(f"{env.url}/login?idp=dev")
    await page.get_by_label("Username").fill("mallory")
    # The flow cookie is gone (expired, or the form was opened in another browser).
    await context.clear_cookies()
    async with page.expect_navigation() as navigation:
        await page.get_by_role("button", name="Sign in").click()
    response = await navigation.value
    assert response is not None and response.status == 400
    request_id = response.headers["x-request-id"]
    await expect(page.locator("main")).to_contain_text("started in another browser")
    await expect(page.locator("main")).to_contain_text(request_id)
    text = await page.locator("body").inner_text()
    for internal in ("Traceback", 'File "', "broker/", "Exception", "sqlalchemy"):
        assert internal not in text
    await page.screenshot(path=str(artifacts / "error-page.png"), full_page=True)
    rejected = [
        e for e in audit_events(env.broker.services, "sign_in") if e["outcome"] == "rejected"
    ]
    assert rejected and rejected[-1]["data"]["idp"] == "dev"
    assert "broker_session" not in {c["name"] for c in await context.cookies()}
    # Chromium logs the 400 document itself; nothing else may fail on the page.
    assert [e for e in console.errors if "status of 400" not in e] == []
