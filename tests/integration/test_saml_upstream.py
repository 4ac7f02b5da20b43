"""SAML 2.0 sign-in against pysaml2's IdP, a second SAML implementation next to
SimpleSAMLphp: a scripted (non-browser) SP-initiated login through the broker, then a whole
OAuth code + PKCE flow whose ID token carries the groups and affiliation the IdP released."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from lxml import etree

from adapters.base import Lifecycle
from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault
from broker.oauth.clients import hash_secret
from broker.services import Services
from broker.sessions import SESSION_COOKIE
from tests.integration.test_authorize import HUB, SECRET, authorize_params, basic, pkce
from tests.peers.broker import audit_events
from tests.peers.pysaml2_idp import (
    MD,
    REFEDS_MFA,
    SCOPE,
    Pysaml2Idp,
    auto_post_form,
    decode_redirect_request,
    start_saml_broker,
    xmlsec_binary,
)

CLIENTS: list[dict[str, Any]] = [
    {
        "client_id": "hub",
        "name": "Example BinderHub",
        "secret_hash": hash_secret(SECRET),
        "redirect_uris": [HUB],
        "first_party": True,
        "grant_types": ["authorization_code", "refresh_token"],
        "scopes": ["openid", "profile", "email", "groups"],
    }
]


class Setup:
    def __init__(self, svc: Services, client: TestClient[Any, Any], idp: Pysaml2Idp) -> None:
        self.svc, self.client, self.idp = svc, client, idp


async def _started(
    tmp_path: Path, openbao: DevVault, approle: AppRoleAuth, **idp_options: Any
) -> AsyncIterator[Setup]:
    idp = Pysaml2Idp(tmp_path / "idp", **idp_options)
    await idp.start()
    svc, _sp = await start_saml_broker(
        tmp_path, openbao.address, approle, [idp], idp=idp.entity_id, clients=CLIENTS
    )
    try:
        async with TestClient(TestServer(app_with_services(svc))) as client:
            yield Setup(svc, client, idp)
    finally:
        upstream = svc.upstreams["campus"]
        if isinstance(upstream, Lifecycle):
            await upstream.close()
        await svc.close()
        await idp.close()


@pytest_asyncio.fixture
async def signed(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[Setup]:
    async for setup in _started(tmp_path, openbao, vault_approle):
        yield setup


@pytest_asyncio.fixture
async def encrypted(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[Setup]:
    async for setup in _started(
        tmp_path, openbao, vault_approle, encrypt_assertion=True, sign_response=True
    ):
        yield setup


async def saml_login(setup: Setup, next_url: str = "/") -> aiohttp.ClientResponse:
    """GET /login → the IdP (a plain HTTP client, as a browser) → POST the ACS form."""
    client = setup.client
    async with client.get(
        "/login", params={"idp": "campus", "next": next_url}, allow_redirects=False
    ) as first:
        assert first.status == 302, await first.text()
        location = first.headers["Location"]
    assert location.startswith(setup.idp.sso_url)
    started = decode_redirect_request(location)
    assert "SigAlg" in parse_qs(urlsplit(location).query)  # the request is signed
    async with aiohttp.ClientSession() as browser, browser.get(location) as answer:
        html = await answer.text()
        assert answer.status == 200, html
    action, fields = auto_post_form(html)
    assert fields["RelayState"] == started.relay_state
    assert setup.idp.requests_seen[-1] == started.request_id
    acs = urlsplit(action)
    assert acs.path == "/login/campus/callback"
    response = await client.post(acs.path, data=fields, allow_redirects=False)
    await response.read()
    return response


async def oauth_id_token(setup: Setup) -> dict[str, Any]:
    """The code + PKCE flow of test_authorize, signing in through SAML."""
    client = setup.client
    verifier, challenge = pkce()
    params = authorize_params(code_challenge=challenge, scope="openid profile email groups")
    async with client.get("/oauth/authorize", params=params, allow_redirects=False) as first:
        assert first.status == 302
        location = first.headers["Location"]
    if location.startswith("/login"):
        next_url = parse_qs(urlsplit(location).query)["next"][0]
        signed_in = await saml_login(setup, next_url)
        assert signed_in.status == 303
        async with client.get(signed_in.headers["Location"], allow_redirects=False) as resumed:
            assert resumed.status == 302, await resumed.text()
            location = resumed.headers["Location"]
    answer = parse_qs(urlsplit(location).query)
    async with client.post(
        "/oauth/token",
        headers=basic("hub", SECRET),
        data={
            "grant_type": "authorization_code",
            "code": answer["code"][0],
            "redirect_uri": HUB,
            "code_verifier": verifier,
        },
    ) as token:
        body = await token.json()
        assert token.status == 200, body
    claims: dict[str, Any] = setup.svc.tokens.verify(body["id_token"], audience="hub", kind="id")
    return claims


async def test_scripted_login_then_id_token_carries_saml_attributes(signed: Setup) -> None:
    response = await saml_login(signed, next_url="/account")
    assert response.status == 303 and response.headers["Location"] == "/account"
    assert SESSION_COOKIE in response.cookies
    success = [e for e in audit_events(signed.svc, "sign_in") if e["outcome"] == "success"]
    assert len(success) == 1 and success[0]["data"]["idp"] == "campus"

    claims = await oauth_id_token(signed)
    assert claims["groups"] == [
        "urn:mace:campus.example.edu:entitlement:hpc",
        "campus.example.edu/students",
    ]
    assert claims["affiliation"] == [f"student@{SCOPE}", f"member@{SCOPE}"]
    assert claims["name"] == "Ada Lovelace"
    assert claims.get("email") == "ada@campus.example.edu"


async def test_encrypted_assertion_in_signed_response(encrypted: Setup) -> None:
    response = await saml_login(encrypted, next_url="/account")
    assert response.status == 303, await response.text()
    assert SESSION_COOKIE in response.cookies
    claims = await oauth_id_token(encrypted)
    assert claims["affiliation"] == [f"student@{SCOPE}", f"member@{SCOPE}"]
    assert "campus.example.edu/students" in claims["groups"]


async def test_sp_metadata_is_signed_and_verifiable(signed: Setup, tmp_path: Path) -> None:
    async with signed.client.get("/login/campus/metadata") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/samlmetadata+xml")
        body = await response.read()
    root = etree.fromstring(body)
    public = signed.svc.settings.server.public_url
    assert root.get("entityID") == f"{public}/login/campus/metadata"
    sp = root.find(f"{{{MD}}}SPSSODescriptor")
    assert sp is not None
    assert sp.get("AuthnRequestsSigned") == "true" and sp.get("WantAssertionsSigned") == "true"
    uses = sorted(kd.get("use", "") for kd in sp.iterfind(f"{{{MD}}}KeyDescriptor"))
    assert uses == ["encryption", "signing"]
    acs = [
        (a.get("Binding"), a.get("Location"))
        for a in sp.iterfind(f"{{{MD}}}AssertionConsumerService")
    ]
    assert acs == [
        ("urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST", f"{public}/login/campus/callback")
    ]
    document = tmp_path / "sp-metadata.xml"
    document.write_bytes(body)
    cert = tmp_path / "sp" / "sp.crt"

    def verify(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                xmlsec_binary(), "--verify", "--enabled-key-data", "x509",
                "--pubkey-cert-pem", str(cert),
                "--id-attr:ID", f"{MD}:EntityDescriptor", str(path),
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip

    assert verify(document).returncode == 0
    tampered = tmp_path / "tampered.xml"
    tampered.write_bytes(body.replace(b"/login/campus/callback", b"/login/campus/evil"))
    assert verify(tampered).returncode != 0


async def test_mfa_context_maps_to_acr(signed: Setup) -> None:
    response = await saml_login(signed)
    assert response.status == 303
    session = await signed.svc.sessions.load(response.cookies[SESSION_COOKIE].value)
    assert session is not None
    principal = session.principal
    assert principal.acr == REFEDS_MFA and principal.mfa
    assert principal.subject == f"ada.l@{SCOPE}" and principal.issuer == signed.idp.entity_id
    assert principal.claims["eduperson_assurance"] == ["https://refeds.org/assurance/IAP/medium"]


@pytest.mark.parametrize("hint", ["https://unknown.example.org/idp"])
async def test_unknown_idp_hint_is_refused(signed: Setup, hint: str) -> None:
    async with signed.client.get(
        "/login", params={"idp": "campus", "entity": hint}, allow_redirects=False
    ) as response:
        assert response.status in (400, 404)
        assert "Location" not in response.headers
