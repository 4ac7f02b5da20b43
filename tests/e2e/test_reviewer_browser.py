"""The journal reviewer flow in a real browser (Debian Chromium through Playwright):

1. the author creates a grant pinned to one commit for a named reviewer through the API;
2. the reviewer opens the link, signs in through the SimpleSAMLphp IdP (SAML, real login
   form), comes back to the review page, presses the button and receives a token once;
3. with only that token, real `git clone` through the broker's gateway gets exactly the
   pinned commit from a `git http-backend` that requires the upstream secret (held in the
   real OpenBao), which never reaches the reviewer;
4. a second grant is redeemed pseudonymously ("Continue without signing in") in a fresh
   browser profile, and cloned the same way;
5. the author's listing shows only pseudonyms.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import BrowserContext, Page, expect

from adapters.base import Principal
from adapters.downstream.git_host import org_secret_path
from adapters.vault import AppRoleAuth
from broker.devvault import DevVault
from broker.oauth.issuance import remember_principal
from tests.e2e.conftest import Console
from tests.e2e.support import (
    RunningBroker,
    free_port,
    needs_chromium,
    run_broker,
    saml_upstream,
    sp_keys,
    verify_broker_jwt,
)
from tests.peers.broker import audit_events, make_settings
from tests.peers.git_http import GitPeer, make_repo
from tests.peers.simplesamlphp import SimpleSamlIdp, start_simplesamlphp

pytestmark = needs_chromium

UPSTREAM = "campus"
UPSTREAM_NAME = "Campus University"
BACKEND = "journal"
OWNER = "ada"
AUTHOR = Principal(
    idp="dev-author", issuer="urn:test:authors", subject="ada", claims={"forge_user": OWNER}
)
REVIEWER_EMAIL = "Sam.Student@campus.example.edu"  # the IdP sends it in lower case


@dataclass
class Env:
    broker: RunningBroker
    idp: SimpleSamlIdp
    peer: GitPeer
    repo: str  # backend/owner/name
    commits: list[str]
    workdir: Path

    async def create_grant(self, **body: Any) -> dict[str, Any]:
        """POST /v1/grants as the author would, with a token carrying the scope `grants`."""
        svc = self.broker.services
        minted = await svc.tokens.mint(
            subject=AUTHOR.id, audience=self.broker.url, client_id="journal-tool",
            scope=("grants",),
        )  # fmt: skip
        document = {
            "repo": self.repo,
            "expires_at": (datetime.now(UTC) + timedelta(days=7)).isoformat(),
        } | body
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{self.broker.url}/v1/grants", json=document,
                headers={"Authorization": f"Bearer {minted.token}"},
            ) as resp,
        ):  # fmt: skip
            assert resp.status == 201, await resp.text()
            grant: dict[str, Any] = await resp.json()
        return grant

    async def list_grants(self) -> dict[str, Any]:
        minted = await self.broker.services.tokens.mint(
            subject=AUTHOR.id, audience=self.broker.url, client_id="journal-tool",
            scope=("grants",),
        )  # fmt: skip
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"{self.broker.url}/v1/grants", params={"repo": self.repo},
                headers={"Authorization": f"Bearer {minted.token}"},
            ) as resp,
        ):  # fmt: skip
            listed: dict[str, Any] = await resp.json()
        return listed


@pytest_asyncio.fixture(scope="module")
async def env(
    tmp_path_factory: pytest.TempPathFactory,
    openbao: DevVault,
    vault_approle: AppRoleAuth,
    git_peer: GitPeer,
) -> AsyncIterator[Env]:
    workdir = tmp_path_factory.mktemp("e2e-review")
    broker_url = f"http://127.0.0.1:{free_port()}"
    keys = sp_keys(workdir / "sp")
    name = f"paper-{os.urandom(4).hex()}"
    commits = make_repo(git_peer.root, OWNER, name, commits=3)
    with start_simplesamlphp(
        workdir / "idp",
        sp_entity_id=f"{broker_url}/login/{UPSTREAM}/metadata",
        sp_acs_url=f"{broker_url}/login/{UPSTREAM}/callback",
        sp_cert_pem=keys.cert_pem,
    ) as idp:
        metadata = workdir / "idp-metadata.xml"
        metadata.write_bytes(idp.metadata_xml())
        settings = make_settings(
            workdir, openbao.address, vault_approle, mode="production",
            server={"public_url": broker_url, "cookie_secure": False},
            upstreams=[saml_upstream(UPSTREAM, UPSTREAM_NAME, keys, metadata)],
            backends=[{
                "type": "git", "id": BACKEND, "url": git_peer.url, "account_claim": "forge_user",
            }],
            grants={"launcher_url": "https://binder.example/v2/git/{repo_url}/{ref}"},
        )  # fmt: skip
        async with run_broker(settings, dev_mode=False) as broker:
            svc = broker.services
            await remember_principal(svc, AUTHOR)
            await svc.vault.kv_write(
                org_secret_path(svc.settings.vault.prefix, BACKEND, OWNER),
                {"username": git_peer.username, "password": git_peer.password},
            )
            yield Env(broker, idp, git_peer, f"{BACKEND}/{OWNER}/{name}", commits, workdir)


async def git(env: Env, *args: str, cwd: Path | None = None) -> tuple[int, str]:
    """Real git in a clean HOME: no credential helper, nothing from the user's config."""
    home = env.workdir / "git-home"
    home.mkdir(exist_ok=True)
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false",
    }  # fmt: skip
    # Not subprocess.run: the broker serves git's requests on this very event loop.
    proc = await asyncio.create_subprocess_exec(
        "git", *args, cwd=cwd, env=environment,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def clone_with(env: Env, token: str, clone_url: str, target: Path) -> str:
    """Clone through the gateway with only the token, as the review page says; the HEAD."""
    code, out = await git(
        env, "-c", f"http.extraHeader=Authorization: Bearer {token}", "clone", "--quiet",
        clone_url, str(target),
    )  # fmt: skip
    assert code == 0, out
    config = (target / ".git" / "config").read_text()
    assert token not in config and env.peer.password not in config + out
    assert env.peer.url not in config  # the clone knows only the broker
    code, head = await git(env, "rev-parse", "HEAD", cwd=target)
    assert code == 0, head
    return head.strip()


async def token_on_page(page: Page) -> str:
    await expect(page.get_by_role("heading", name="Your review access")).to_be_visible()
    token = (await page.locator("#token").text_content()) or ""
    assert token.count(".") == 2
    assert await page.evaluate("window.__cspViolations") == []
    return token


async def test_a_named_reviewer_signs_in_with_saml_and_clones_the_pinned_commit(
    env: Env, page: Page, console: Console
) -> None:
    pinned = env.commits[1]  # not the branch tip: the reviewer must get exactly this one
    grant = await env.create_grant(
        commit=pinned, reviewer={"email": REVIEWER_EMAIL}, note="Reviewer 2 of manuscript 17"
    )
    await page.goto(grant["url"])
    await expect(page.get_by_role("heading", name="Review access")).to_be_visible()
    await expect(page.locator("main")).to_contain_text(pinned)
    await expect(page.locator("main")).to_contain_text("Reviewer 2 of manuscript 17")
    await page.get_by_role("link", name=UPSTREAM_NAME).click()
    # SimpleSAMLphp's own login form, on its own origin; then its auto-POST to the ACS.
    await page.wait_for_url(f"{env.idp.base_url}**")
    await page.locator("input[name=username]").fill("student")
    await page.locator("input[name=password]").fill("student-pass")
    await page.locator("input[name=password]").press("Enter")
    # Back on the review page, signed in.
    await expect(page.locator("main")).to_contain_text("You are signed in as")
    assert page.url == grant["url"]
    await page.get_by_role("button", name="Get access as Sam Student").click()
    token = await token_on_page(page)
    await expect(page.locator("main")).to_contain_text("Reviewer 1")
    clone_text = (await page.locator("#clone").text_content()) or ""
    assert grant["clone_url"] in clone_text and "http.extraHeader" in clone_text
    launch = await page.locator("#launch").get_attribute("href")
    assert launch is not None and launch.endswith(f"/{pinned}")
    claims = await verify_broker_jwt(env.broker.url, token, audience=env.broker.url)
    assert claims["grant"] == grant["id"] and claims["commit"] == pinned
    assert claims["repo"] == env.repo and claims["scope"] == "repo:read"
    head = await clone_with(env, token, grant["clone_url"], env.workdir / "named-clone")
    assert head == pinned
    svc = env.broker.services
    [redeemed] = [
        e for e in audit_events(svc, "grant.redeemed") if e["data"]["grant"] == grant["id"]
    ]
    assert redeemed["data"]["signed_in"] is True and redeemed["data"]["jti"] == claims["jti"]
    uses = [e for e in audit_events(svc, "repo.read") if e["data"].get("grant") == grant["id"]]
    assert uses, "the gateway audits each use of the grant's token"
    assert [e for e in console.errors if env.broker.url in e] == []


async def test_a_pseudonymous_reviewer_continues_without_signing_in(
    env: Env, context: BrowserContext
) -> None:
    grant = await env.create_grant(reviewer={"anonymous": True}, max_uses=1)
    page = await context.new_page()
    await page.goto(grant["url"])
    await expect(page.get_by_role("link", name=UPSTREAM_NAME)).to_be_visible()
    await page.get_by_role("button", name="Continue without signing in").click()
    token = await token_on_page(page)
    claims = await verify_broker_jwt(env.broker.url, token, audience=env.broker.url)
    assert claims["sub"].startswith("anon-") and "commit" not in claims
    head = await clone_with(env, token, grant["clone_url"], env.workdir / "anonymous-clone")
    assert head == env.commits[-1]
    # The link is used up: opening it again is refused, readably, with a correlation id.
    await page.goto(grant["url"])
    await expect(
        page.get_by_role("heading", name="This review link cannot be used")
    ).to_be_visible()
    await expect(page.locator("footer")).to_contain_text("request id")
    # The author sees pseudonyms only, for both grants.
    listed = await env.list_grants()
    redemptions = [r for g in listed["grants"] for r in g["redemptions"]]
    assert {r["pseudonym"] for r in redemptions} == {"Reviewer 1"}
    assert all("principal_id" not in r and "display" not in r for r in redemptions)
    assert "student" not in str(redemptions).lower()  # who redeemed stays hidden
