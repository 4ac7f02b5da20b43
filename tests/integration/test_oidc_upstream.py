"""The OIDC upstream adapter against two real OPs (node oidc-provider): sign-in through each,
a broker code+PKCE flow carrying the OP's groups and affiliation, the IdP hint, upstream
refresh with the refresh token in Vault only, and an OP that is down when the broker starts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import hvac
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from adapters.base import Principal, Refreshable
from adapters.errors import AccessDenied
from adapters.upstream.oidc import OidcUpstream
from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault
from broker.oauth.clients import hash_secret
from broker.services import Services, resolve_secret
from broker.sessions import SESSION_COOKIE
from broker.settings import OidcUpstreamConfig
from tests.integration.test_authorize import HUB, SECRET, basic, pkce
from tests.peers.broker import ContractClient, audit_events, make_settings, start_broker
from tests.peers.oidc_op import (
    OidcOp,
    free_port,
    op_cookie_jar,
    scripted_login,
    start_oidc_op,
)

PUBLIC = "http://127.0.0.1:8080"  # make_settings' public_url; the OPs redirect there
SECRET_A = "op-a-client-secret-0123456789"
ADA = {
    "login": "ada",
    "password": "ada-password",
    "sub": "ada-at-a",
    "name": "Ada Lovelace",
    "email": "ada@a.example.edu",
    "groups": ["physics", "hpc-users"],
    "eduperson_scoped_affiliation": ["staff@a.example.edu", "member@a.example.edu"],
    "acr": "https://refeds.org/profile/mfa",
    "amr": ["pwd", "otp", "mfa"],
}
BOB = {
    "login": "bob",
    "password": "bob-password",
    "sub": "bob-at-b",
    "name": "Bob Babbage",
    "email": "bob@b.example.org",
    "groups": ["chemistry"],
    "eduperson_scoped_affiliation": ["student@b.example.org"],
    "amr": ["pwd"],
}


def callback(upstream: str) -> str:
    return f"{PUBLIC}/login/{upstream}/callback"


@pytest_asyncio.fixture(scope="module")
async def ops(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, OidcOp]]:
    """op-a: confidential client, claims at userinfo (conformant ID token), RS256.
    op-b: public client (PKCE only), claims in the ES256 ID token, userinfo not used."""
    work = tmp_path_factory.mktemp("oidc-ops")
    a = await start_oidc_op(
        clients=[
            {
                "client_id": "broker-a",
                "client_secret": SECRET_A,
                "redirect_uris": [callback("op-a"), callback("op-a-refresh")],
            },
        ],
        accounts=[ADA],
        workdir=work,
        extra_params=["selected_idp"],
    )
    try:
        b = await start_oidc_op(
            clients=[
                {
                    "client_id": "broker-b",
                    "redirect_uris": [callback("op-b")],
                    "id_token_alg": "ES256",
                },
            ],
            accounts=[BOB],
            workdir=work,
            conform_id_token_claims=False,
        )
    except BaseException:
        a.stop()
        raise
    try:
        yield {"a": a, "b": b}
    finally:
        a.stop()
        b.stop()


async def build_upstream(svc: Services, **config: Any) -> OidcUpstream:
    """An extra OidcUpstream added to a running broker, from a settings entry, for tests that
    need options settings do not offer (no discovery back-off)."""
    c = OidcUpstreamConfig.model_validate({"type": "oidc", **config})
    upstream = OidcUpstream(
        id=c.id, display_name=c.display_name, issuer=c.issuer, client_id=c.client_id,
        client_secret=await resolve_secret(c.client_secret, svc.vault) if c.client_secret else None,
        scopes=c.scopes, id_token_algs=c.id_token_algs, claims=c.claims.model_dump(),
        use_userinfo=c.use_userinfo, idp_hint_param=c.idp_hint_param, auth_params=c.auth_params,
        keep_refresh_token=c.keep_refresh_token, clock_skew=c.clock_skew, http=svc.http,
        cache=svc.cache, vault=svc.vault, vault_prefix=svc.settings.vault.prefix,
        discovery_retry=0,
    )  # fmt: skip
    await upstream.start()
    svc.upstreams[upstream.id] = upstream
    return upstream


def op_a_config(op: OidcOp, **extra: Any) -> dict[str, Any]:
    return {
        "id": "op-a", "display_name": "University A", "issuer": op.issuer,
        "client_id": "broker-a", "client_secret": SECRET_A,
        "scopes": ["openid", "profile", "email", "groups"], "idp_hint_param": "selected_idp",
    } | extra  # fmt: skip


def op_b_config(op: OidcOp) -> dict[str, Any]:
    return {
        "id": "op-b", "display_name": "Institute B", "issuer": op.issuer,
        "client_id": "broker-b", "scopes": ["openid", "profile", "email", "groups"],
        "id_token_algs": ["ES256"], "use_userinfo": False,
    }  # fmt: skip


@pytest_asyncio.fixture
async def broker(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth, ops: dict[str, OidcOp]
) -> AsyncIterator[Services]:
    hub = {
        "client_id": "hub", "name": "Example BinderHub", "secret_hash": hash_secret(SECRET),
        "redirect_uris": [HUB], "first_party": True,
        "grant_types": ["authorization_code", "refresh_token"],
        "scopes": ["openid", "profile", "email", "groups"],
    }  # fmt: skip
    upstreams = [
        {"type": "oidc", **op_a_config(ops["a"])},
        {"type": "oidc", **op_b_config(ops["b"])},
    ]
    settings = make_settings(
        tmp_path, openbao.address, vault_approle, mode="production", upstreams=upstreams,
        clients=[hub],
    )  # fmt: skip
    svc = await start_broker(settings, dev_mode=False)  # builds and starts both upstreams
    try:
        yield svc
    finally:
        await svc.close()


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    """The user's browser at the OPs (the broker side is the TestClient's cookie jar)."""
    async with aiohttp.ClientSession(cookie_jar=op_cookie_jar()) as http:
        yield http


async def sign_in_at_op(
    client: ContractClient,
    http: aiohttp.ClientSession,
    upstream: str,
    account: dict[str, Any],
    next_url: str = "/",
) -> Any:
    """GET /login?idp=… → OP login and consent → the broker's callback; the callback response."""
    start = await client.get(
        "/login", params={"idp": upstream, "next": next_url}, headers={"Accept": "text/html"}
    )
    assert start.status == 302, start.text
    back = await scripted_login(
        http, start.headers["Location"], account["login"], account["password"]
    )
    assert back.startswith(callback(upstream) + "?"), back
    parts = urlsplit(back)
    return await client.get(f"{parts.path}?{parts.query}", headers={"Accept": "text/html"})


