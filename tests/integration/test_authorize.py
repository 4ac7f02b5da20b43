"""The authorization endpoint and the code grant, driven over HTTP like a browser and a
client would, against a real OpenBao; attacks assert the rejection and that nothing was
issued."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault
from broker.oauth.bearer import is_revoked
from broker.oauth.clients import hash_secret
from broker.services import Services
from tests.peers.broker import ContractClient, audit_events, make_settings, sign_in, start_broker

HUB = "https://hub.example.org/oauth_callback"
THIRD = "https://third.example.net/cb"
SECRET = "hub-secret-0123456789"


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    return verifier, challenge.decode()


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


@pytest_asyncio.fixture
async def oauth(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[tuple[Services, ContractClient]]:
    clients: list[dict[str, Any]] = [
        {
            "client_id": "hub",
            "name": "Example BinderHub",
            "secret_hash": hash_secret(SECRET),
            "redirect_uris": [HUB, "http://127.0.0.1:9999/cb"],
            "first_party": True,
            "grant_types": ["authorization_code", "refresh_token"],
            "scopes": ["openid", "profile", "email", "groups", "launch:aws"],
        },
        {
            "client_id": "third",
            "name": "Third-party notebook service",
            "auth_method": "none",
            "redirect_uris": [THIRD],
            "grant_types": ["authorization_code", "refresh_token"],
        },
    ]
    settings = make_settings(tmp_path, openbao.address, vault_approle, clients=clients)
    services = await start_broker(settings)
    async with TestClient(TestServer(app_with_services(services))) as raw:
        yield services, ContractClient(raw)
    await services.close()


def authorize_params(
    client_id: str = "hub", redirect_uri: str = HUB, **extra: str
) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": "openid profile groups",
        "state": "st-123",
        "nonce": "n-456",
        "code_challenge_method": "S256",
    }
    params.update(extra)
    return params


async def get_code(client: ContractClient, params: dict[str, str]) -> dict[str, list[str]]:
    """Follow /oauth/authorize through sign-in (dev upstream) to the client's redirect."""
    first = await client.get("/oauth/authorize", params=params, headers={"Accept": "text/html"})
    assert first.status == 302, first.text
    location = first.headers["Location"]
    if location.startswith("/login"):
        next_url = parse_qs(urlsplit(location).query)["next"][0]
        signed = await sign_in(client, "ada", ("students",), next_url=next_url)
        assert signed.status == 303
        resumed = await client.get(signed.headers["Location"], headers={"Accept": "text/html"})
        assert resumed.status == 302, resumed.text
        location = resumed.headers["Location"]
    return parse_qs(urlsplit(location).query)


async def test_code_flow_with_pkce_refresh_and_id_token(
    oauth: tuple[Services, ContractClient],
) -> None:
    svc, client = oauth
    verifier, challenge = pkce()
    answer = await get_code(client, authorize_params(code_challenge=challenge))
    assert answer["state"] == ["st-123"] and answer["iss"] == [svc.settings.server.public_url]
    token = await client.post(
        "/oauth/token",
        headers=basic("hub", SECRET),
        data={
            "grant_type": "authorization_code",
            "code": answer["code"][0],
            "redirect_uri": HUB,
            "code_verifier": verifier,
        },
    )
    assert token.status == 200, token.text
    assert token.headers["Cache-Control"] == "no-store"
    body = token.json()
    assert body["token_type"] == "Bearer" and body["scope"] == "openid profile groups"
    claims = svc.tokens.verify(body["access_token"], audience="hub")
    assert claims["client_id"] == "hub" and claims["groups"] == ["students"]
    id_claims = svc.tokens.verify(body["id_token"], audience="hub", kind="id")
    assert id_claims["nonce"] == "n-456" and id_claims["name"] == "ada"
    refreshed = await client.post(
        "/oauth/token",
        headers=basic("hub", SECRET),
        data={
            "grant_type": "refresh_token",
            "refresh_token": body["refresh_token"],
            "scope": "openid",
        },
    )
    assert refreshed.status == 200, refreshed.text
    assert refreshed.json()["scope"] == "openid"
    assert refreshed.json()["refresh_token"] != body["refresh_token"]
    issued = audit_events(svc, "token.issued")
    assert [e["data"]["grant_type"] for e in issued] == ["authorization_code", "refresh_token"]
    assert issued[0]["data"]["policies"] == ["exchange-signed-in"]


