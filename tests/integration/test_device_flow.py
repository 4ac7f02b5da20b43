"""RFC 8628 device authorization against a broker on real OpenBao, over HTTP.

Every response is checked against openapi.yaml. Refusals assert that nothing was decided or
issued: no `device.approved` / `token.issued` audit record, the poll still pending, and the
audit chain still verifies. The helpers here are shared with test_cli_login.py.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.cache import MemoryCache
from broker.devvault import DevVault
from broker.oauth.clients import CLI_CLIENT_ID
from broker.oauth.device import DEVICE_CODE_GRANT, MAX_WRONG_CODES
from broker.services import Services
from broker.sessions import SESSION_COOKIE
from tests.peers.broker import (
    Checked,
    ContractClient,
    audit_events,
    make_settings,
    sign_in,
    start_broker,
)

HTML = {"Accept": "text/html"}
OTHER_CLIENT = "other-cli"
NO_DEVICE_CLIENT = "no-device"
USER_CODE = re.compile(r"^[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}$")


def device_clients() -> list[dict[str, Any]]:
    """A second public device client (to steal codes with) and one without the grant."""
    return [
        {"client_id": OTHER_CLIENT, "name": "Another CLI", "auth_method": "none",
         "grant_types": [DEVICE_CODE_GRANT, "refresh_token"], "scopes": ["openid", "profile"]},
        {"client_id": NO_DEVICE_CLIENT, "auth_method": "none",
         "grant_types": ["refresh_token"], "scopes": ["openid"]},
    ]  # fmt: skip


@pytest_asyncio.fixture
async def api_for(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[Any]:
    """A factory: `await api_for(**settings_sections)` → (Services, ContractClient)."""
    opened: list[tuple[Services, TestClient[Any, Any]]] = []

    async def start(**sections: Any) -> tuple[Services, ContractClient]:
        settings = make_settings(
            tmp_path, openbao.address, vault_approle, clients=device_clients(), **sections
        )
        svc = await start_broker(settings)
        raw: TestClient[Any, Any] = TestClient(TestServer(app_with_services(svc)))
        await raw.start_server()
        opened.append((svc, raw))
        return svc, ContractClient(raw)

    yield start
    for svc, raw in opened:
        await raw.close()
        await svc.close()


# --- helpers -------------------------------------------------------------------------------


class Browser:
    """One browser: its cookies are kept here and sent explicitly, so several browsers can
    share one client without sharing a session."""

    def __init__(self, client: ContractClient) -> None:
        self.client = client
        self.cookies: dict[str, str] = {}

    async def request(self, method: str, path: str, **kw: Any) -> Checked:
        headers = dict(HTML)
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        self.client.raw.session.cookie_jar.clear()
        response = await self.client.request(method, path, headers=headers, **kw)
        self.client.raw.session.cookie_jar.clear()
        self.cookies.update({k: v for k, v in response.cookies.items() if v})
        return response

    async def sign_in(self, username: str, next_url: str = "/") -> Checked:
        """The dev upstream sign-in (the shared `sign_in` helper); keeps the session cookie."""
        self.client.raw.session.cookie_jar.clear()
        done = await sign_in(self.client, username, ("students",), next_url)
        self.client.raw.session.cookie_jar.clear()
        assert done.status == 303, done.text
        self.cookies[SESSION_COOKIE] = done.cookies[SESSION_COOKIE]
        return done

    async def csrf(self) -> str:
        page = await self.request("GET", "/device")
        assert page.status == 200, page.text
        found = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert found is not None, page.text
        return found.group(1)

    async def approve(self, user_code: str, decision: str = "approve") -> Checked:
        """Enter the code, check the confirmation page, then press Approve (or Deny)."""
        csrf = await self.csrf()
        page = await self.request("POST", "/device", data={"csrf": csrf, "user_code": user_code})
        assert page.status == 200, page.text
        assert 'value="approve"' in page.text and 'value="deny"' in page.text
        form = {"csrf": csrf, "user_code": user_code, "decision": decision}
        return await self.request("POST", "/device/decision", data=form)


async def start_device(
    client: ContractClient, client_id: str = CLI_CLIENT_ID, scope: str | None = None
) -> dict[str, Any]:
    form = {"client_id": client_id} | ({"scope": scope} if scope else {})
    response = await client.post("/oauth/device_authorization", data=form)
    assert response.status == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    body: dict[str, Any] = response.json()
    return body


async def poll(client: ContractClient, device_code: str, client_id: str = CLI_CLIENT_ID) -> Checked:
    form = {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code, "client_id": client_id}
    return await client.post("/oauth/token", data=form)


def error_of(response: Checked) -> str:
    assert response.status == 400, (response.status, response.text)
    assert response.headers["Cache-Control"] == "no-store"
    return str(response.json()["error"])


async def assert_audit_intact(svc: Services) -> None:
    report = await svc.audit.verify()
    assert report.ok, report.problem


def issued_by_device(svc: Services) -> list[dict[str, Any]]:
    issued = audit_events(svc, "token.issued")
    return [r for r in issued if r["data"]["grant_type"] == DEVICE_CODE_GRANT]


# --- the whole flow ------------------------------------------------------------------------


async def test_device_flow_end_to_end(api_for: Any) -> None:
    svc, client = await api_for()
    started = await start_device(client)
    assert USER_CODE.match(started["user_code"])
    assert started["verification_uri"] == "http://127.0.0.1:8080/device"
    complete = urlsplit(started["verification_uri_complete"])
    assert complete.path == "/device"
    assert parse_qs(complete.query) == {"user_code": [started["user_code"]]}
    assert started["expires_in"] == 600 and started["interval"] == 5
    device_code = started["device_code"]
    assert len(device_code) >= 43  # 256 bits, base64url

    # Polling: pending, then too soon → slow_down.
    assert error_of(await poll(client, device_code)) == "authorization_pending"
    slow = await poll(client, device_code)
    assert error_of(slow) == "slow_down"
    assert "10 seconds" in slow.json()["error_description"]

    # The verification URI sends an anonymous browser to sign in first, then back.
    browser = Browser(client)
    link = f"/device?user_code={started['user_code']}"
    anonymous = await browser.request("GET", link)
    assert anonymous.status == 302
    to_login = urlsplit(anonymous.headers["Location"])
    assert to_login.path == "/login"
    assert parse_qs(to_login.query) == {"next": [link]}
    back = await browser.sign_in("alice", next_url=link)
    assert back.headers["Location"] == link
    form_page = await browser.request("GET", link)
    assert f'value="{started["user_code"]}"' in form_page.text  # prefilled

    # The user types the code in lower case without the hyphen; the page names the client.
    csrf = await browser.csrf()
    typed = started["user_code"].replace("-", "").lower()
    confirm = await browser.request("POST", "/device", data={"csrf": csrf, "user_code": typed})
    assert confirm.status == 200
    assert "binder-broker command line" in confirm.text and CLI_CLIENT_ID in confirm.text
    for scope in ("openid", "profile", "email", "groups", "offline_access"):
        assert f"<code>{scope}</code>" in confirm.text
    assert issued_by_device(svc) == []
    approved = await browser.request(
        "POST", "/device/decision",
        data={"csrf": csrf, "user_code": started["user_code"], "decision": "approve"},
    )  # fmt: skip
    assert approved.status == 200, approved.text
    assert "Device approved" in approved.text
    # A second decision on the same code changes nothing.
    again = await browser.request(
        "POST", "/device/decision",
        data={"csrf": csrf, "user_code": started["user_code"], "decision": "deny"},
    )  # fmt: skip
    assert again.status == 400 and "already used" in again.text

    # The next poll (no wait needed once decided) gets the tokens, once.
    tokens = await poll(client, device_code)
    assert tokens.status == 200, tokens.text
    assert tokens.headers["Cache-Control"] == "no-store"
    body = tokens.json()
    assert body["token_type"] == "Bearer"
    claims = svc.tokens.verify(body["access_token"], audience=svc.tokens.issuer)
    principal_id = claims["sub"]
    assert claims["client_id"] == CLI_CLIENT_ID
    assert claims["scope"] == (
        "openid profile email groups offline_access repo:read grants secrets"
    )
    assert claims["groups"] == ["students"]
    id_claims = svc.tokens.verify(body["id_token"], audience=CLI_CLIENT_ID, kind="id")
    assert id_claims["sub"] == principal_id and id_claims["preferred_username"] == "alice"
    replay = await poll(client, device_code)
    assert error_of(replay) == "invalid_grant"

    # The refresh token works (and rotates).
    refreshed = await client.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"],
              "client_id": CLI_CLIENT_ID},
    )  # fmt: skip
    assert refreshed.status == 200, refreshed.text
    new = refreshed.json()
    assert svc.tokens.verify(new["access_token"], audience=svc.tokens.issuer)["sub"] == principal_id
    assert new["refresh_token"] != body["refresh_token"]

    # Audit: one approval naming client and user, one device issuance; no code anywhere.
    [record] = audit_events(svc, "device.approved")
    assert record["data"]["client"] == CLI_CLIENT_ID
    assert record["data"]["principal"] == principal_id
    assert record["actor"] == principal_id and record["outcome"] == "success"
    assert len(issued_by_device(svc)) == 1
    log_text = Path(svc.settings.audit.path).read_text()
    for secret in (device_code, started["user_code"], typed.upper(), body["access_token"]):
        assert secret not in log_text
    await assert_audit_intact(svc)


async def test_public_client_may_narrow_scopes(api_for: Any) -> None:
    svc, client = await api_for()
    started = await start_device(client, scope="openid groups")
    browser = Browser(client)
    await browser.sign_in("bob")
    assert (await browser.approve(started["user_code"])).status == 200
    body = (await poll(client, started["device_code"])).json()
    assert body["scope"] == "openid groups"
    claims = svc.tokens.verify(body["access_token"], audience=svc.tokens.issuer)
    assert claims["scope"] == "openid groups"


# --- refusals ------------------------------------------------------------------------------


async def test_denied_request_gets_access_denied(api_for: Any) -> None:
    svc, client = await api_for()
    started = await start_device(client)
    browser = Browser(client)
    await browser.sign_in("carol")
    denied = await browser.approve(started["user_code"], decision="deny")
    assert denied.status == 200 and "Device denied" in denied.text
    assert error_of(await poll(client, started["device_code"])) == "access_denied"
    assert error_of(await poll(client, started["device_code"])) == "access_denied"
    [record] = audit_events(svc, "device.denied")
    assert record["data"]["client"] == CLI_CLIENT_ID and record["outcome"] == "denied"
    assert record["data"]["principal"] == record["actor"]
    assert audit_events(svc, "device.approved") == []
    assert audit_events(svc, "token.issued") == []
    await assert_audit_intact(svc)


async def test_expired_code_gets_expired_token(api_for: Any) -> None:
    svc, client = await api_for(oauth={"device_code_ttl": 1, "device_poll_interval": 1})
    started = await start_device(client)
    assert started["expires_in"] == 1
    browser = Browser(client)
    await browser.sign_in("dave")
    csrf = await browser.csrf()
    await asyncio.sleep(1.5)
    assert error_of(await poll(client, started["device_code"])) == "expired_token"
    # The user can no longer find it either.
    page = await browser.request(
        "POST", "/device", data={"csrf": csrf, "user_code": started["user_code"]}
    )
    assert page.status == 400 and "not valid or has expired" in page.text
    decided = await browser.request(
        "POST", "/device/decision",
        data={"csrf": csrf, "user_code": started["user_code"], "decision": "approve"},
    )  # fmt: skip
    assert decided.status == 400
    assert error_of(await poll(client, started["device_code"])) == "expired_token"
    assert audit_events(svc, "device.approved") == []
    assert audit_events(svc, "token.issued") == []
    await assert_audit_intact(svc)


async def test_another_clients_code_is_invalid_grant(api_for: Any) -> None:
    svc, client = await api_for()
    started = await start_device(client)
    browser = Browser(client)
    await browser.sign_in("erin")
    assert (await browser.approve(started["user_code"])).status == 200
    stolen = await poll(client, started["device_code"], client_id=OTHER_CLIENT)
    assert error_of(stolen) == "invalid_grant"
    assert error_of(await poll(client, "not-a-device-code")) == "invalid_grant"
    assert audit_events(svc, "token.issued") == []
    # The theft attempt consumed nothing: the right client still gets its tokens.
    assert (await poll(client, started["device_code"])).status == 200
    [issued] = audit_events(svc, "token.issued")
    assert issued["data"]["client"] == CLI_CLIENT_ID
    await assert_audit_intact(svc)


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        pytest.param({"client_id": NO_DEVICE_CLIENT}, 400, "unauthorized_client", id="no-grant"),
        pytest.param({"client_id": "nobody"}, 401, "invalid_client", id="unknown-client"),
        pytest.param({}, 401, "invalid_client", id="no-client"),
        pytest.param({"client_id": OTHER_CLIENT, "scope": "openid groups"}, 400, "invalid_scope",
                     id="scope-not-allowed"),
    ],
)  # fmt: skip
async def test_device_authorization_refusals(
    api_for: Any, form: Mapping[str, str], status: int, error: str
) -> None:
    svc, client = await api_for()
    assert isinstance(svc.cache, MemoryCache)
    held = len(svc.cache)
    response = await client.post("/oauth/device_authorization", data=dict(form))
    assert response.status == status
    assert response.json()["error"] == error
    assert "device_code" not in response.json()
    assert len(svc.cache) == held  # no device state was stored


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param("no-csrf", id="no-csrf"),
        pytest.param("wrong-csrf", id="wrong-csrf"),
        pytest.param("other-session", id="csrf-of-another-session"),
        pytest.param("no-session", id="right-csrf-without-session-cookie"),
    ],
)
async def test_approve_needs_the_sessions_csrf(api_for: Any, attack: str) -> None:
    svc, client = await api_for()
    started = await start_device(client)
    victim = Browser(client)
    await victim.sign_in("frank")
    good = await victim.csrf()
    sender, form = victim, {"user_code": started["user_code"], "decision": "approve"}
    if attack == "wrong-csrf":
        form["csrf"] = "wrong-csrf-value"
    elif attack == "other-session":
        mallory = Browser(client)
        await mallory.sign_in("mallory")
        form["csrf"] = await mallory.csrf()
    elif attack == "no-session":
        sender, form["csrf"] = Browser(client), good  # a cross-site post carries no cookie
    response = await sender.request("POST", "/device/decision", data=form)
    assert response.status == 400
    assert audit_events(svc, "device.approved") == []
    assert error_of(await poll(client, started["device_code"])) == "authorization_pending"
    assert audit_events(svc, "token.issued") == []
    # Control: the same browser with its own csrf approves.
    assert (await victim.approve(started["user_code"])).status == 200
    assert len(audit_events(svc, "device.approved")) == 1
    await assert_audit_intact(svc)


async def test_wrong_user_codes_are_limited_per_session(api_for: Any) -> None:
    svc, client = await api_for()
    started = await start_device(client)
    wrong = "BBBB-BBBB" if started["user_code"] != "BBBB-BBBB" else "CCCC-CCCC"
    browser = Browser(client)
    await browser.sign_in("grace")
    csrf = await browser.csrf()

    async def enter(code: str) -> Checked:
        return await browser.request("POST", "/device", data={"csrf": csrf, "user_code": code})

    for _ in range(MAX_WRONG_CODES - 1):
        assert (await enter(wrong)).status == 400
    # A right code costs no attempt; a malformed one is not a guess.
    assert (await enter(started["user_code"])).status == 200
    assert (await enter("AEIO-U123")).status == 400
    assert (await enter(wrong)).status == 400  # the tenth wrong code
    refused = await enter(started["user_code"])
    assert refused.status == 429 and "Too many wrong codes" in refused.text
    assert refused.headers["Retry-After"] == "600"
    blocked = await browser.request(
        "POST", "/device/decision",
        data={"csrf": csrf, "user_code": started["user_code"], "decision": "approve"},
    )  # fmt: skip
    assert blocked.status == 429
    assert audit_events(svc, "device.approved") == []
    assert error_of(await poll(client, started["device_code"])) == "authorization_pending"
    # The limit is per session: another session of the user can still approve.
    other = Browser(client)
    await other.sign_in("grace")
    assert (await other.approve(started["user_code"])).status == 200
    assert (await poll(client, started["device_code"])).status == 200
    await assert_audit_intact(svc)


async def test_device_page_without_session_never_echoes_input(api_for: Any) -> None:
    _, client = await api_for()
    browser = Browser(client)
    hostile = await browser.request("GET", "/device", params={"user_code": "//evil.example"})
    assert hostile.status == 302
    assert parse_qs(urlsplit(hostile.headers["Location"]).query) == {"next": ["/device"]}
    posted = await browser.request("POST", "/device", data={"user_code": "BCDF-GHJK"})
    assert posted.status == 400 and "Sign in first" in posted.text