async def session_principal(svc: Services, cookie: str) -> Principal:
    session = await svc.sessions.load(cookie)
    assert session is not None
    return session.principal


async def test_two_upstreams_sign_in_and_broker_code_flow(
    broker: Services, browser: aiohttp.ClientSession
) -> None:
    svc = broker
    async with TestClient(TestServer(app_with_services(svc))) as raw:
        client = ContractClient(raw)
        verifier, challenge = pkce()
        params = {
            "response_type": "code", "client_id": "hub", "redirect_uri": HUB,
            "scope": "openid profile email groups", "state": "st-1", "nonce": "n-1",
            "code_challenge": challenge, "code_challenge_method": "S256",
        }  # fmt: skip
        first = await client.get("/oauth/authorize", params=params, headers={"Accept": "text/html"})
        assert first.status == 302 and first.headers["Location"].startswith("/login")
        next_url = parse_qs(urlsplit(first.headers["Location"]).query)["next"][0]
        done = await sign_in_at_op(client, browser, "op-a", ADA, next_url)
        assert done.status == 303, done.text
        assert done.headers["Location"] == next_url and SESSION_COOKIE in done.cookies
        resumed = await client.get(next_url, headers={"Accept": "text/html"})
        assert resumed.status == 302, resumed.text
        answer = parse_qs(urlsplit(resumed.headers["Location"]).query)
        token = await client.post(
            "/oauth/token",
            headers=basic("hub", SECRET),
            data={"grant_type": "authorization_code", "code": answer["code"][0],
                  "redirect_uri": HUB, "code_verifier": verifier},
        )  # fmt: skip
        assert token.status == 200, token.text
        id_claims = svc.tokens.verify(token.json()["id_token"], audience="hub", kind="id")
        # groups and affiliation came from op-a's userinfo (its ID token is conformant).
        assert id_claims["groups"] == ADA["groups"]
        assert id_claims["affiliation"] == ADA["eduperson_scoped_affiliation"]
        assert id_claims["email"] == ADA["email"] and id_claims["name"] == ADA["name"]
        assert id_claims["acr"] == ADA["acr"]  # the OP's assurance reaches the launcher

        principal_a = await session_principal(svc, done.cookies[SESSION_COOKIE])
        assert (principal_a.idp, principal_a.issuer, principal_a.subject) == (
            "op-a", svc.upstreams["op-a"].issuer, ADA["sub"],
        )  # fmt: skip
        assert principal_a.mfa and principal_a.amr == ("pwd", "otp", "mfa")
        assert principal_a.acr == ADA["acr"]
        assert id_claims["sub"] == principal_a.id

    # A second browser signs in through the other OP, whose ID token carries the claims.
    async with (
        TestClient(TestServer(app_with_services(svc))) as raw_b,
        aiohttp.ClientSession(cookie_jar=op_cookie_jar()) as browser_b,
    ):
        done_b = await sign_in_at_op(ContractClient(raw_b), browser_b, "op-b", BOB)
        assert done_b.status == 303, done_b.text
        principal_b = await session_principal(svc, done_b.cookies[SESSION_COOKIE])
    assert principal_b.idp == "op-b" and principal_b.subject == BOB["sub"]
    assert principal_b.issuer == svc.upstreams["op-b"].issuer != principal_a.issuer
    assert principal_b.groups == ("chemistry",)
    assert principal_b.affiliation == ("student@b.example.org",)
    assert not principal_b.mfa
    signed = [e for e in audit_events(svc, "sign_in") if e["outcome"] == "success"]
    assert [e["data"]["idp"] for e in signed] == ["op-a", "op-b"]