async def test_refresh_token_reuse_revokes_the_family(
    oauth: tuple[Services, ContractClient],
) -> None:
    svc, client = oauth
    verifier, challenge = pkce()
    answer = await get_code(client, authorize_params(code_challenge=challenge))
    first = (
        await client.post(
            "/oauth/token",
            headers=basic("hub", SECRET),
            data={
                "grant_type": "authorization_code",
                "code": answer["code"][0],
                "redirect_uri": HUB,
                "code_verifier": verifier,
            },
        )
    ).json()
    second = (
        await client.post(
            "/oauth/token",
            headers=basic("hub", SECRET),
            data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]},
        )
    ).json()
    reuse = await client.post(
        "/oauth/token",
        headers=basic("hub", SECRET),
        data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]},
    )
    assert reuse.status == 400 and reuse.json()["error"] == "invalid_grant"
    after = await client.post(
        "/oauth/token",
        headers=basic("hub", SECRET),
        data={"grant_type": "refresh_token", "refresh_token": second["refresh_token"]},
    )
    assert after.status == 400  # the legitimate successor died with the family
    assert len(audit_events(svc, "token.issued")) == 2
    # ... and so did every access token issued with the family (RFC 9700 §4.14.2).
    for issued in (first, second):
        assert await is_revoked(svc, svc.tokens.verify(issued["access_token"])["jti"])


