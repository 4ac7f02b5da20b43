"""OpenBao as an independent relying party of the broker.

The broker is served on a real loopback port; a private OpenBao (not the one holding the
broker's keys) discovers it through `/.well-known/openid-configuration` and:

- `jwt` auth (`role_type=jwt`): a broker access token for the role's audience logs in; one for
  another audience, an expired one, or one signed by a key the broker never published is
  refused and no Vault token is created.
- `oidc` auth: OpenBao runs its own authorization-code flow (PKCE S256, nonce, state) against
  the broker, a user signs in and consents in a browser-like session, and OpenBao exchanges
  the code, verifies the ID token and issues a Vault token whose entity alias is the
  broker's `sub`.
- `oidc` auth with `callback_mode=device`: OpenBao drives the broker's RFC 8628 device flow.

hvac is synchronous and the broker is served on this event loop, so every hvac call goes
through `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import hvac
import hvac.exceptions
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ec

from adapters.vault import AppRoleAuth
from broker.devvault import DevVault
from broker.oauth.clients import hash_secret
from tests.interop.conftest import Browser, LiveBroker, dev_sub, query_of, serve_broker

RP_AUDIENCE = "openbao-rp"
CALLBACK = "http://127.0.0.1:8250/oidc/callback"  # what `bao login -method=oidc` listens on
CI_SECRET = "ci-runner-secret-0123456789"
OIDC_SECRET = "openbao-oidc-secret-0123456789"
DEVICE_SECRET = "openbao-device-secret-0123456789"
RP_POLICY = "notebook-reader"

T = TypeVar("T")


async def bao(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a synchronous hvac call off the event loop the broker is served on."""
    return await asyncio.to_thread(call, *args, **kwargs)


@dataclass
class RP:
    broker: LiveBroker
    root: hvac.Client
    address: str
    accessors: dict[str, str]  # mount path -> accessor

    async def token_accessors(self) -> set[str]:
        listed = await bao(self.root.adapter.list, "/v1/auth/token/accessors")
        return set(listed["data"]["keys"])

    async def entity(self, entity_id: str) -> dict[str, Any]:
        read = await bao(self.root.secrets.identity.read_entity, entity_id=entity_id)
        data: dict[str, Any] = read["data"]
        return data