async def test_idp_hint_and_login_hint_pass_through(broker: Services) -> None:
    async with TestClient(TestServer(app_with_services(broker))) as raw:
        start = await ContractClient(raw).get(
            "/login",
            params={"idp": "op-a", "entity": "https://idp.example.edu/idp", "login_hint": "ada"},
            headers={"Accept": "text/html"},
        )
    assert start.status == 302, start.text
    url = urlsplit(start.headers["Location"])
    query = parse_qs(url.query)
    assert f"{url.scheme}://{url.netloc}{url.path}".startswith(broker.upstreams["op-a"].issuer)
    assert query["selected_idp"] == ["https://idp.example.edu/idp"]
    assert query["login_hint"] == ["ada"]
    assert query["code_challenge_method"] == ["S256"] and "code_verifier" not in query
    assert query["redirect_uri"] == [callback("op-a")] and query["client_id"] == ["broker-a"]
    assert len(query["nonce"][0]) >= 32 and query["state"][0]
    assert "prompt" not in query  # nothing asked for a fresh sign-in


async def test_prompt_login_at_the_broker_is_prompt_login_at_the_op(broker: Services) -> None:
    _verifier, challenge = pkce()
    params = {
        "response_type": "code", "client_id": "hub", "redirect_uri": HUB, "scope": "openid",
        "state": "st-p", "code_challenge": challenge, "code_challenge_method": "S256",
        "idp": "op-a", "prompt": "login",
    }  # fmt: skip
    async with TestClient(TestServer(app_with_services(broker))) as raw:
        client = ContractClient(raw)
        authorize = await client.get(
            "/oauth/authorize", params=params, headers={"Accept": "text/html"}
        )
        assert authorize.status == 302, authorize.text
        start = await client.get(authorize.headers["Location"], headers={"Accept": "text/html"})
    assert start.status == 302, start.text
    assert parse_qs(urlsplit(start.headers["Location"]).query)["prompt"] == ["login"]