async def test_code_replay_revokes_what_it_issued(oauth: tuple[Services, ContractClient]) -> None:
    svc, client = oauth
    verifier, challenge = pkce()
    answer = await get_code(client, authorize_params(code_challenge=challenge))
    form = {
        "grant_type": "authorization_code",
        "code": answer["code"][0],
        "redirect_uri": HUB,
        "code_verifier": verifier,
    }
    first = await client.post("/oauth/token", headers=basic("hub", SECRET), data=form)
    assert first.status == 200
    access = first.json()["access_token"]
    assert (
        await client.get("/v1/whoami", headers={"Authorization": f"Bearer {access}"})
    ).status == 200
    replay = await client.post("/oauth/token", headers=basic("hub", SECRET), data=form)
    assert replay.status == 400 and replay.json()["error"] == "invalid_grant"
    assert "access_token" not in replay.json()
    assert (
        await client.get("/v1/whoami", headers={"Authorization": f"Bearer {access}"})
    ).status == 401
    refresh = await client.post(
        "/oauth/token",
        headers=basic("hub", SECRET),
        data={"grant_type": "refresh_token", "refresh_token": first.json()["refresh_token"]},
    )
    assert refresh.status == 400
    assert (
        len(audit_events(svc, "code.replayed")) == 1 and len(audit_events(svc, "token.issued")) == 1
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param({"code_challenge_method": None}, "S256", id="pkce-method-missing"),
        pytest.param({"code_challenge_method": "plain"}, "S256", id="pkce-plain"),
        pytest.param({"code_challenge": None}, "code_challenge", id="pkce-challenge-missing"),
        pytest.param({"code_challenge": "short"}, "code_challenge", id="pkce-challenge-malformed"),
        pytest.param({"state": None}, "state", id="state-missing"),
        pytest.param({"response_type": "token"}, "unsupported_response_type", id="implicit"),
        pytest.param({"scope": "openid admin:everything"}, "invalid_scope", id="scope-not-allowed"),
        pytest.param({"prompt": "none login"}, "prompt", id="prompt-none-with-other"),
    ],
)
async def test_bad_requests_go_back_to_the_client_with_an_error(
    oauth: tuple[Services, ContractClient], change: dict[str, str | None], expected: str
) -> None:
    svc, client = oauth
    _, challenge = pkce()
    params: dict[str, str] = authorize_params(code_challenge=challenge)
    for key, value in change.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    response = await client.get("/oauth/authorize", params=params, headers={"Accept": "text/html"})
    assert response.status == 302
    location = urlsplit(response.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == HUB
    answer = parse_qs(location.query)
    assert "code" not in answer
    assert expected in answer["error"][0] or expected in answer["error_description"][0]
    assert answer["iss"] == [svc.settings.server.public_url]
    assert audit_events(svc, "authorization.granted") == []


@pytest.mark.parametrize(
    "redirect_uri",
    [
        pytest.param("https://evil.example/cb", id="not-registered"),
        pytest.param("https://hub.example.org/oauth_callback/extra", id="extra-path-segment"),
        pytest.param("https://hub.example.org:8443/oauth_callback", id="other-port"),
        pytest.param("https://hub.example.org/oauth_callback/", id="trailing-slash"),
        pytest.param("https://hub.example.org/oauth_callback?x=1", id="added-query"),
        pytest.param("https://HUB.example.org/oauth_callback", id="case-changed-host"),
        pytest.param("http://127.0.0.1:9998/cb", id="loopback-other-port"),
    ],
)
async def test_unregistered_redirect_uri_shows_a_page_and_never_redirects(
    oauth: tuple[Services, ContractClient], redirect_uri: str
) -> None:
    svc, client = oauth
    _, challenge = pkce()
    params = authorize_params(redirect_uri=redirect_uri, code_challenge=challenge)
    response = await client.get("/oauth/authorize", params=params, headers={"Accept": "text/html"})
    assert response.status == 400
    assert "Location" not in response.headers
    assert "return address is not registered" in response.text
    assert "request id" in response.text
    assert audit_events(svc, "authorization.granted") == []


async def test_unknown_client_shows_a_page(oauth: tuple[Services, ContractClient]) -> None:
    _, client = oauth
    _, challenge = pkce()
    params = authorize_params(client_id="nobody", code_challenge=challenge)
    response = await client.get("/oauth/authorize", params=params, headers={"Accept": "text/html"})
    assert response.status == 400 and "Location" not in response.headers


@pytest.mark.parametrize(
    ("attack", "error_text"),
    [
        pytest.param("wrong-verifier", "code_verifier", id="pkce-wrong-verifier"),
        pytest.param("no-verifier", "code_verifier", id="pkce-no-verifier"),
        pytest.param("other-client", "another client", id="code-of-client-a-at-client-b"),
        pytest.param("other-redirect", "redirect_uri", id="redirect-uri-differs-at-token"),
    ],
)
async def test_code_redemption_attacks_issue_nothing(
    oauth: tuple[Services, ContractClient], attack: str, error_text: str
) -> None:
    svc, client = oauth
    verifier, challenge = pkce()
    answer = await get_code(client, authorize_params(code_challenge=challenge))
    form = {
        "grant_type": "authorization_code",
        "code": answer["code"][0],
        "redirect_uri": HUB,
        "code_verifier": verifier,
    }
    headers = basic("hub", SECRET)
    if attack == "wrong-verifier":
        form["code_verifier"] = pkce()[0]
    elif attack == "no-verifier":
        del form["code_verifier"]
    elif attack == "other-client":
        headers = {}
        form["client_id"] = "third"
        form["redirect_uri"] = THIRD
    elif attack == "other-redirect":
        form["redirect_uri"] = "http://127.0.0.1:9999/cb"
    response = await client.post("/oauth/token", headers=headers, data=form)
    assert response.status == 400
    assert response.json()["error"] in ("invalid_grant", "invalid_request")
    assert error_text in response.json()["error_description"]
    assert audit_events(svc, "token.issued") == []
    # The code was burnt by the failed attempt: the legitimate redemption fails too.
    form.update(code_verifier=verifier, redirect_uri=HUB)
    form.pop("client_id", None)
    late = await client.post("/oauth/token", headers=basic("hub", SECRET), data=form)
    assert late.status == 400 and audit_events(svc, "token.issued") == []


async def test_third_party_client_needs_consent_remembered_and_revocable(
    oauth: tuple[Services, ContractClient],
) -> None:
    svc, client = oauth
    verifier, challenge = pkce()
    params = authorize_params(
        client_id="third", redirect_uri=THIRD, code_challenge=challenge, scope="openid profile"
    )
    first = await client.get("/oauth/authorize", params=params, headers={"Accept": "text/html"})
    next_url = parse_qs(urlsplit(first.headers["Location"]).query)["next"][0]
    signed = await sign_in(client, "ada", ("students",), next_url=next_url)
    page = await client.get(signed.headers["Location"], headers={"Accept": "text/html"})
    assert page.status == 200 and "Third-party notebook service" in page.text
    # Browsers check form-action on the redirect to the client that follows the Allow post.
    third_origin = "{0.scheme}://{0.netloc}".format(urlsplit(THIRD))
    assert f"form-action 'self' {third_origin}" in page.headers["Content-Security-Policy"]
    fields = dict(re.findall(r'name="(req|csrf)" value="([^"]+)"', page.text))
    # Consent CSRF: a forged approval without the session's csrf token changes nothing.
    forged = await client.post(
        "/oauth/authorize/consent",
        data={"req": fields["req"], "csrf": "forged", "decision": "approve"},
        headers={"Accept": "text/html"},
    )
    assert forged.status == 400 and audit_events(svc, "consent.granted") == []
    approved = await client.post(
        "/oauth/authorize/consent",
        data={**fields, "decision": "approve"},
        headers={"Accept": "text/html"},
    )
    assert approved.status == 302
    code = parse_qs(urlsplit(approved.headers["Location"]).query)["code"][0]
    token = await client.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "client_id": "third",
            "redirect_uri": THIRD,
            "code_verifier": verifier,
        },
    )
    assert token.status == 200, token.text
    # Remembered: a second request goes straight back with a code.
    _, challenge2 = pkce()
    again = await client.get(
        "/oauth/authorize",
        params={**params, "code_challenge": challenge2},
        headers={"Accept": "text/html"},
    )
    assert again.status == 302 and "code=" in again.headers["Location"]
    # Withdrawn: the refresh token dies and the consent page comes back.
    consents = await client.get("/consents", headers={"Accept": "text/html"})
    csrf = re.search(r'name="csrf" value="([^"]+)"', consents.text)
    assert csrf is not None and "third" in consents.text
    withdrawn = await client.post(
        "/consents/revoke",
        data={"csrf": csrf.group(1), "client_id": "third"},
        headers={"Accept": "text/html"},
    )
    assert withdrawn.status == 303
    refresh = await client.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "client_id": "third",
            "refresh_token": token.json()["refresh_token"],
        },
    )
    assert refresh.status == 400
    _, challenge3 = pkce()
    third = await client.get(
        "/oauth/authorize",
        params={**params, "code_challenge": challenge3},
        headers={"Accept": "text/html"},
    )
    assert third.status == 200 and "Allow access?" in third.text
    assert len(audit_events(svc, "consent.revoked")) == 1


