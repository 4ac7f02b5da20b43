"""Maintained Python OAuth clients against the broker on a real loopback port.

- authlib (`AsyncOAuth2Client`, httpx2): authorization code + PKCE S256 with a confidential
  client, the ID token checked with joserfc against the served JWKS, refresh with rotation
  and reuse detection, the RFC 8628 device flow for the built-in public `broker-cli` client,
  and `private_key_jwt` (RFC 7523) with authlib's `PrivateKeyJWT` for client_credentials,
  the very assertion authlib sent being refused when replayed.
- requests-oauthlib (`OAuth2Session(pkce="S256")`, oauthlib's `DeviceClient`): a public
  client that is not first-party (the user approves it on the consent page), its refresh,
  and the device flow.

A `Browser` (tests/interop/conftest.py) plays the user: the dev sign-in form, the consent
page, the `/device` page. requests-oauthlib is synchronous and runs in a thread, so the
broker, served on this event loop, can answer it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx2
import jwt as pyjwt
import pytest
import pytest_asyncio
from authlib.integrations.base_client import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey, KeySet
from oauthlib.oauth2 import DeviceClient
from oauthlib.oauth2.rfc6749.errors import OAuth2Error
from requests_oauthlib import OAuth2Session

from adapters.vault import AppRoleAuth
from broker.devvault import DevVault
from broker.oauth.clients import hash_secret
from tests.interop.conftest import Browser, LiveBroker, dev_sub, query_of, serve_broker

HUB_CALLBACK = "https://hub.example.org/hub/oauth_callback"
HUB_SECRET = "hub-secret-0123456789abcdef"
NOTEBOOKS_CALLBACK = "http://127.0.0.1:8765/callback"
API = "https://api.example.org"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
ROBOT_KEY = ec.generate_private_key(ec.SECP256R1())
ROBOT_KID = "robot-key-1"


def robot_jwks() -> dict[str, Any]:
    public = json.loads(pyjwt.algorithms.ECAlgorithm.to_jwk(ROBOT_KEY.public_key()))
    return {"keys": [public | {"kid": ROBOT_KID, "alg": "ES256", "use": "sig"}]}


def robot_pem() -> str:
    return ROBOT_KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest_asyncio.fixture(scope="module")
async def live(
    tmp_path_factory: pytest.TempPathFactory, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[LiveBroker]:
    clients: list[dict[str, Any]] = [
        {"client_id": "hub", "name": "Example BinderHub", "secret_hash": hash_secret(HUB_SECRET),
         "redirect_uris": [HUB_CALLBACK], "first_party": True,
         "grant_types": ["authorization_code", "refresh_token"],
         "scopes": ["openid", "profile", "email", "groups"]},
        {"client_id": "notebooks", "name": "Third-party notebooks", "auth_method": "none",
         "redirect_uris": [NOTEBOOKS_CALLBACK], "first_party": False,
         "grant_types": ["authorization_code", "refresh_token"],
         "scopes": ["openid", "profile"]},
        {"client_id": "robot", "name": "Build robot", "auth_method": "private_key_jwt",
         "jwks": robot_jwks(), "grant_types": ["client_credentials"], "scopes": ["repo:read"],
         "audiences": [API]},
    ]  # fmt: skip
    tmp_path: Path = tmp_path_factory.mktemp("broker-clients")
    async with serve_broker(
        tmp_path, openbao, vault_approle, clients=clients, oauth={"device_poll_interval": 1}
    ) as broker:
        yield broker


def issued(live: LiveBroker, client: str) -> list[dict[str, Any]]:
    return [e for e in live.events("token.issued") if e["data"]["client"] == client]


async def check_id_token(live: LiveBroker, id_token: str, client_id: str, nonce: str) -> Any:
    """Verify an ID token with joserfc and the JWKS the broker serves; returns its claims."""
    async with httpx2.AsyncClient() as http:
        jwks = (await http.get(live.metadata["jwks_uri"])).json()
    token = jose_jwt.decode(id_token, KeySet.import_key_set(jwks), algorithms=["ES256"])
    jose_jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": live.url},
        aud={"essential": True, "value": client_id},
        sub={"essential": True},
        nonce={"essential": True, "value": nonce},
        exp={"essential": True},
    ).validate(token.claims)
    return token.claims


# --- authlib ------------------------------------------------------------------------------


async def test_authlib_code_flow_with_pkce_then_refresh_rotation(live: LiveBroker) -> None:
    meta = live.metadata
    nonce = secrets.token_urlsafe(16)
    verifier = secrets.token_urlsafe(48)
    async with AsyncOAuth2Client(
        client_id="hub", client_secret=HUB_SECRET, scope="openid profile groups",
        redirect_uri=HUB_CALLBACK, code_challenge_method="S256",
        token_endpoint_auth_method="client_secret_basic",
    ) as client:  # fmt: skip
        url, state = client.create_authorization_url(
            meta["authorization_endpoint"], code_verifier=verifier, nonce=nonce
        )
        sent = query_of(url)
        assert sent["code_challenge_method"] == "S256" and "code_verifier" not in sent
        async with Browser(live.url, "ada", ("students",)) as browser:
            location = await browser.follow(url, HUB_CALLBACK)
            assert browser.consent_pages == 0  # first-party: no consent page
        assert query_of(location)["iss"] == live.url  # RFC 9207
        token = await client.fetch_token(
            meta["token_endpoint"], authorization_response=location, state=state,
            code_verifier=verifier,
        )  # fmt: skip
        assert token["token_type"] == "Bearer" and token["scope"] == "openid profile groups"
        claims = live.services.tokens.verify(token["access_token"], audience="hub")
        assert claims["sub"] == dev_sub("ada") and claims["groups"] == ["students"]
        id_claims = await check_id_token(live, token["id_token"], "hub", nonce)
        assert id_claims["preferred_username"] == "ada"

        refreshed = await client.refresh_token(
            meta["token_endpoint"], refresh_token=token["refresh_token"]
        )
        assert refreshed["refresh_token"] != token["refresh_token"]  # rotated
        assert live.services.tokens.verify(refreshed["access_token"])["sub"] == dev_sub("ada")

        # Reusing the first refresh token is refused, and it kills the rotated one too.
        with pytest.raises(OAuthError) as reuse:
            await client.refresh_token(meta["token_endpoint"], refresh_token=token["refresh_token"])
        assert reuse.value.error == "invalid_grant"
        with pytest.raises(OAuthError) as successor:
            await client.refresh_token(
                meta["token_endpoint"], refresh_token=refreshed["refresh_token"]
            )
        assert successor.value.error == "invalid_grant"
    assert [e["data"]["grant_type"] for e in issued(live, "hub")] == [
        "authorization_code",
        "refresh_token",
    ]


async def test_authlib_device_flow_for_the_cli_client(live: LiveBroker) -> None:
    meta = live.metadata
    async with AsyncOAuth2Client(
        client_id="broker-cli", token_endpoint_auth_method="none",
        scope="openid profile offline_access",
    ) as client:  # fmt: skip
        response = await client.request(
            "POST", meta["device_authorization_endpoint"], withhold_token=True,
            data={"client_id": "broker-cli", "scope": "openid profile offline_access"},
        )  # fmt: skip
        assert response.status_code == 200, response.text
        grant = response.json()
        assert grant["verification_uri"] == f"{live.url}/device"
        with pytest.raises(OAuthError) as pending:
            await client.fetch_token(
                meta["token_endpoint"], grant_type=DEVICE_GRANT, device_code=grant["device_code"]
            )
        assert pending.value.error == "authorization_pending"
        before = len(issued(live, "broker-cli"))

        async with Browser(live.url, "bea") as browser:
            page = await browser.approve_device(grant["user_code"])
        assert "Device approved" in page

        token = await poll_authlib(client, meta["token_endpoint"], grant)
        assert token["scope"] == "openid profile offline_access"
        claims = live.services.tokens.verify(
            token["access_token"], audience=live.services.tokens.issuer
        )
        assert claims["sub"] == dev_sub("bea") and claims["client_id"] == "broker-cli"
        assert "refresh_token" in token and "id_token" in token
        # The device code is single-use.
        with pytest.raises(OAuthError) as reuse:
            await client.fetch_token(
                meta["token_endpoint"], grant_type=DEVICE_GRANT, device_code=grant["device_code"]
            )
        assert reuse.value.error == "invalid_grant"
        refreshed = await client.refresh_token(
            meta["token_endpoint"], refresh_token=token["refresh_token"]
        )
        assert live.services.tokens.verify(refreshed["access_token"])["sub"] == dev_sub("bea")
    grants = [e["data"]["grant_type"] for e in issued(live, "broker-cli")[before:]]
    assert grants == [DEVICE_GRANT, "refresh_token"]


async def poll_authlib(
    client: AsyncOAuth2Client, token_endpoint: str, grant: dict[str, Any]
) -> dict[str, Any]:
    """Poll as RFC 8628 §3.5 says: wait `interval`, add 5 s on slow_down."""
    interval = int(grant["interval"])
    for _ in range(10):
        await asyncio.sleep(interval)
        try:
            token: dict[str, Any] = await client.fetch_token(
                token_endpoint, grant_type=DEVICE_GRANT, device_code=grant["device_code"]
            )
            return token
        except OAuthError as error:
            assert error.error in ("authorization_pending", "slow_down"), error
            interval += 5 if error.error == "slow_down" else 0
    raise AssertionError("the device flow did not finish")


async def test_authlib_private_key_jwt_and_a_replayed_assertion(live: LiveBroker) -> None:
    meta = live.metadata
    sent: list[bytes] = []

    async def record(request: httpx2.Request) -> None:
        sent.append(request.content)

    # authlib reads a PEM string as an RSA key; an EC key goes in as a joserfc key object.
    async with AsyncOAuth2Client(
        client_id="robot", client_secret=ECKey.import_key(robot_pem()),
        token_endpoint_auth_method="private_key_jwt",
        event_hooks={"request": [record]},
    ) as client:  # fmt: skip
        # A short-lived assertion (authlib's default, one hour, is tested below).
        client.register_client_auth_method(
            PrivateKeyJWT(
                meta["token_endpoint"], alg="ES256", headers={"kid": ROBOT_KID},
                claims={"exp": int(time.time()) + 120},
            )
        )  # fmt: skip
        token = await client.fetch_token(meta["token_endpoint"], grant_type="client_credentials")
    claims = live.services.tokens.verify(token["access_token"], audience=API)
    assert claims["sub"] == "robot" and claims["client_id"] == "robot"
    assert claims["scope"] == "repo:read" and "refresh_token" not in token

    # The assertion authlib sent: ES256, our kid, aud = the token endpoint, one jti.
    form = dict(parse_qsl(sent[0].decode()))
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assert pyjwt.get_unverified_header(form["client_assertion"])["kid"] == ROBOT_KID
    assertion = pyjwt.decode(form["client_assertion"], options={"verify_signature": False})
    assert assertion["aud"] == meta["token_endpoint"] and assertion["jti"]

    # Sending that same request again, byte for byte, is refused: the jti was seen.
    before = issued(live, "robot")
    async with httpx2.AsyncClient() as http:
        replay = await http.post(
            meta["token_endpoint"], content=sent[0],
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )  # fmt: skip
    assert replay.status_code == 401
    body = replay.json()
    assert body["error"] == "invalid_client" and "access_token" not in body
    assert "already used" in body["error_description"]
    assert issued(live, "robot") == before


# --- requests-oauthlib --------------------------------------------------------------------


async def test_requests_oauthlib_public_client_with_consent_pkce_and_refresh(
    live: LiveBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # oauthlib insists on https; the broker is on plain loopback here.
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
    meta = live.metadata
    session = OAuth2Session(
        "notebooks", redirect_uri=NOTEBOOKS_CALLBACK, scope=["openid", "profile"], pkce="S256"
    )
    try:
        url, state = session.authorization_url(meta["authorization_endpoint"])
        sent = query_of(url)
        assert sent["code_challenge_method"] == "S256" and sent["state"] == state
        async with Browser(live.url, "cy") as browser:
            location = await browser.follow(url, NOTEBOOKS_CALLBACK)
            assert browser.consent_pages == 1  # a third-party client needs the user's approval
            token = await asyncio.to_thread(
                session.fetch_token, meta["token_endpoint"], authorization_response=location,
                include_client_id=True,
            )  # fmt: skip
            # Approved once, remembered: a second authorization skips the consent page.
            again, _ = OAuth2Session(
                "notebooks", redirect_uri=NOTEBOOKS_CALLBACK, scope=["openid"], pkce="S256"
            ).authorization_url(meta["authorization_endpoint"])
            assert "code=" in await browser.follow(again, NOTEBOOKS_CALLBACK)
            assert browser.consent_pages == 1
        claims = live.services.tokens.verify(token["access_token"], audience="notebooks")
        assert claims["sub"] == dev_sub("cy") and claims["scope"] == "openid profile"
        refreshed = await asyncio.to_thread(
            session.refresh_token, meta["token_endpoint"], client_id="notebooks"
        )
        assert refreshed["refresh_token"] != token["refresh_token"]
        assert live.services.tokens.verify(refreshed["access_token"])["sub"] == dev_sub("cy")
    finally:
        session.close()
    assert [e["data"]["grant_type"] for e in issued(live, "notebooks")] == [
        "authorization_code",
        "refresh_token",
    ]
    assert len(live.events("consent.granted")) == 1


async def test_requests_oauthlib_device_client(
    live: LiveBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
    meta = live.metadata
    session = OAuth2Session(client=DeviceClient("broker-cli"), scope=["openid", "groups"])
    try:
        response = await asyncio.to_thread(
            session.post, meta["device_authorization_endpoint"],
            data={"client_id": "broker-cli", "scope": "openid groups"},
        )  # fmt: skip
        assert response.status_code == 200, response.text
        grant = response.json()
        before = len(issued(live, "broker-cli"))
        async with Browser(live.url, "dee", ("students",)) as browser:
            assert "Device approved" in await browser.approve_device(grant["user_code"])
        interval = int(grant["interval"])
        token = None
        for _ in range(10):
            await asyncio.sleep(interval)
            try:
                token = await asyncio.to_thread(
                    session.fetch_token, meta["token_endpoint"],
                    device_code=grant["device_code"], include_client_id=True,
                )  # fmt: skip
                break
            except OAuth2Error as error:
                assert error.error in ("authorization_pending", "slow_down"), error
                interval += 5 if error.error == "slow_down" else 0
        assert token is not None
    finally:
        session.close()
    claims = live.services.tokens.verify(
        token["access_token"], audience=live.services.tokens.issuer
    )
    assert claims["sub"] == dev_sub("dee") and claims["groups"] == ["students"]
    assert [e["data"]["grant_type"] for e in issued(live, "broker-cli")[before:]] == [DEVICE_GRANT]


async def test_authlib_private_key_jwt_with_its_default_lifetime(live: LiveBroker) -> None:
    meta = live.metadata
    async with AsyncOAuth2Client(
        client_id="robot", client_secret=ECKey.import_key(robot_pem()),
        token_endpoint_auth_method="private_key_jwt",
    ) as client:  # fmt: skip
        client.register_client_auth_method(
            PrivateKeyJWT(meta["token_endpoint"], alg="ES256", headers={"kid": ROBOT_KID})
        )
        token = await client.fetch_token(meta["token_endpoint"], grant_type="client_credentials")
    assert live.services.tokens.verify(token["access_token"], audience=API)["sub"] == "robot"
