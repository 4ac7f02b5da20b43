"""Attacks on the browser sign-in and the HTTP surface, against a broker on real OpenBao.

Each test asserts the rejection *and* that nothing was issued: no `broker_session` cookie, no
`sign_in` or `token.issued` audit record, and the audit chain still verifies.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from adapters.base import principal_id
from adapters.upstream.dev import DEV_ISSUER
from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault
from broker.services import Services
from broker.sessions import FLOW_COOKIE, SESSION_COOKIE
from tests.peers.broker import Checked, ContractClient, audit_events, make_settings, start_broker

HTML = {"Accept": "text/html"}
BANNER = "DEVELOPMENT MODE"
HEX_ID = re.compile(r"^[0-9a-f]{32}$")
FILE_PATH = re.compile(r"(/work/|/usr/|site-packages|\.py\b|File \")")


def signed_in(svc: Services) -> list[dict[str, Any]]:
    """Audit records of sign-ins that succeeded (refusals are audited too, as "rejected")."""
    return [r for r in audit_events(svc, "sign_in") if r["outcome"] == "success"]


class Browser:
    """One browser: its own cookies, sent explicitly, so two browsers can share a client."""

    def __init__(self, client: ContractClient) -> None:
        self.client = client
        self.cookies: dict[str, str] = {}

    def _headers(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers = {**HTML, **(extra or {})}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        return headers

    def _keep(self, cookies: Mapping[str, str]) -> None:
        self.client.raw.session.cookie_jar.clear()
        for name, value in cookies.items():
            if value:
                self.cookies[name] = value
            else:
                self.cookies.pop(name, None)

    async def request(
        self, method: str, path: str, *, headers: Mapping[str, str] | None = None, **kw: Any
    ) -> Checked:
        """A request whose response is checked against openapi.yaml."""
        self.client.raw.session.cookie_jar.clear()
        response = await self.client.request(method, path, headers=self._headers(headers), **kw)
        self._keep(response.cookies)
        return response

    async def raw(
        self, method: str, path: str, *, headers: Mapping[str, str] | None = None, **kw: Any
    ) -> Checked:
        """A request whose response the OpenAPI document does not describe (404s, 413s)."""
        self.client.raw.session.cookie_jar.clear()
        kw.setdefault("allow_redirects", False)
        async with self.client.raw.request(
            method, path, headers=self._headers(headers), **kw
        ) as response:
            body = await response.read()
            cookies = {k: v.value for k, v in response.cookies.items()}
        self._keep(cookies)
        return Checked(response.status, CIMultiDict(response.headers), body, cookies)

    async def start_sign_in(self, next_url: str | None = None) -> str:
        """GET /login; returns the flow id from the dev form (the flow cookie is kept)."""
        params = {"next": next_url} if next_url is not None else {}
        page = await self.request("GET", "/login", params=params)
        assert page.status == 200, page.text
        assert FLOW_COOKIE in page.cookies
        found = re.search(r'<input type="hidden" name="flow" value="([^"]+)">', page.text)
        assert found is not None, page.text
        return found.group(1)

    async def finish_sign_in(
        self, flow: str, username: str = "alice", groups: Sequence[str] = ("students",)
    ) -> Checked:
        form = [("flow", flow), ("username", username), *(("groups", g) for g in groups)]
        return await self.request("POST", "/login/dev/callback", data=form)

    async def sign_in(self, username: str = "alice") -> None:
        response = await self.finish_sign_in(await self.start_sign_in(), username)
        assert response.status == 303, response.text
        assert SESSION_COOKIE in self.cookies

    async def csrf(self) -> str:
        page = await self.request("GET", "/")
        found = re.search(r'action="/dev/token"><input type="hidden" name="csrf" value="([^"]+)"',
                          page.text)  # fmt: skip
        assert found is not None, page.text
        return found.group(1)


async def assert_audit_intact(broker: Services) -> None:
    report = await broker.audit.verify()
    assert report.ok, report.problem


def assert_clean_error(response: Checked) -> None:
    """No stack trace and no server file path in an error body."""
    assert "Traceback" not in response.text
    assert not FILE_PATH.search(response.text), response.text


def assert_no_session(response: Checked) -> None:
    assert not response.cookies.get(SESSION_COOKIE)


# --- open redirects ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "next_url",
    [
        pytest.param("//evil.example", id="protocol-relative"),
        pytest.param("//evil.example/path", id="protocol-relative-with-path"),
        pytest.param("https://evil.example", id="absolute-https"),
        pytest.param("http://127.0.0.1:8080@evil.example/", id="userinfo-trick"),
        pytest.param("/\\evil.example", id="slash-backslash"),
        pytest.param("\\\\evil.example", id="double-backslash"),
        pytest.param("/\t/evil.example", id="slash-tab-slash"),
        pytest.param("/ /evil.example", id="slash-space-slash"),
        pytest.param("javascript:alert(1)", id="javascript-scheme"),
        pytest.param("data:text/html,<script>alert(1)</script>", id="data-scheme"),
        pytest.param("evil.example", id="relative-host"),
        pytest.param("", id="empty"),
    ],
)
async def test_next_never_leaves_the_broker(
    client: ContractClient, broker: Services, next_url: str
) -> None:
    browser = Browser(client)
    flow = await browser.start_sign_in(next_url)
    response = await browser.finish_sign_in(flow)
    assert response.status == 303
    assert response.headers["Location"] == "/"
    assert SESSION_COOKIE in response.cookies
    assert len(signed_in(broker)) == 1
    await assert_audit_intact(broker)


@pytest.mark.parametrize(
    "next_url",
    [
        pytest.param("/", id="root"),
        pytest.param("/login?idp=dev", id="path-with-query"),
        pytest.param("/docs/page#part", id="path-with-fragment"),
    ],
)
async def test_local_next_is_kept(client: ContractClient, next_url: str) -> None:
    browser = Browser(client)
    response = await browser.finish_sign_in(await browser.start_sign_in(next_url))
    assert response.status == 303
    assert response.headers["Location"] == next_url


async def test_next_with_trailing_newline_is_not_a_local_path(
    client: ContractClient, broker: Services
) -> None:
    browser = Browser(client)
    flow = await browser.start_sign_in("/x\n")  # sent as /login?next=/x%0A
    response = await browser.finish_sign_in(flow)
    assert response.status == 303
    assert response.headers["Location"] == "/"


async def test_a_cookieless_post_for_no_live_flow_is_refused_not_parked(
    client: ContractClient, broker: Services
) -> None:
    """Only an answer to a sign-in in progress is parked for the cross-site hand-off; anything
    else is refused at once (and audited), so the cache cannot be filled with junk."""
    attacker = Browser(client)
    form = [("RelayState", "no-such-flow"), ("SAMLResponse", "x" * 4000)]
    response = await attacker.request("POST", "/login/dev/callback", data=form)
    assert response.status == 400 and "Location" not in response.headers
    assert "started in another browser" in response.text
    assert_no_session(response)
    [rejected] = audit_events(broker, "sign_in")
    assert rejected["outcome"] == "rejected" and signed_in(broker) == []


# --- the sign-in flow is bound to one browser and completes once -------------------------


@pytest.mark.parametrize(
    "attack",
    [
        "no-flow-cookie",
        "other-browsers-flow-cookie",
        "forged-cookie-mac",
        "cookie-for-flow-but-no-flow-field",
        "unknown-flow-id-with-its-own-forged-cookie",
    ],
)
async def test_sign_in_needs_the_flow_cookie_of_this_browser(
    client: ContractClient, broker: Services, attack: str
) -> None:
    victim = Browser(client)
    flow = await victim.start_sign_in()
    attacker = Browser(client)
    form: list[tuple[str, str]] = [("flow", flow), ("username", "mallory")]
    if attack == "other-browsers-flow-cookie":
        await attacker.start_sign_in()  # the attacker's own, valid, flow cookie
    elif attack == "forged-cookie-mac":
        attacker.cookies[FLOW_COOKIE] = f"{flow}.{'0' * 32}"
    elif attack == "cookie-for-flow-but-no-flow-field":
        attacker.cookies = dict(victim.cookies)  # e.g. a cookie stolen without the form
        form = [("username", "mallory")]
    elif attack == "unknown-flow-id-with-its-own-forged-cookie":
        form = [("flow", "made-up-flow"), ("username", "mallory")]
        attacker.cookies[FLOW_COOKIE] = f"made-up-flow.{'a' * 32}"
    response = await attacker.request("POST", "/login/dev/callback", data=form)
    if attack == "no-flow-cookie":
        # A cookie-less cross-site post is parked and the browser sent to GET it back with
        # its cookies (the SAML ACS case); this browser has none, so the binding still fails.
        assert response.status == 303
        assert "handoff=" in response.headers["Location"]
        assert_no_session(response)
        response = await attacker.request("GET", response.headers["Location"])
    assert response.status == 400
    assert response.headers["Content-Type"].startswith("text/html")
    assert "started in another browser" in response.text
    assert BANNER in response.text
    assert_no_session(response)
    assert_clean_error(response)
    [rejected] = audit_events(broker, "sign_in")
    assert rejected["outcome"] == "rejected"
    assert rejected["data"]["idp"] == "dev" and rejected["data"]["error"] == "invalid_request"
    # The rejected attempt did not use up the victim's flow.
    done = await victim.finish_sign_in(flow, "alice")
    assert done.status == 303
    [record] = signed_in(broker)
    assert record["actor"] == principal_id(DEV_ISSUER, "alice")  # never mallory
    await assert_audit_intact(broker)


async def test_callback_replay_after_success_is_refused(
    client: ContractClient, broker: Services
) -> None:
    browser = Browser(client)
    flow = await browser.start_sign_in()
    flow_cookie = browser.cookies[FLOW_COOKIE]
    first = await browser.finish_sign_in(flow)
    assert first.status == 303
    assert FLOW_COOKIE not in browser.cookies  # the response deleted it
    # Replay exactly what was sent, old cookie included, from a fresh and the same browser.
    for replayer in (Browser(client), browser):
        replayer.cookies[FLOW_COOKIE] = flow_cookie
        again = await replayer.finish_sign_in(flow)
        assert again.status == 400
        assert "Please start again" in again.text
        assert_no_session(again)
    assert len(signed_in(broker)) == 1
    await assert_audit_intact(broker)


async def test_concurrent_callbacks_complete_the_flow_once(
    client: ContractClient, broker: Services
) -> None:
    browser = Browser(client)
    flow = await browser.start_sign_in()
    cookies = dict(browser.cookies)
    racers = [Browser(client) for _ in range(5)]
    for racer in racers:
        racer.cookies = dict(cookies)
    results = await asyncio.gather(*(r.finish_sign_in(flow) for r in racers))
    assert sorted(r.status for r in results) == [303, 400, 400, 400, 400]
    assert sum(1 for r in results if r.cookies.get(SESSION_COOKIE)) == 1
    assert len(signed_in(broker)) == 1
    await assert_audit_intact(broker)


async def test_session_cookie_attributes(client: ContractClient) -> None:
    browser = Browser(client)
    response = await browser.finish_sign_in(await browser.start_sign_in())
    assert response.status == 303
    set_cookies = response.headers.getall("Set-Cookie")  # type: ignore[attr-defined]
    [session] = [c for c in set_cookies if c.startswith(f"{SESSION_COOKIE}=")]
    attributes = {part.strip().split("=")[0].lower() for part in session.split(";")[1:]}
    assert {"httponly", "path", "samesite", "max-age"} <= attributes
    assert "samesite=lax" in session.lower()
    # The flow cookie is removed once the flow is used.
    [flow] = [c for c in set_cookies if c.startswith(f"{FLOW_COOKIE}=")]
    assert "max-age=0" in flow.lower()
    # The session cookie is an opaque id with a MAC: it says nothing about the user.
    value = response.cookies[SESSION_COOKIE]
    assert "alice" not in value and "." in value


@pytest.mark.parametrize(
    ("username", "groups", "message"),
    [
        pytest.param("", ("students",), "Choose a username", id="empty"),
        pytest.param("alice smith", (), "Choose a username", id="space"),
        pytest.param("a" * 65, (), "Choose a username", id="too-long"),
        pytest.param("-alice", (), "Choose a username", id="leading-dash"),
        pytest.param("../../etc/passwd", (), "Choose a username", id="path-traversal"),
        pytest.param("<script>alert(1)</script>", (), "Choose a username", id="html"),
        pytest.param("alice\x00admin", (), "Choose a username", id="nul-byte"),
        pytest.param("élodie", (), "Choose a username", id="non-ascii"),
        pytest.param("alice", ("root",), "Pick groups from the list", id="group-not-offered"),
        pytest.param("alice", ("students root",), "Pick groups from the list",
                     id="group-smuggled-with-space"),
    ],
)  # fmt: skip
async def test_invalid_sign_in_input_is_a_readable_400(
    client: ContractClient, broker: Services, username: str, groups: tuple[str, ...], message: str
) -> None:
    browser = Browser(client)
    response = await browser.finish_sign_in(await browser.start_sign_in(), username, groups)
    assert response.status == 400
    assert response.headers["Content-Type"].startswith("text/html")
    assert message in response.text
    assert "<script>alert(1)" not in response.text
    assert "request id" in response.text
    assert_no_session(response)
    assert_clean_error(response)
    assert signed_in(broker) == []
    await assert_audit_intact(broker)


# --- CSRF on the dev token button --------------------------------------------------------


@pytest.mark.parametrize(
    "csrf",
    [
        pytest.param(None, id="no-csrf"),
        pytest.param("", id="empty-csrf"),
        pytest.param("wrong-csrf-value", id="wrong-csrf"),
        pytest.param("other-session", id="csrf-of-another-session"),
        pytest.param("no-session", id="right-csrf-without-session-cookie"),
    ],
)
async def test_dev_token_refuses_without_the_session_csrf(
    client: ContractClient, broker: Services, csrf: str | None
) -> None:
    browser = Browser(client)
    await browser.sign_in("alice")
    good = await browser.csrf()
    form: dict[str, str] = {}
    sender = browser
    if csrf == "other-session":
        other = Browser(client)
        await other.sign_in("bob")
        form = {"csrf": await other.csrf()}
    elif csrf == "no-session":
        form = {"csrf": good}
        sender = Browser(client)  # a cross-site form post carries no cookie of ours
    elif csrf is not None:
        form = {"csrf": csrf}
    response = await sender.request("POST", "/dev/token", data=form)
    assert response.status == 400
    assert "Sign in first" in response.text
    assert not re.search(r"eyJ[A-Za-z0-9_-]+\.", response.text)
    assert_clean_error(response)
    assert audit_events(broker, "token.issued") == []
    # Control: the same browser with its own csrf gets a token, audited once.
    minted = await browser.request("POST", "/dev/token", data={"csrf": good})
    assert minted.status == 200
    token = re.search(r'<pre id="token">([^<]+)</pre>', minted.text)
    assert token is not None
    assert broker.tokens.verify(token.group(1), audience="urn:binder-broker:dev-console")
    issued = audit_events(broker, "token.issued")
    assert len(issued) == 1 and token.group(1) not in json.dumps(issued)
    await assert_audit_intact(broker)


# --- bodies ------------------------------------------------------------------------------


async def test_oversized_body_is_413_and_writes_nothing(
    client: ContractClient, broker: Services
) -> None:
    limit = broker.settings.server.max_body_bytes
    assert limit == 1_048_576
    browser = Browser(client)
    flow = await browser.start_sign_in()
    body = f"flow={flow}&username=alice&groups=students&pad=".encode()
    body += b"x" * (limit + 1 - len(body))
    response = await browser.raw(
        "POST", "/login/dev/callback", data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert response.status == 413
    assert "too large" in response.text
    assert BANNER in response.text
    assert_no_session(response)
    assert_clean_error(response)
    assert signed_in(broker) == []
    # Exactly at the limit the same form is read, and the sign-in goes through.
    response = await browser.raw(
        "POST", "/login/dev/callback", data=body[:-1],
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert response.status == 303
    assert len(signed_in(broker)) == 1
    await assert_audit_intact(broker)


MALFORMED_BODIES = [
    pytest.param("application/x-www-form-urlencoded", b"flow=\xff&username=\xfe",
                 id="form-not-utf8"),
    pytest.param("application/x-www-form-urlencoded; charset=klingon", b"username=alice",
                 id="form-unknown-charset"),
    pytest.param("multipart/form-data", b"username=alice", id="multipart-without-boundary"),
]  # fmt: skip


@pytest.mark.parametrize(("content_type", "body"), MALFORMED_BODIES)
async def test_malformed_form_body_is_a_client_error(
    client: ContractClient, broker: Services, content_type: str, body: bytes
) -> None:
    browser = Browser(client)
    await browser.start_sign_in()
    response = await browser.raw(
        "POST", "/login/dev/callback", data=body, headers={"Content-Type": content_type}
    )
    assert_clean_error(response)
    assert_no_session(response)
    assert signed_in(broker) == []
    assert response.status == 400


# --- unknown routes, request ids, error pages --------------------------------------------


@pytest.mark.parametrize(
    ("path", "accept", "html"),
    [
        pytest.param("/v1/nope", "application/json", False, id="api-path-json"),
        pytest.param("/v1/nope", "text/html", False, id="api-path-even-if-html-accepted"),
        pytest.param("/nope", "*/*", False, id="no-html-accept"),
        pytest.param("/nope", "text/html,application/xhtml+xml", True, id="browser"),
        pytest.param("/login/nope/callback", "text/html", True, id="unknown-upstream"),
    ],
)
async def test_unknown_route_is_404(
    client: ContractClient, path: str, accept: str, html: bool
) -> None:
    response = await Browser(client).raw("GET", path, headers={"Accept": accept})
    assert response.status == 404
    request_id = response.headers["X-Request-Id"]
    assert HEX_ID.match(request_id)
    assert_clean_error(response)
    if html:
        assert response.headers["Content-Type"].startswith("text/html")
        assert request_id in response.text
        assert BANNER in response.text
        assert response.headers["Cache-Control"] == "no-store"
    else:
        assert response.headers["Content-Type"].startswith("application/json")
        assert response.headers["Cache-Control"] == "no-store"
        body = response.json()
        assert body["error"] == "not_found"
        assert body["request_id"] == request_id


@pytest.mark.parametrize(
    ("inbound", "echoed"),
    [
        pytest.param("req-2024.abc_DEF-12345", True, id="good"),
        pytest.param("a" * 64, True, id="good-64-chars"),
        pytest.param("short", False, id="too-short"),
        pytest.param("a" * 65, False, id="too-long"),
        pytest.param("abc<script>alert(1)</script>", False, id="html"),
        pytest.param("../../../etc/passwd", False, id="slashes"),
        pytest.param("id with spaces inside", False, id="spaces"),
        pytest.param('quote"injection=1', False, id="quote"),
        pytest.param("abcdefgh;rm -rf", False, id="semicolon"),
    ],
)
async def test_inbound_request_id(client: ContractClient, inbound: str, echoed: bool) -> None:
    browser = Browser(client)
    for path, accept in (("/v1/nope", "application/json"), ("/nope", "text/html")):
        response = await browser.raw("GET", path, headers={"X-Request-Id": inbound,
                                                           "Accept": accept})  # fmt: skip
        outbound = response.headers["X-Request-Id"]
        if echoed:
            assert outbound == inbound
        else:
            assert outbound != inbound
            assert HEX_ID.match(outbound)
            assert inbound not in response.text
        assert outbound in response.text
    ok = await browser.request("GET", "/healthz", headers={"X-Request-Id": inbound})
    assert (ok.headers["X-Request-Id"] == inbound) is echoed


async def test_error_bodies_hold_no_traceback_or_path(
    client: ContractClient, broker: Services
) -> None:
    browser = Browser(client)
    flow = await browser.start_sign_in()
    form_ct = {"Content-Type": "application/x-www-form-urlencoded"}
    responses = [
        await browser.raw("GET", "/nope"),
        await browser.raw("GET", "/v1/nope"),
        await browser.raw("PUT", "/"),
        await browser.raw("DELETE", "/v1/whoami", headers={"Accept": "application/json"}),
        await browser.raw("GET", "/v1/whoami", headers={"Authorization": "Bearer x.y.z"}),
        await browser.raw("GET", "/login?idp=nope"),
        await browser.raw("POST", "/login/dev/callback", data={"flow": flow, "username": "!"}),
        await browser.raw("POST", "/login/dev/callback", data=b"\xff=\xfe", headers=form_ct),
        await browser.raw("POST", "/dev/token", data=b"csrf=\xff", headers=form_ct),
    ]
    assert [r.status for r in responses][:7] == [404, 404, 405, 405, 401, 404, 400]
    for response in responses:
        assert response.status >= 400
        assert_clean_error(response)
        # The caller gets the correlation id that the log line carries, nothing more.
        assert response.headers["X-Request-Id"] in response.text
    assert signed_in(broker) == []
    await assert_audit_intact(broker)


# --- the development-mode banner ---------------------------------------------------------


async def test_dev_mode_banner_on_every_page(client: ContractClient) -> None:
    browser = Browser(client)
    pages = [
        await browser.request("GET", "/"),
        await browser.request("GET", "/login"),
        await browser.raw("GET", "/nope"),
        await browser.request("GET", "/login?idp=nope"),
        await browser.request("POST", "/login/dev/callback", data={"flow": "x"}),
        await browser.request("POST", "/dev/token", data={"csrf": "x"}),
    ]
    for page in pages:
        assert page.headers["Content-Type"].startswith("text/html")
        assert BANNER in page.text, page.status
    await browser.sign_in()
    home = await browser.request("GET", "/")
    assert BANNER in home.text and "Mint a test access token" in home.text


async def test_production_broker_has_no_dev_surface(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> None:
    settings = make_settings(tmp_path, openbao.address, vault_approle, mode="production")
    services = await start_broker(settings, dev_mode=False)
    try:
        async with TestClient(TestServer(app_with_services(services))) as raw:
            browser = Browser(ContractClient(raw))
            for page in (
                await browser.request("GET", "/"),
                await browser.request("GET", "/login"),
                await browser.raw("GET", "/nope"),
            ):
                assert BANNER not in page.text
            login = await browser.request("GET", "/login")
            assert 'action="/login/dev/callback"' not in login.text
            assert not login.cookies.get(FLOW_COOKIE)
            refused = await browser.request("POST", "/dev/token", data={"csrf": "x"})
            assert refused.status == 404
            forced = await browser.raw("POST", "/login/dev/callback", data={"username": "a"})
            assert forced.status == 404 and BANNER not in forced.text
        assert [r for r in audit_events(services) if r["event"] != "key.rotated"] == []
    finally:
        await services.close()


# --- all of it, then the audit chain -----------------------------------------------------


async def test_audit_log_verifies_after_the_attacks(
    client: ContractClient, broker: Services
) -> None:
    victim, attacker = Browser(client), Browser(client)
    flow = await victim.start_sign_in("//evil.example")
    await attacker.start_sign_in()
    assert (await attacker.finish_sign_in(flow)).status == 400  # wrong browser
    assert (await victim.finish_sign_in(flow, "Bad Name")).status == 400  # bad username
    cookie = victim.cookies[FLOW_COOKIE]
    done = await victim.finish_sign_in(flow)  # success
    assert done.status == 303 and done.headers["Location"] == "/"
    attacker.cookies[FLOW_COOKIE] = cookie
    assert (await attacker.finish_sign_in(flow)).status == 400  # replay
    assert (await victim.request("POST", "/dev/token", data={"csrf": "nope"})).status == 400
    csrf = await victim.csrf()
    assert (await victim.request("POST", "/dev/token", data={"csrf": csrf})).status == 200
    big = b"csrf=" + b"x" * broker.settings.server.max_body_bytes
    assert (await victim.raw("POST", "/dev/token", data=big, headers={
        "Content-Type": "application/x-www-form-urlencoded"})).status == 413  # fmt: skip
    assert (await victim.request("POST", "/logout", data={"csrf": "nope"})).status == 400
    events = [
        (r["event"], r["outcome"]) for r in audit_events(broker) if r["event"] != "key.rotated"
    ]
    assert events == [
        ("sign_in", "rejected"),  # wrong browser
        ("sign_in", "rejected"),  # bad username
        ("sign_in", "success"),
        ("sign_in", "rejected"),  # replay
        ("token.issued", "success"),
    ]
    report = await broker.audit.verify()
    assert report.ok, report.problem
    assert report.records == len(audit_events(broker))


@pytest.mark.parametrize("cookie", ["été.abc", "\u2603", "a.b.c.\u00ff"])
async def test_non_ascii_session_cookie_is_ignored_not_a_crash(
    client: ContractClient, cookie: str
) -> None:
    response = await client.raw.get(
        "/", headers={"Accept": "text/html", "Cookie": f"broker_session={cookie}"}
    )
    assert response.status == 200
    assert "Sign in" in await response.text()