async def test_prompt_none_without_session_returns_login_required(
    oauth: tuple[Services, ContractClient],
) -> None:
    _svc, client = oauth
    _, challenge = pkce()
    response = await client.get(
        "/oauth/authorize",
        params=authorize_params(code_challenge=challenge, prompt="none"),
        headers={"Accept": "text/html"},
    )
    assert response.status == 302
    answer = parse_qs(urlsplit(response.headers["Location"]).query)
    assert answer["error"] == ["login_required"] and answer["state"] == ["st-123"]


async def test_prompt_login_forces_a_fresh_sign_in(oauth: tuple[Services, ContractClient]) -> None:
    _, client = oauth
    _, challenge = pkce()
    await get_code(client, authorize_params(code_challenge=challenge))  # signed in now
    _, challenge2 = pkce()
    again = await client.get(
        "/oauth/authorize",
        params=authorize_params(code_challenge=challenge2, prompt="login"),
        headers={"Accept": "text/html"},
    )
    assert again.status == 302 and again.headers["Location"].startswith("/login?")
    next_url = parse_qs(urlsplit(again.headers["Location"]).query)["next"][0]
    stale = await client.get(next_url, headers={"Accept": "text/html"})
    assert stale.headers["Location"].startswith("/login?")  # the old session still not enough
    signed = await sign_in(client, "ada", ("students",), next_url=next_url)
    done = await client.get(signed.headers["Location"], headers={"Accept": "text/html"})
    assert "code=" in done.headers["Location"]


async def test_duplicate_parameters_are_refused(oauth: tuple[Services, ContractClient]) -> None:
    _, client = oauth
    _, challenge = pkce()
    query = urlencode(authorize_params(code_challenge=challenge)) + "&state=again"
    response = await client.raw.get(
        f"/oauth/authorize?{query}", allow_redirects=False, headers={"Accept": "text/html"}
    )
    assert response.status == 400
    assert "more than once" in await response.text()