@pytest_asyncio.fixture(scope="module")
async def live(
    tmp_path_factory: pytest.TempPathFactory, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[LiveBroker]:
    """The broker (its keys in the session's OpenBao) with the clients OpenBao uses."""
    clients: list[dict[str, Any]] = [
        {"client_id": "ci-runner", "name": "CI runner", "secret_hash": hash_secret(CI_SECRET),
         "grant_types": ["client_credentials"], "scopes": ["vault:login"],
         "audiences": [RP_AUDIENCE, "https://elsewhere.example.org"]},
        {"client_id": "openbao", "name": "OpenBao (oidc auth)",
         "secret_hash": hash_secret(OIDC_SECRET), "redirect_uris": [CALLBACK],
         "grant_types": ["authorization_code", "refresh_token"],
         "scopes": ["openid", "profile", "email", "groups"], "first_party": False},
        {"client_id": "openbao-device", "name": "OpenBao (device)",
         "auth_method": "client_secret_post", "secret_hash": hash_secret(DEVICE_SECRET),
         "grant_types": ["urn:ietf:params:oauth:grant-type:device_code"],
         "scopes": ["openid", "profile", "groups"], "first_party": True},
    ]  # fmt: skip
    tmp_path: Path = tmp_path_factory.mktemp("broker-rp")
    async with serve_broker(
        tmp_path, openbao, vault_approle, clients=clients, oauth={"device_poll_interval": 1}
    ) as broker:
        yield broker


@pytest_asyncio.fixture(scope="module")
async def rp(live: LiveBroker, rp_root: hvac.Client, rp_openbao: DevVault) -> RP:
    """Configure the RP OpenBao's `jwt`, `oidc` and `oidc-device` mounts against the broker."""
    root = rp_root
    await bao(
        root.sys.create_or_update_policy, RP_POLICY, 'path "kv/*" { capabilities = ["read"] }'
    )
    for path, kind in (("jwt", "jwt"), ("oidc", "oidc"), ("oidc-device", "oidc")):
        await bao(root.sys.enable_auth_method, kind, path=path)
    # Leeways: 0 means "the default" (60 s skew, 150 s expiry) in OpenBao; -1 disables them,
    # so a token that expired a second ago is already refused.
    no_leeway = {"clock_skew_leeway": -1, "expiration_leeway": -1, "not_before_leeway": -1}
    # OpenBao's oidc roles accept only RS256 ID tokens unless told otherwise; the broker signs
    # with ES256 by default and advertises what it may use in its discovery document.
    algs = live.metadata["id_token_signing_alg_values_supported"]
    settings: dict[str, dict[str, Any]] = {
        "auth/jwt/config": {"oidc_discovery_url": live.url, "bound_issuer": live.url},
        "auth/jwt/role/ci": {
            "role_type": "jwt", "bound_audiences": [RP_AUDIENCE], "user_claim": "sub",
            "token_policies": ["default"], **no_leeway,
        },
        "auth/oidc/config": {
            "oidc_discovery_url": live.url, "oidc_client_id": "openbao",
            "oidc_client_secret": OIDC_SECRET, "default_role": "web",
            "jwt_supported_algs": algs,
        },
        "auth/oidc/role/web": {
            "role_type": "oidc", "allowed_redirect_uris": [CALLBACK], "user_claim": "sub",
            "oidc_scopes": ["profile", "groups"], "bound_audiences": ["openbao"],
            "claim_mappings": {"preferred_username": "username"},
            "token_policies": ["default", RP_POLICY],
        },
        "auth/oidc-device/config": {
            "oidc_discovery_url": live.url, "oidc_client_id": "openbao-device",
            "oidc_client_secret": DEVICE_SECRET, "default_role": "cli",
            "jwt_supported_algs": algs,
        },
        "auth/oidc-device/role/cli": {
            "role_type": "oidc", "callback_mode": "device", "user_claim": "sub",
            "allowed_redirect_uris": [CALLBACK],  # required by OpenBao, unused in device mode
            "oidc_scopes": ["profile"], "bound_audiences": ["openbao-device"],
            "claim_mappings": {"preferred_username": "username"},
            "token_policies": [RP_POLICY],
        },
    }  # fmt: skip
    for path, data in settings.items():
        await bao(root.write_data, path, data=data)
    mounts = (await bao(root.sys.list_auth_methods))["data"]
    accessors = {p.rstrip("/"): m["accessor"] for p, m in mounts.items()}
    return RP(live, root, rp_openbao.address, accessors)


async def client_credentials(live: LiveBroker, audience: str) -> dict[str, Any]:
    """A token for the CI runner from the broker's token endpoint, over HTTP."""
    basic = base64.b64encode(f"ci-runner:{CI_SECRET}".encode()).decode()
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            live.metadata["token_endpoint"],
            data={"grant_type": "client_credentials", "audience": audience},
            headers={"Authorization": f"Basic {basic}"},
        ) as response,
    ):
        body: dict[str, Any] = await response.json()
        assert response.status == 200, body
        return body


async def jwt_login(rp: RP, token: str) -> dict[str, Any]:
    answer = await bao(rp.root.auth.jwt.jwt_login, role="ci", jwt=token, use_token=False)
    auth: dict[str, Any] = answer["auth"]
    return auth


async def refused_login(rp: RP, token: str) -> str:
    """Log in with `token`, expecting a refusal; returns OpenBao's error text. Asserts that
    no Vault token was created."""
    before = await rp.token_accessors()
    with pytest.raises(hvac.exceptions.InvalidRequest) as refused:
        await jwt_login(rp, token)
    assert await rp.token_accessors() == before
    return str(refused.value)


# --- jwt auth -------------------------------------------------------------------------------


