"""The Globus upstream and the `globus` backend, with globus-sdk talking to the stand-in Globus
Auth (tests/peers/globus_auth.py) and tokens kept in the real OpenBao: the full sign-in through
/login (PKCE, state), the identity set (ACCESS + campus identity) and Globus groups mapped into
the Principal, dependent tokens stored in Vault only, `/v1/credentials` handing out and
refreshing a dependent token, and an MFA session requirement turned into a re-authentication.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric import rsa

import adapters.upstream.globus as globus_module
from adapters.base import Principal
from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault
from broker.oauth.issuance import remember_principal
from broker.services import Services
from broker.sessions import SESSION_COOKIE
from tests.peers.broker import Checked, ContractClient, audit_events, make_settings, start_broker
from tests.peers.globus_auth import (
    CLIENT_ID,
    CLIENT_SECRET,
    COLLECTION_ID,
    DATA_ACCESS_SCOPE,
    RESOURCE_SCOPE,
    TRANSFER_RS,
    TRANSFER_SCOPE,
    GlobusAuthStandIn,
    ada,
)

PUBLIC = "http://127.0.0.1:8080"  # make_settings' public_url; the stand-in redirects there
CALLBACK = f"{PUBLIC}/login/globus/callback"


def globus_section(**extra: Any) -> dict[str, Any]:
    """The one `[[upstreams]]` entry of a Globus-backed deployment."""
    return {
        "type": "globus", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
        "resource_scope": RESOURCE_SCOPE,
        "dependent_scopes": {TRANSFER_RS: TRANSFER_SCOPE, COLLECTION_ID: DATA_ACCESS_SCOPE},
    } | extra  # fmt: skip


async def globus_broker(
    tmp_path: Path, openbao: DevVault, approle: AppRoleAuth, **upstream: Any
) -> Services:
    settings = make_settings(
        tmp_path, openbao.address, approle, mode="production",
        upstreams=[globus_section(**upstream)], backends=[{"type": "globus"}],
    )  # fmt: skip
    return await start_broker(settings, dev_mode=False)


@pytest_asyncio.fixture
async def scene(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth, globus_auth: GlobusAuthStandIn
) -> AsyncIterator[tuple[Services, ContractClient, GlobusAuthStandIn]]:
    globus_auth.redirect_uris.append(CALLBACK)
    globus_auth.login_as(ada())
    svc = await globus_broker(tmp_path, openbao, vault_approle)
    try:
        async with TestClient(TestServer(app_with_services(svc))) as raw:
            yield svc, ContractClient(raw), globus_auth
    finally:
        await svc.close()


async def at_globus(url: str) -> str:
    """The browser at Globus: the stand-in's authorize answers with a redirect back."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, allow_redirects=False) as response,
    ):
        assert response.status == 302, await response.text()
        return response.headers["Location"]


async def callback(client: ContractClient, back: str) -> Checked:
    assert back.startswith(CALLBACK + "?"), back
    parts = urlsplit(back)
    return await client.get(f"{parts.path}?{parts.query}", headers={"Accept": "text/html"})


async def sign_in(client: ContractClient, next_url: str = "/") -> tuple[Checked, str]:
    """/login → Globus → callback; the callback response and the authorize URL used."""
    start = await client.get(
        "/login", params={"idp": "globus", "next": next_url}, headers={"Accept": "text/html"}
    )
    assert start.status == 302, start.text
    authorize = start.headers["Location"]
    return await callback(client, await at_globus(authorize)), authorize


async def principal_of(svc: Services, done: Checked) -> Principal:
    session = await svc.sessions.load(done.cookies[SESSION_COOKIE])
    assert session is not None
    return session.principal


async def stored_tokens(svc: Services, principal: Principal) -> dict[str, Any]:
    path = f"{svc.settings.vault.prefix}/upstream-tokens/globus/{principal.id}"
    entry = await svc.vault.kv_read(path)
    assert entry is not None
    tokens: dict[str, Any] = entry.data["tokens"]
    return tokens