async def test_upstream_refresh_keeps_the_token_in_vault_only(
    broker: Services,
    browser: aiohttp.ClientSession,
    ops: dict[str, OidcOp],
    openbao_root: hvac.Client,
) -> None:
    svc = broker
    upstream = await build_upstream(
        svc, **op_a_config(ops["a"], id="op-a-refresh", keep_refresh_token=True)
    )
    assert isinstance(upstream, Refreshable)
    async with TestClient(TestServer(app_with_services(svc))) as raw:
        done = await sign_in_at_op(ContractClient(raw), browser, "op-a-refresh", ADA)
    assert done.status == 303, done.text
    principal = await session_principal(svc, done.cookies[SESSION_COOKIE])
    path = f"{svc.settings.vault.prefix}/upstream-tokens/op-a-refresh/{principal.id}"

    def stored() -> str | None:
        try:
            entry = openbao_root.secrets.kv.v2.read_secret_version(
                path=path, mount_point="secret", raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath:
            return None
        value = entry["data"]["data"]["refresh_token"]
        return str(value)

    first = stored()
    assert first
    session = await svc.sessions.load(done.cookies[SESSION_COOKIE])
    assert session is not None
    assert first not in json.dumps(session.principal.to_json())
    assert first not in Path(svc.settings.audit.path).read_text()

    updated = await upstream.refresh(principal)
    assert updated.id == principal.id and list(updated.groups) == ADA["groups"]
    assert updated.affiliation == tuple(ADA["eduperson_scoped_affiliation"])
    assert updated.auth_time == principal.auth_time
    second = stored()
    assert second and second != first  # the OP rotated it and the adapter kept the new one
    assert second not in json.dumps(updated.to_json())

    # An OP that refuses the token (here: the rotated-away one) ends upstream refresh.
    openbao_root.secrets.kv.v2.create_or_update_secret(
        path=path, secret={"refresh_token": first, "sub": ADA["sub"]}, mount_point="secret"
    )
    with pytest.raises(AccessDenied):
        await upstream.refresh(principal)
    assert stored() is None


async def test_op_down_at_start_does_not_stop_the_broker(broker: Services, tmp_path: Path) -> None:
    down_port = free_port()  # nothing listens here until the OP is started below
    issuer = f"http://127.0.0.1:{down_port}"
    upstream = await build_upstream(
        broker, id="later", display_name="Later University", issuer=issuer,
        client_id="broker-later", client_secret="later-secret-0123456789",
    )  # fmt: skip
    async with TestClient(TestServer(app_with_services(broker))) as raw:
        client = ContractClient(raw)
        down = await client.get("/login", params={"idp": "later"}, headers={"Accept": "text/html"})
        assert down.status == 503
        assert down.headers["X-Request-Id"] in down.text and "Traceback" not in down.text
        assert SESSION_COOKIE not in down.cookies
        # Other upstreams still work while this one is down.
        other = await client.get("/login", params={"idp": "op-b"}, headers={"Accept": "text/html"})
        assert other.status == 302
        op = await start_oidc_op(
            clients=[{"client_id": "broker-later", "client_secret": "later-secret-0123456789",
                      "redirect_uris": [callback("later")]}],
            accounts=[ADA], workdir=tmp_path, port=down_port,
        )  # fmt: skip
        try:
            up = await client.get(
                "/login", params={"idp": "later"}, headers={"Accept": "text/html"}
            )
            assert up.status == 302, up.text
            assert up.headers["Location"].startswith(f"{issuer}/auth?")
        finally:
            op.stop()
    assert upstream.issuer == issuer


async def test_broker_refresh_follows_the_upstream(
    broker: Services,
    browser: aiohttp.ClientSession,
    ops: dict[str, OidcOp],
    openbao_root: hvac.Client,
) -> None:
    """The broker's refresh_token grant refreshes at the OP first: while the OP accepts, new
    tokens are issued; once the OP refuses, the broker refuses too and ends the family."""
    svc = broker
    await build_upstream(svc, **op_a_config(ops["a"], id="op-a-refresh", keep_refresh_token=True))
    async with TestClient(TestServer(app_with_services(svc))) as raw:
        client = ContractClient(raw)
        verifier, challenge = pkce()
        params = {
            "response_type": "code", "client_id": "hub", "redirect_uri": HUB,
            "scope": "openid groups", "state": "st-r", "code_challenge": challenge,
            "code_challenge_method": "S256", "idp": "op-a-refresh",
        }  # fmt: skip
        first = await client.get("/oauth/authorize", params=params, headers={"Accept": "text/html"})
        next_url = parse_qs(urlsplit(first.headers["Location"]).query)["next"][0]
        done = await sign_in_at_op(client, browser, "op-a-refresh", ADA, next_url)
        assert done.status == 303, done.text
        resumed = await client.get(next_url, headers={"Accept": "text/html"})
        answer = parse_qs(urlsplit(resumed.headers["Location"]).query)
        token = await client.post(
            "/oauth/token", headers=basic("hub", SECRET),
            data={"grant_type": "authorization_code", "code": answer["code"][0],
                  "redirect_uri": HUB, "code_verifier": verifier},
        )  # fmt: skip
        assert token.status == 200, token.text
        principal = await session_principal(svc, done.cookies[SESSION_COOKIE])
        path = f"{svc.settings.vault.prefix}/upstream-tokens/op-a-refresh/{principal.id}"

        def upstream_token() -> str:
            entry = openbao_root.secrets.kv.v2.read_secret_version(
                path=path, mount_point="secret", raise_on_deleted_version=True
            )
            return str(entry["data"]["data"]["refresh_token"])

        before = upstream_token()
        refreshed = await client.post(
            "/oauth/token", headers=basic("hub", SECRET),
            data={"grant_type": "refresh_token", "refresh_token": token.json()["refresh_token"]},
        )  # fmt: skip
        assert refreshed.status == 200, refreshed.text
        assert upstream_token() != before  # the OP was asked, and rotated its token
        claims = svc.tokens.verify(refreshed.json()["access_token"], audience="hub")
        assert claims["groups"] == ADA["groups"]

        # The OP now refuses (its rotated-away token is all the broker holds).
        openbao_root.secrets.kv.v2.create_or_update_secret(
            path=path, secret={"refresh_token": before, "sub": ADA["sub"]}, mount_point="secret"
        )
        newest = refreshed.json()["refresh_token"]
        refused = await client.post(
            "/oauth/token", headers=basic("hub", SECRET),
            data={"grant_type": "refresh_token", "refresh_token": newest},
        )  # fmt: skip
        assert refused.status == 400 and refused.json()["error"] == "invalid_grant"
        assert "sign in again" in refused.json()["error_description"]
        [record] = audit_events(svc, "token.refresh_refused")
        assert record["actor"] == principal.id and record["data"]["idp"] == "op-a-refresh"
        # The whole family ended: no later refresh works even if the OP came back.
        assert not await svc.oauth.refresh.family_active(record["data"]["refresh_family"])