async def test_jwt_auth_accepts_a_broker_token_for_its_audience(rp: RP) -> None:
    body = await client_credentials(rp.broker, RP_AUDIENCE)
    claims = rp.broker.services.tokens.verify(body["access_token"], audience=RP_AUDIENCE)
    assert claims["aud"] == [RP_AUDIENCE] and claims["sub"] == "ci-runner"
    auth = await jwt_login(rp, body["access_token"])
    assert auth["policies"] == ["default"]
    assert auth["metadata"] == {"role": "ci"}
    entity = await rp.entity(auth["entity_id"])
    assert [(a["name"], a["mount_accessor"]) for a in entity["aliases"]] == [
        ("ci-runner", rp.accessors["jwt"])
    ]
    # The Vault token OpenBao issued is real and carries the role's policies.
    vault_client = hvac.Client(url=rp.address, token=auth["client_token"])
    try:
        me = (await bao(vault_client.auth.token.lookup_self))["data"]
    finally:
        vault_client.adapter.close()
    assert me["policies"] == ["default"] and me["entity_id"] == auth["entity_id"]
    assert me["path"] == "auth/jwt/login"


async def test_jwt_auth_refuses_a_token_for_another_audience(rp: RP) -> None:
    body = await client_credentials(rp.broker, "https://elsewhere.example.org")
    claims = rp.broker.services.tokens.verify(body["access_token"])
    assert claims["aud"] == ["https://elsewhere.example.org"]
    error = await refused_login(rp, body["access_token"])
    assert "audience" in error, error


async def test_jwt_auth_refuses_an_expired_token(rp: RP) -> None:
    svc = rp.broker.services
    minted = await svc.tokens.mint(
        subject="ci-runner", audience=[RP_AUDIENCE], client_id="ci-runner", ttl=1
    )
    assert minted.expires_at - minted.issued_at == 1
    await asyncio.sleep(2.5)  # past exp by at least a second; the role allows no leeway
    error = await refused_login(rp, minted.token)
    assert "expired" in error, error


async def test_jwt_auth_refuses_a_token_signed_by_an_unknown_key(rp: RP) -> None:
    # The same claims as a real broker token for the right audience, signed by our own key.
    real = await client_credentials(rp.broker, RP_AUDIENCE)
    claims = jwt.decode(real["access_token"], options={"verify_signature": False})
    now = int(time.time())
    claims.update(sub="intruder", iat=now, exp=now + 300, jti="forged-1")
    forged = jwt.encode(
        claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
        headers={"kid": "unknown", "typ": "at+jwt"},
    )  # fmt: skip
    error = await refused_login(rp, forged)
    assert "signature" in error, error
    lookup = await bao(
        rp.root.secrets.identity.lookup_entity,
        alias_name="intruder", alias_mount_accessor=rp.accessors["jwt"],
    )  # fmt: skip
    assert lookup.status_code == 204  # no such alias: OpenBao never saw this sub log in


# --- oidc auth: authorization code ----------------------------------------------------------


async def test_oidc_auth_completes_the_code_flow_with_pkce(rp: RP) -> None:
    live = rp.broker
    # What `bao login -method=oidc` does first: ask OpenBao for the provider's URL.
    request = {"role": "web", "redirect_uri": CALLBACK, "client_nonce": "cn-1"}
    started = await bao(rp.root.adapter.post, "/v1/auth/oidc/oidc/auth_url", json=request)
    auth_url = started["data"]["auth_url"]
    assert auth_url.startswith(live.metadata["authorization_endpoint"] + "?")
    sent = query_of(auth_url)
    assert sent["response_type"] == "code" and sent["client_id"] == "openbao"
    assert sent["redirect_uri"] == CALLBACK
    assert sent["code_challenge_method"] == "S256", sent
    assert len(sent["code_challenge"]) == 43  # base64url of a SHA-256 digest
    assert sent["state"] and sent["nonce"]
    assert set(sent["scope"].split()) == {"openid", "profile", "groups"}

    async with Browser(live.url, "grace", ("students",)) as browser:
        location = await browser.follow(auth_url, CALLBACK)
        assert browser.consent_pages == 1  # OpenBao is not first-party: the user approved it
    answer = query_of(location)
    assert answer["state"] == sent["state"] and answer["iss"] == live.url

    # What the CLI's local listener does with the redirect: hand code and state to OpenBao,
    # which redeems the code at the broker (with the PKCE verifier) and checks the ID token.
    result = await bao(rp.root.adapter.get, "/v1/auth/oidc/oidc/callback", params={
        "state": answer["state"], "code": answer["code"], "client_nonce": "cn-1"})  # fmt: skip
    auth = result["auth"]
    assert auth["policies"] == ["default", RP_POLICY]
    assert auth["metadata"] == {"role": "web", "username": "grace"}
    entity = await rp.entity(auth["entity_id"])
    assert [(a["name"], a["mount_accessor"]) for a in entity["aliases"]] == [
        (dev_sub("grace"), rp.accessors["oidc"])
    ]
    issued = [e for e in live.events("token.issued") if e["data"]["client"] == "openbao"]
    assert len(issued) == 1
    assert issued[0]["actor"] == dev_sub("grace")
    assert issued[0]["data"]["grant_type"] == "authorization_code"
    assert issued[0]["data"]["id_token_jti"]