async def test_sign_in_maps_identity_set_and_groups_and_keeps_tokens_in_vault_only(
    scene: tuple[Services, ContractClient, GlobusAuthStandIn],
) -> None:
    svc, client, globus = scene
    account = globus.account
    assert account is not None
    done, authorize = await sign_in(client, "/after")
    assert done.status == 303, done.text
    assert done.headers["Location"] == "/after"

    url = urlsplit(authorize)
    query = parse_qs(url.query)
    assert authorize.startswith(f"{globus.base}/v2/oauth2/authorize?")
    assert query["client_id"] == [CLIENT_ID] and query["redirect_uri"] == [CALLBACK]
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert RESOURCE_SCOPE in query["scope"][0].split() and "openid" in query["scope"][0].split()
    assert "prompt" not in query and "code_verifier" not in query

    principal = await principal_of(svc, done)
    assert principal.idp == "globus" and principal.issuer == globus.issuer
    assert principal.subject == account.primary.id  # the primary (ACCESS) identity
    assert principal.email == "ada@access-ci.org" and principal.display_name == "Ada Lovelace"
    claims = principal.claims
    assert claims["identity_provider"] == account.primary.identity_provider
    assert claims["identity_provider_display_name"] == "ACCESS CI (XSEDE)"
    assert claims["preferred_username"] == "ada@access-ci.org"
    assert claims["linked_usernames"] == ["ada@access-ci.org", "alovelace@uchicago.edu"]
    [campus] = [i for i in claims["linked_identities"] if i["sub"] != account.primary.id]
    assert campus["identity_provider_display_name"] == "University of Chicago"
    assert claims["organizations"] == ["ACCESS", "University of Chicago"]
    active = [g for g in account.groups if g["my_memberships"][0]["status"] == "active"]
    assert len(active) == 2  # the third membership is only an invitation
    expected = [n for g in active for n in (f"globus:{g['id']}", f"globus:{g['name']}")]
    assert list(principal.groups) == expected
    assert not principal.mfa

    tokens = await stored_tokens(svc, principal)
    assert set(tokens) == {TRANSFER_RS, COLLECTION_ID}
    assert all(t["refresh_token"] and t["access_token"] for t in tokens.values())
    assert tokens[COLLECTION_ID]["scope"] == DATA_ACCESS_SCOPE
    secrets_ = [v for t in tokens.values() for v in (t["access_token"], t["refresh_token"])]
    session_json = json.dumps(principal.to_json())
    audit_text = Path(svc.settings.audit.path).read_text()
    for secret in secrets_:
        assert secret not in session_json
        assert secret not in done.cookies[SESSION_COOKIE]
        assert secret not in audit_text
    [signed] = audit_events(svc, "sign_in")
    assert signed["outcome"] == "success" and signed["actor"] == principal.id


async def test_identity_set_from_userinfo_and_get_identities(
    scene: tuple[Services, ContractClient, GlobusAuthStandIn],
) -> None:
    """An ID token without `identity_set`: userinfo lists the linked identity by id only, and
    `GET /v2/api/identities` supplies its username and provider."""
    svc, client, globus = scene
    globus.id_token_without_identity_set = True
    done, _ = await sign_in(client)
    assert done.status == 303, done.text
    principal = await principal_of(svc, done)
    assert principal.claims["linked_usernames"] == ["ada@access-ci.org", "alovelace@uchicago.edu"]
    campus = principal.claims["linked_identities"][1]
    assert campus["organization"] == "University of Chicago"


async def test_credentials_hand_out_and_refresh_the_dependent_token(
    scene: tuple[Services, ContractClient, GlobusAuthStandIn],
) -> None:
    svc, client, globus = scene
    done, _ = await sign_in(client)
    assert done.status == 303, done.text
    principal = await principal_of(svc, done)
    await remember_principal(svc, principal)
    minted = await svc.tokens.mint(
        subject=principal.id, audience=svc.settings.server.public_url, client_id="launcher",
        scope=("launch:globus",),
    )  # fmt: skip
    auth = {"Authorization": f"Bearer {minted.token}"}
    stored = await stored_tokens(svc, principal)

    before = time.time()
    first = await client.post(
        "/v1/credentials", json={"backend": "globus", "role": TRANSFER_RS, "duration": 7200},
        headers=auth,
    )  # fmt: skip
    assert first.status == 201, first.text
    body = first.json()
    assert body["kind"] == "globus_token" and body["backend"] == "globus"
    assert body["credential"]["access_token"] == stored[TRANSFER_RS]["access_token"]
    assert body["credential"]["resource_server"] == TRANSFER_RS
    assert body["credential"]["scope"] == TRANSFER_SCOPE
    assert "refresh_token" not in body["credential"]
    # The lease ends when the policy says (launch-small: one hour), Globus's token later.
    assert body["clipped"] is True and body["policies"] == ["launch-small"]
    expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00")).timestamp()
    assert before + 3590 <= expires <= time.time() + 3601
    token_expires = datetime.fromisoformat(
        body["details"]["token_expires_at"].replace("Z", "+00:00")
    ).timestamp()
    assert token_expires > expires
    assert "refresh_token" not in globus.grants

    # The stored token has expired: the next request refreshes it with its refresh token.
    path = f"{svc.settings.vault.prefix}/upstream-tokens/globus/{principal.id}"
    entry = await svc.vault.kv_read(path)
    assert entry is not None
    expired = {**stored, TRANSFER_RS: {**stored[TRANSFER_RS], "expires_at": int(time.time()) - 5}}
    await svc.vault.kv_write(path, {**entry.data, "tokens": expired})
    second = await client.post(
        "/v1/credentials", json={"backend": "globus", "role": TRANSFER_RS}, headers=auth
    )
    assert second.status == 201, second.text
    renewed = second.json()["credential"]["access_token"]
    assert renewed != body["credential"]["access_token"]
    assert globus.grants.count("refresh_token") == 1
    assert globus.issued[renewed].resource_server == TRANSFER_RS
    after = await stored_tokens(svc, principal)
    assert after[TRANSFER_RS]["access_token"] == renewed
    assert after[TRANSFER_RS]["refresh_token"] == stored[TRANSFER_RS]["refresh_token"]
    assert after[TRANSFER_RS]["expires_at"] > time.time() + 3600

    collection = await client.post(
        "/v1/credentials", json={"backend": "globus", "role": COLLECTION_ID}, headers=auth
    )
    assert collection.status == 201, collection.text
    assert collection.json()["credential"]["access_token"] == stored[COLLECTION_ID]["access_token"]

    unknown = await client.post(
        "/v1/credentials", json={"backend": "globus", "role": "search.api.globus.org"},
        headers=auth,
    )  # fmt: skip
    assert unknown.status == 400 and unknown.json()["error"] == "invalid_request"
    audit_text = Path(svc.settings.audit.path).read_text()
    for token in (renewed, body["credential"]["access_token"]):
        assert token not in audit_text
    issued = [e for e in audit_events(svc, "credential.issued")]
    assert len(issued) == 3 and all(e["data"]["kind"] == "globus_token" for e in issued)


