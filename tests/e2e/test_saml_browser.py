"""Campus sign-in through SAML in a real browser, end to end:

launcher /start -> broker /oauth/authorize (code + PKCE) -> chooser (the campus IdP found by
searching a 31-IdP federation) -> SimpleSAMLphp's login form -> its auto-POST to the broker's
ACS -> consent -> the launcher's callback -> tokens whose `groups` and `affiliation` come from
the SAML attributes (isMemberOf, eduPersonScopedAffiliation), checked against the broker's JWKS.

The same again with an IdP that encrypts its assertions to the broker's SP certificate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Page, expect

from adapters.vault import AppRoleAuth
from broker.devvault import DevVault
from broker.oauth.clients import hash_secret
from tests.e2e.conftest import Console
from tests.e2e.support import (
    CAMPUS_NAME,
    Launcher,
    RunningBroker,
    approve_consent,
    as_list,
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
from tests.peers.simplesamlphp import SimpleSamlIdp, start_simplesamlphp

pytestmark = needs_chromium

UPSTREAM = "campus"
ENCRYPTING_NAME = "Campus University Medical School"
COURSE = "campus.example.edu:course:ds100"
AFFILIATION = "student@campus.example.edu"


@dataclass
class Env:
    broker: RunningBroker
    launcher: Launcher
    idp: SimpleSamlIdp
    encrypting_idp: SimpleSamlIdp


@pytest_asyncio.fixture(scope="module")
async def env(
    tmp_path_factory: pytest.TempPathFactory, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[Env]:
    workdir = tmp_path_factory.mktemp("e2e-saml")
    broker_url = f"http://127.0.0.1:{free_port()}"
    launcher_port = free_port()
    launcher = Launcher(url=f"http://127.0.0.1:{launcher_port}", broker_url=broker_url)
    keys = sp_keys(workdir / "sp")
    sp_entity_id = f"{broker_url}/login/{UPSTREAM}/metadata"
    sp_acs_url = f"{broker_url}/login/{UPSTREAM}/callback"
    # Started here, on the main thread, which outlives the module (see start_simplesamlphp).
    with (
        start_simplesamlphp(
            workdir / "idp",
            sp_entity_id=sp_entity_id,
            sp_acs_url=sp_acs_url,
            sp_cert_pem=keys.cert_pem,
        ) as idp,
        start_simplesamlphp(
            workdir / "idp-enc",
            sp_entity_id=sp_entity_id,
            sp_acs_url=sp_acs_url,
            sp_cert_pem=keys.cert_pem,
            encrypt_assertion=True,
            public_host="localhost",  # another site: its POST to the ACS is cross-site
        ) as encrypting,
    ):
        metadata = workdir / "federation.xml"
        # The made-up IdPs' endpoints are never visited here: nothing listens on port 9.
        real = [(idp.metadata_xml(), CAMPUS_NAME), (encrypting.metadata_xml(), ENCRYPTING_NAME)]
        metadata.write_bytes(federation_metadata("http://127.0.0.1:9", real, fake_campus=False))
        settings = make_settings(
            workdir,
            openbao.address,
            vault_approle,
            mode="production",
            server={"public_url": broker_url, "cookie_secure": False},
            upstreams=[saml_upstream(UPSTREAM, "Campus federation", keys, metadata)],
            clients=[launcher_client(hash_secret, launcher.url)],
        )
        async with (
            run_broker(settings, dev_mode=False) as broker,
            serve(launcher.app(), launcher_port),
        ):
            yield Env(broker, launcher, idp, encrypting)


async def sign_in_through_simplesamlphp(
    env: Env, page: Page, idp: SimpleSamlIdp, idp_name: str, username: str, password: str
) -> dict[str, Any]:
    """The whole browser journey; returns the launcher's token response."""
    await page.goto(f"{env.launcher.url}/start")
    # The chooser: find the campus among the federation's IdPs and pick it.
    box = page.get_by_role("searchbox", name="Find your institution")
    await box.fill(idp_name)
    result = page.locator(f"#r-{UPSTREAM}").get_by_role("link", name=idp_name, exact=True)
    await expect(result).to_have_count(1)
    await result.click()
    # SimpleSAMLphp's own login form, on its own origin.
    await page.wait_for_url(f"{idp.base_url}**")
    await page.locator("input[name=username]").fill(username)
    await page.locator("input[name=password]").fill(password)
    await page.locator("input[name=password]").press("Enter")
    # Its auto-POST form goes to the broker's ACS; then the broker asks for consent.
    await expect(page.get_by_role("heading", name="Allow access?")).to_be_visible()
    await expect(page.locator("main")).to_contain_text("E2E test launcher")
    await approve_consent(page)
    await expect(page.get_by_role("heading", name="Signed in")).to_be_visible()
    assert page.url.startswith(f"{env.launcher.url}/callback?")
    state = (await page.locator("#state").text_content()) or ""
    return env.launcher.tokens[state] | {"_state": state}


async def check_tokens(env: Env, tokens: dict[str, Any], idp: SimpleSamlIdp) -> None:
    state = tokens["_state"]
    id_claims = await verify_broker_jwt(
        env.broker.url, tokens["id_token"], audience="launcher", nonce=env.launcher.nonces[state]
    )
    assert COURSE in as_list(id_claims.get("groups")), id_claims
    assert AFFILIATION in as_list(id_claims.get("affiliation")), id_claims
    assert id_claims["name"] == "Sam Student"
    assert tokens["scope"].split() == ["openid", "profile", "email", "groups"]
    access = await verify_broker_jwt(env.broker.url, tokens["access_token"], audience="launcher")
    assert access["client_id"] == "launcher" and access["sub"] == id_claims["sub"]
    assert COURSE in as_list(access.get("groups")), access
    assert AFFILIATION in as_list(access.get("affiliation")), access
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{env.broker.url}/oauth/userinfo",
            headers={"Authorization": f"Bearer {tokens['access_token']}"},
        ) as resp,
    ):
        assert resp.status == 200
        userinfo = await resp.json()
    assert COURSE in as_list(userinfo.get("groups")) and userinfo["sub"] == id_claims["sub"]
    signed_in = [
        e for e in audit_events(env.broker.services, "sign_in") if e["outcome"] == "success"
    ]
    assert signed_in and signed_in[-1]["data"]["idp"] == UPSTREAM


async def test_campus_sign_in_through_simplesamlphp(env: Env, page: Page, console: Console) -> None:
    tokens = await sign_in_through_simplesamlphp(
        env, page, env.idp, CAMPUS_NAME, "student", "student-pass"
    )
    await check_tokens(env, tokens, env.idp)
    assert [e for e in console.errors if env.broker.url in e] == []


async def test_campus_sign_in_with_an_encrypted_assertion(env: Env, page: Page) -> None:
    """This IdP is on another site (localhost) than the broker (127.0.0.1), so its POST to the
    ACS arrives without the SameSite=Lax flow cookie and the broker's hand-off brings it."""
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url))
    tokens = await sign_in_through_simplesamlphp(
        env, page, env.encrypting_idp, ENCRYPTING_NAME, "student", "student-pass"
    )
    await check_tokens(env, tokens, env.encrypting_idp)
    acs = f"{env.broker.url}/login/{UPSTREAM}/callback"
    assert any(url.startswith(f"{acs}?handoff=") for url in seen), seen