async def test_oidc_auth_reports_a_denied_consent_and_issues_nothing(rp: RP) -> None:
    live = rp.broker
    started = await bao(rp.root.adapter.post, "/v1/auth/oidc/oidc/auth_url",
                        json={"role": "web", "redirect_uri": CALLBACK})  # fmt: skip
    auth_url = started["data"]["auth_url"]
    before = [e for e in live.events("token.issued") if e["data"]["client"] == "openbao"]
    async with Browser(live.url, "mallory") as browser:
        location = await browser.follow(auth_url, CALLBACK, approve=False)
    answer = query_of(location)
    assert answer["error"] == "access_denied" and "code" not in answer
    accessors = await rp.token_accessors()
    with pytest.raises(hvac.exceptions.InvalidRequest) as refused:
        await bao(rp.root.adapter.get, "/v1/auth/oidc/oidc/callback", params={
            "state": answer["state"], "error": answer["error"],
            "error_description": answer["error_description"]})  # fmt: skip
    assert "access_denied" in str(refused.value)
    assert await rp.token_accessors() == accessors
    after = [e for e in live.events("token.issued") if e["data"]["client"] == "openbao"]
    assert after == before


# --- oidc auth: device flow -----------------------------------------------------------------


async def test_oidc_auth_device_mode_uses_the_broker_device_flow(rp: RP) -> None:
    live = rp.broker
    started = await bao(rp.root.adapter.post, "/v1/auth/oidc-device/oidc/auth_url",
                        json={"role": "cli", "client_nonce": "cn-device"})  # fmt: skip
    data = started["data"]
    assert data["auth_url"].startswith(f"{live.url}/device?user_code=")
    user_code = query_of(data["auth_url"])["user_code"]
    interval = int(data["poll_interval"])
    poll = {"state": data["state"], "client_nonce": "cn-device"}

    with pytest.raises(hvac.exceptions.InvalidRequest) as pending:
        await bao(rp.root.adapter.post, "/v1/auth/oidc-device/oidc/poll", json=poll)
    assert "authorization_pending" in str(pending.value)

    async with Browser(live.url, "lin", ("students",)) as browser:
        page = await browser.approve_device(user_code)
    assert "Device approved" in page

    auth = None
    for _ in range(10):
        await asyncio.sleep(interval)
        try:
            result = await bao(rp.root.adapter.post, "/v1/auth/oidc-device/oidc/poll", json=poll)
        except hvac.exceptions.InvalidRequest as error:
            assert "authorization_pending" in str(error) or "slow_down" in str(error), error
            continue
        auth = result["auth"]
        break
    assert auth is not None
    assert auth["policies"] == ["default", RP_POLICY]
    assert auth["metadata"] == {"role": "cli", "username": "lin"}
    entity = await rp.entity(auth["entity_id"])
    assert [(a["name"], a["mount_accessor"]) for a in entity["aliases"]] == [
        (dev_sub("lin"), rp.accessors["oidc-device"])
    ]
    issued = [e for e in live.events("token.issued") if e["data"]["client"] == "openbao-device"]
    assert [e["data"]["grant_type"] for e in issued] == [
        "urn:ietf:params:oauth:grant-type:device_code"
    ]