async def test_mfa_session_requirement_becomes_a_reauthentication(
    scene: tuple[Services, ContractClient, GlobusAuthStandIn],
) -> None:
    """The dependent-token grant answers with a session requirement (MFA) the first time:
    the callback sends the browser back to Globus, the same flow, and then succeeds."""
    svc, client, globus = scene
    globus.require_mfa_for_dependent = True
    first, authorize = await sign_in(client, "/after")
    assert first.status == 303, first.text
    again = first.headers["Location"]
    assert again.startswith(f"{globus.base}/v2/oauth2/authorize?")
    assert SESSION_COOKIE not in first.cookies
    query = parse_qs(urlsplit(again).query)
    assert query["session_required_mfa"] == ["true"] and query["prompt"] == ["login"]
    assert query["state"] == parse_qs(urlsplit(authorize).query)["state"]
    assert query["code_challenge"] != parse_qs(urlsplit(authorize).query)["code_challenge"]
    assert "multi-factor" in query["session_message"][0]

    done = await callback(client, await at_globus(again))
    assert done.status == 303, done.text
    assert done.headers["Location"] == "/after"
    principal = await principal_of(svc, done)
    assert principal.mfa and "mfa" in principal.amr
    assert set(await stored_tokens(svc, principal)) == {TRANSFER_RS, COLLECTION_ID}
    records = audit_events(svc, "sign_in")
    assert [r["outcome"] for r in records] == ["step_up", "success"]
    assert "re-authenticating" in records[0]["data"]["reason"]


async def test_configured_mfa_requirement_reauthenticates_with_session_required_mfa(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth, globus_auth: GlobusAuthStandIn
) -> None:
    globus_auth.redirect_uris.append(CALLBACK)
    globus_auth.login_as(ada())
    svc = await globus_broker(tmp_path, openbao, vault_approle, require_mfa=True)
    try:
        async with TestClient(TestServer(app_with_services(svc))) as raw:
            client = ContractClient(raw)
            first, _ = await sign_in(client)
            assert first.status == 303, first.text
            query = parse_qs(urlsplit(first.headers["Location"]).query)
            assert query["session_required_mfa"] == ["true"]
            assert "dependent_token" not in " ".join(globus_auth.grants)  # checked first
            done = await callback(client, await at_globus(first.headers["Location"]))
            assert done.status == 303 and done.headers["Location"] == "/", done.text
            assert (await principal_of(svc, done)).mfa
    finally:
        await svc.close()


async def test_a_user_of_another_upstream_gets_no_globus_token(
    scene: tuple[Services, ContractClient, GlobusAuthStandIn],
) -> None:
    svc, client, _ = scene
    other = Principal(idp="campus", issuer="https://idp.example.edu", subject="eve")
    await remember_principal(svc, other)
    minted = await svc.tokens.mint(
        subject=other.id, audience=svc.settings.server.public_url, client_id="launcher",
        scope=("launch:globus",),
    )  # fmt: skip
    refused = await client.post(
        "/v1/credentials", json={"backend": "globus", "role": TRANSFER_RS},
        headers={"Authorization": f"Bearer {minted.token}"},
    )  # fmt: skip
    assert refused.status == 403 and refused.json()["error"] == "access_denied"
    assert audit_events(svc, "credential.issued") == []
    [failed] = audit_events(svc, "credential.failed")
    assert failed["actor"] == other.id and failed["data"]["error"] == "access_denied"


async def test_a_rotated_globus_key_is_fetched_again(
    scene: tuple[Services, ContractClient, GlobusAuthStandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decoder keeps Globus's key; after a rotation the first unverifiable ID token makes
    it fetch the key again (at most once per JWK_REFETCH_INTERVAL, here shortened)."""
    svc, client, globus = scene
    first, _ = await sign_in(client)
    assert first.status == 303, first.text
    globus.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    # Within the interval the cached key stands: the new signature is refused.
    refused, _ = await sign_in(client)
    assert refused.status == 400, refused.text
    assert "InvalidSignatureError" in audit_events(svc, "sign_in")[-1]["data"]["reason"]
    monkeypatch.setattr(globus_module, "JWK_REFETCH_INTERVAL", 0.0)
    again, _ = await sign_in(client)
    assert again.status == 303 and SESSION_COOKIE in again.cookies, again.text
