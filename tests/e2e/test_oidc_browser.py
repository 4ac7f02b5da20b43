"""Sign-in through an OpenID provider in a real browser, end to end:

launcher /start -> broker /oauth/authorize (code + PKCE) -> the broker's only upstream, node
`oidc-provider` (its devInteractions login and consent forms) -> the broker's callback ->
consent -> the launcher's callback -> tokens whose `groups` and `affiliation` came from the
OP's claims (`groups`, `eduperson_scoped_affiliation`), checked against the broker's JWKS.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from playwright.async_api import Page, expect

from adapters.vault import AppRoleAuth
from broker.devvault import DevVault
from broker.oauth.clients import hash_secret
from tests.e2e.conftest import Console
from tests.e2e.support import (
    Launcher,
    RunningBroker,
    approve_consent,
    as_list,
    free_port,
    launcher_client,
    needs_chromium,
    run_broker,
    serve,
    verify_broker_jwt,
)
from tests.peers.broker import audit_events, make_settings
from tests.peers.oidc_op import OidcOp, start_oidc_op

pytestmark = needs_chromium

UPSTREAM = "campus-op"
OP_CLIENT_SECRET = "broker-at-the-op-" + "0123456789abcdef"
COURSE = "campus.example.edu:course:ds100"
AFFILIATION = "student@campus.example.edu"
ACCOUNT = {
    "login": "student",
    "password": "student-pass",
    "sub": "op-student-123",
    "name": "Sam Student",
    "email": "sam.student@campus.example.edu",
    "groups": [COURSE],
    "eduperson_scoped_affiliation": [AFFILIATION, "member@campus.example.edu"],
}


@dataclass
class Env:
    broker: RunningBroker
    launcher: Launcher
    op: OidcOp


@pytest_asyncio.fixture(scope="module")
async def env(
    tmp_path_factory: pytest.TempPathFactory, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[Env]:
    workdir = tmp_path_factory.mktemp("e2e-oidc")
    broker_url = f"http://127.0.0.1:{free_port()}"
    launcher_port = free_port()
    launcher = Launcher(url=f"http://127.0.0.1:{launcher_port}", broker_url=broker_url)
    op = await start_oidc_op(
        clients=[
            {
                "client_id": "broker",
                "client_secret": OP_CLIENT_SECRET,
                "redirect_uris": [f"{broker_url}/login/{UPSTREAM}/callback"],
                "id_token_alg": "ES256",
            }
        ],
        accounts=[ACCOUNT],
        workdir=workdir,
    )
    try:
        secret_file = workdir / "op-client-secret"
        secret_file.write_text(OP_CLIENT_SECRET)
        settings = make_settings(
            workdir,
            openbao.address,
            vault_approle,
            mode="production",
            server={"public_url": broker_url, "cookie_secure": False},
            upstreams=[
                {
                    "type": "oidc",
                    "id": UPSTREAM,
                    "display_name": "Campus OpenID provider",
                    "issuer": op.issuer,
                    "client_id": "broker",
                    "client_secret": {"file": str(secret_file)},
                    "scopes": ["openid", "profile", "email", "groups"],
                }
            ],
            clients=[launcher_client(hash_secret, launcher.url)],
        )
        async with (
            run_broker(settings, dev_mode=False) as broker,
            serve(launcher.app(), launcher_port),
        ):
            yield Env(broker, launcher, op)
    finally:
        op.stop()


async def test_sign_in_through_node_oidc_provider(env: Env, page: Page, console: Console) -> None:
    await page.goto(f"{env.launcher.url}/start")
    # One upstream: the broker goes straight to the OP, whose devInteractions form shows.
    await page.wait_for_url(f"{env.op.issuer}/interaction/**")
    await page.locator("input[name=login]").fill("student")
    await page.locator("input[name=password]").fill("student-pass")
    await page.locator("button[type=submit]").click()
    # The OP's own consent step (devInteractions), then back to the broker.
    await page.wait_for_url(f"{env.op.issuer}/interaction/**")
    await page.locator("button[type=submit]").click()
    await expect(page.get_by_role("heading", name="Allow access?")).to_be_visible()
    assert page.url.startswith(f"{env.broker.url}/oauth/authorize/resume?")
    await approve_consent(page)
    await expect(page.get_by_role("heading", name="Signed in")).to_be_visible()
    state = (await page.locator("#state").text_content()) or ""
    tokens = env.launcher.tokens[state]
    id_claims = await verify_broker_jwt(
        env.broker.url, tokens["id_token"], audience="launcher", nonce=env.launcher.nonces[state]
    )
    assert as_list(id_claims.get("groups")) == [COURSE], id_claims
    assert AFFILIATION in as_list(id_claims.get("affiliation")), id_claims
    assert id_claims["name"] == "Sam Student"
    # The broker's subject is its own, not the OP's.
    assert id_claims["sub"] != ACCOUNT["sub"]
    access = await verify_broker_jwt(env.broker.url, tokens["access_token"], audience="launcher")
    assert as_list(access.get("groups")) == [COURSE], access
    assert AFFILIATION in as_list(access.get("affiliation")), access
    signed_in = [
        e for e in audit_events(env.broker.services, "sign_in") if e["outcome"] == "success"
    ]
    assert signed_in and signed_in[-1]["data"]["idp"] == UPSTREAM
    assert [e for e in console.errors if env.broker.url in e] == []
