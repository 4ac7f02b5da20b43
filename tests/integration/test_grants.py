"""Reviewer grants end to end over HTTP, against a real OpenBao and SQLite: an owner creates a
grant (a non-owner is refused and audited), reviewers redeem it signed in (dev upstream) and
anonymously, `max_uses` is enforced, the author sees pseudonyms while an editor (site policy
on `Group::"journal-editors"`) sees who, revoking puts the tokens' jti on the revoked list, and
the editor's receipt verifies against the broker's published JWKS with PyJWT.

The repo is on the generic git backend (nothing is cloned here, so its URL is a dead port);
the owner is whoever's `forge_user` claim names the repo's owner (`account_claim`).
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select

from adapters.base import Principal
from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault
from broker.oauth.bearer import is_revoked
from broker.oauth.issuance import remember_principal
from broker.services import Services
from broker.storage import GrantRecord, RedemptionRecord
from tests.peers.broker import (
    Checked,
    ContractClient,
    audit_events,
    make_settings,
    sign_in,
    start_broker,
)

DEV_ISSUER = "urn:binder-broker:dev"
AUTHOR = Principal(
    idp="dev", issuer=DEV_ISSUER, subject="ada", email="ada@dev.invalid",
    claims={"forge_user": "ada"},
)  # fmt: skip
EDITOR = Principal(
    idp="dev", issuer=DEV_ISSUER, subject="eve", email="eve@journal.invalid",
    groups=("journal-editors",), claims={"forge_user": "eve"},
)  # fmt: skip
STRANGER = Principal(
    idp="dev", issuer=DEV_ISSUER, subject="mallory", claims={"forge_user": "mallory"}
)
REPO = "campus/ada/paper"
OTHER_REPO = "campus/ada/other"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
EDITOR_POLICY = """
@id("journal-editors-manage-reviews")
permit (principal in Group::"journal-editors",
        action in [Action::"grant_repo", Action::"see_reviewers"], resource);
"""
HTML = {"Accept": "text/html"}


@dataclass
class GrantsEnv:
    svc: Services
    client: ContractClient

    async def token(self, who: Principal, scope: tuple[str, ...] = ("grants",)) -> str:
        minted = await self.svc.tokens.mint(
            subject=who.id, audience=self.svc.settings.server.public_url,
            client_id="journal-tool", scope=scope,
        )  # fmt: skip
        return minted.token

    async def create(self, who: Principal, **body: Any) -> Checked:
        document = {
            "repo": REPO,
            "expires_at": (datetime.now(UTC) + timedelta(days=7)).isoformat(),
            "reviewer": {"anonymous": True},
        } | body
        return await self.client.post(
            "/v1/grants", json=document, headers=bearer(await self.token(who))
        )

    async def created(self, who: Principal = AUTHOR, **body: Any) -> dict[str, Any]:
        response = await self.create(who, **body)
        assert response.status == 201, response.text
        grant: dict[str, Any] = response.json()
        return grant

    async def record(self, grant_id: str) -> GrantRecord:
        async with self.svc.db.reads() as db:
            found = await db.get(GrantRecord, grant_id)
        assert found is not None
        return found

    async def redemptions(self, grant_id: str) -> list[RedemptionRecord]:
        async with self.svc.db.reads() as db:
            rows = await db.execute(
                select(RedemptionRecord).where(RedemptionRecord.grant_id == grant_id)
            )
            return list(rows.scalars())

    def forget_browser(self) -> None:
        self.client.raw.session.cookie_jar.clear()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def link_path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def forms(page: str) -> list[dict[str, str]]:
    """The hidden fields of every form on a page that posts to /review."""
    found = []
    for form in re.findall(r'<form method="post" action="/review">(.*?)</form>', page, re.S):
        fields = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', form)
        found.append({k: html.unescape(v) for k, v in fields})
    return found


async def open_link(client: ContractClient, url: str) -> Checked:
    return await client.get(link_path(url), headers=HTML)


async def redeem(client: ContractClient, url: str, mode: str = "signed-in") -> Checked:
    """Open the link, then press the button of `mode` (as a browser would)."""
    page = await open_link(client, url)
    assert page.status == 200, page.text
    [form] = [f for f in forms(page.text) if f["mode"] == mode]
    return await client.post("/review", data=form, headers=HTML)


def token_of(page: Checked) -> str:
    found = re.search(r'<pre id="token">([^<]+)</pre>', page.text)
    assert found is not None, page.text
    return found.group(1)


@contextlib.asynccontextmanager
async def grants_env(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth, database_url: str
) -> AsyncIterator[GrantsEnv]:
    """A started broker on `database_url` with the packaged policies plus the editors' site
    policy, the dev upstream (groups journal-editors, students) and the generic git backend
    `campus`."""
    policies = tmp_path / "policies"
    policies.mkdir()
    packaged = Path(__file__).resolve().parents[2] / "policies"
    for name in ("broker.cedarschema", "default.cedar"):
        (policies / name).write_text((packaged / name).read_text())
    (policies / "site.cedar").write_text(EDITOR_POLICY)
    settings = make_settings(
        tmp_path, openbao.address, vault_approle,
        upstreams=[{"type": "dev", "id": "dev", "groups": ["journal-editors", "students"]}],
        backends=[{
            "type": "git", "id": "campus", "url": "http://127.0.0.1:9/",
            "account_claim": "forge_user",
        }],
        policy={"directory": str(policies)}, database={"url": database_url},
        grants={"launcher_url": "https://binder.example/v2/git/{repo_url}/{ref}"},
    )  # fmt: skip
    svc = await start_broker(settings)
    try:
        for who in (AUTHOR, EDITOR, STRANGER):
            await remember_principal(svc, who)
        async with TestClient(TestServer(app_with_services(svc))) as raw:
            yield GrantsEnv(svc, ContractClient(raw))
    finally:
        await svc.close()


@pytest_asyncio.fixture
async def env(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth, database_url: str
) -> AsyncIterator[GrantsEnv]:
    """Once on SQLite and once on PostgreSQL (`database_url`)."""
    async with grants_env(tmp_path, openbao, vault_approle, database_url) as started:
        yield started


async def test_the_owner_creates_a_grant_and_only_a_hash_of_its_secret_is_kept(
    env: GrantsEnv,
) -> None:
    grant = await env.created(
        commit=COMMIT, max_uses=2, note="Round 1 of JOSS review #42",
        reviewer={"email": "Reviewer@Example.org"},
    )  # fmt: skip
    assert grant["repo"] == REPO and grant["commit"] == COMMIT and grant["max_uses"] == 2
    assert grant["status"] == "live" and grant["uses"] == 0 and grant["redemptions"] == []
    assert grant["reviewer"] == {"kind": "email", "email": "Reviewer@Example.org"}
    public = env.svc.settings.server.public_url
    match = re.fullmatch(re.escape(public) + r"/review\?k=([A-Za-z0-9_-]{43})", grant["url"])
    assert match is not None, grant["url"]
    secret = match.group(1)
    assert grant["clone_url"] == f"{public}/git/campus/ada/paper.git"
    assert grant["launch_url"] == (
        "https://binder.example/v2/git/http%3A%2F%2F127.0.0.1%3A8080%2Fgit%2Fcampus%2Fada%2F"
        f"paper.git/{COMMIT}"
    )
    record = await env.record(grant["id"])
    assert record.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert record.created_by == AUTHOR.id and record.reviewer_kind == "email"
    [created] = audit_events(env.svc, "grant.created")
    assert created["actor"] == AUTHOR.id and created["data"]["grant"] == grant["id"]
    assert created["data"]["policies"] == ["owner-grants-own-repo"]
    assert secret not in Path(env.svc.settings.audit.path).read_text()


async def test_a_non_owner_may_not_create_a_grant_and_is_audited(env: GrantsEnv) -> None:
    refused = await env.create(STRANGER)
    assert refused.status == 403 and refused.json()["error"] == "access_denied"
    [denied] = audit_events(env.svc, "grant.denied")
    assert denied["actor"] == STRANGER.id and denied["data"]["repo"] == REPO
    assert audit_events(env.svc, "grant.created") == []
    async with env.svc.db.reads() as db:
        assert (await db.execute(select(GrantRecord))).first() is None


async def test_bad_requests_are_refused_naming_the_problem(env: GrantsEnv) -> None:
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    too_far = (datetime.now(UTC) + timedelta(days=120)).isoformat()
    for body, says in (
        ({"expires_at": past}, "future"),
        ({"expires_at": too_far}, "90 days"),
        ({"max_uses": 0}, "max_uses"),
        ({"max_uses": 1000}, "at most 100"),
        ({"commit": "HEAD"}, "commit"),
        ({"reviewer": {"email": "x@y.org", "anonymous": True}}, "reviewer"),
        ({"reviewer": {"orcid": "0000-0002-1825-0098"}}, "ORCID"),
        ({"reviewer": {"anonymous": False}}, "reviewer"),
        ({"repo": "campus/ada"}, "backend/owner/name"),
        ({"surprise": 1}, "surprise"),
    ):
        response = await env.create(AUTHOR, **body)
        assert response.status == 400, (body, response.text)
        assert says in response.json()["error_description"], (body, response.text)
    unknown = await env.create(AUTHOR, repo="nowhere/ada/paper")
    assert unknown.status == 404
    no_scope = await env.client.post(
        "/v1/grants", json={}, headers=bearer(await env.token(AUTHOR, scope=("repo:read",)))
    )
    assert no_scope.status == 403 and no_scope.json()["error"] == "insufficient_scope"


async def test_a_named_reviewer_redeems_after_signing_in(env: GrantsEnv) -> None:
    grant = await env.created(commit=COMMIT, reviewer={"email": "BOB@dev.invalid"})
    page = await open_link(env.client, grant["url"])
    assert page.status == 200 and COMMIT in page.text and REPO in page.text
    assert "BOB@dev.invalid" not in page.text  # a forwarded link does not say whom it is for
    assert "/login?idp=dev&amp;next=%2Freview%3Fk%3D" in page.text
    assert forms(page.text) == []  # no way in without signing in
    signed_in = await sign_in(env.client, "bob", next_url=link_path(grant["url"]))
    assert signed_in.status == 303 and signed_in.headers["Location"] == link_path(grant["url"])
    issued = await redeem(env.client, grant["url"])
    assert issued.status == 200, issued.text
    assert issued.headers["Cache-Control"] == "no-store"
    token = token_of(issued)
    claims = env.svc.tokens.verify(token, audience=env.svc.settings.server.public_url)
    bob_id = Principal(idp="dev", issuer=DEV_ISSUER, subject="bob").id
    assert claims["sub"] == bob_id and claims["client_id"] == "broker-review"
    assert claims["scope"] == "repo:read"
    assert (claims["grant"], claims["repo"], claims["commit"]) == (grant["id"], REPO, COMMIT)
    assert "http.extraHeader" in issued.text and grant["clone_url"] in issued.text
    assert 'id="launch"' in issued.text and "Reviewer 1" in issued.text
    [row] = await env.redemptions(grant["id"])
    assert row.principal_id == bob_id and row.signed_in and row.token_jti == claims["jti"]
    assert row.pseudonym == "Reviewer 1" and "bob@dev.invalid" in row.display
    assert (await env.record(grant["id"])).uses == 1
    [redeemed] = audit_events(env.svc, "grant.redeemed")
    assert redeemed["data"]["jti"] == claims["jti"] and redeemed["data"]["grant"] == grant["id"]
    assert "bob@dev.invalid" not in str(redeemed)
    assert token not in Path(env.svc.settings.audit.path).read_text()


async def test_an_anonymous_reviewer_redeems_without_signing_in(env: GrantsEnv) -> None:
    grant = await env.created()
    page = await open_link(env.client, grant["url"])
    assert "Continue without signing in" in page.text
    assert "broker_review_csrf" in page.headers.get("Set-Cookie", "")
    issued = await redeem(env.client, grant["url"], mode="anonymous")
    assert issued.status == 200, issued.text
    claims = env.svc.tokens.verify(token_of(issued))
    assert claims["sub"].startswith("anon-") and claims["grant"] == grant["id"]
    assert "commit" not in claims
    [row] = await env.redemptions(grant["id"])
    assert row.principal_id == claims["sub"] and not row.signed_in and row.display == ""


async def test_max_uses_is_enforced(env: GrantsEnv) -> None:
    grant = await env.created(max_uses=2)
    for _ in range(2):
        assert (await redeem(env.client, grant["url"], mode="anonymous")).status == 200
        env.forget_browser()
    page = await open_link(env.client, grant["url"])
    assert page.status == 403 and "used as often as it allows" in page.text
    record = await env.record(grant["id"])
    assert record.uses == 2 and len(await env.redemptions(grant["id"])) == 2
    pseudonyms = sorted(r.pseudonym for r in await env.redemptions(grant["id"]))
    assert pseudonyms == ["Reviewer 1", "Reviewer 2"]


async def test_the_author_sees_pseudonyms_and_the_editor_sees_who(env: GrantsEnv) -> None:
    grant = await env.created(max_uses=5, reviewer={"any_signed_in": True})
    for name in ("bob", "carol"):
        await sign_in(env.client, name)
        assert (await redeem(env.client, grant["url"])).status == 200
        env.forget_browser()
    author = await env.client.get(
        "/v1/grants", params={"repo": REPO}, headers=bearer(await env.token(AUTHOR))
    )
    [seen] = author.json()["grants"]
    assert seen["identities_visible"] is False
    assert [r["pseudonym"] for r in seen["redemptions"]] == ["Reviewer 1", "Reviewer 2"]
    assert "bob" not in author.text and "carol" not in author.text
    assert all(set(r) == {"pseudonym", "signed_in", "redeemed_at", "expires_at"}
               for r in seen["redemptions"])  # fmt: skip
    editor = await env.client.get(
        "/v1/grants", params={"repo": REPO}, headers=bearer(await env.token(EDITOR))
    )
    [full] = editor.json()["grants"]
    assert full["identities_visible"] is True
    assert ["bob" in r["display"] for r in full["redemptions"]] == [True, False]
    assert "carol@dev.invalid" in full["redemptions"][1]["display"]
    mine = await env.client.get("/v1/grants", headers=bearer(await env.token(AUTHOR)))
    assert [g["id"] for g in mine.json()["grants"]] == [grant["id"]]
    theirs = await env.client.get("/v1/grants", headers=bearer(await env.token(EDITOR)))
    assert theirs.json()["grants"] == []  # without repo: only what the caller created
    refused = await env.client.get(
        "/v1/grants", params={"repo": REPO}, headers=bearer(await env.token(STRANGER))
    )
    assert refused.status == 403


async def test_an_editor_grant_hides_the_reviewer_from_the_author(env: GrantsEnv) -> None:
    grant = await env.created(EDITOR, reviewer={"orcid": "https://orcid.org/0000-0002-1825-0097"})
    assert grant["reviewer"] == {"kind": "orcid", "orcid": "0000-0002-1825-0097"}
    author = await env.client.get(
        "/v1/grants", params={"repo": REPO}, headers=bearer(await env.token(AUTHOR))
    )
    [seen] = author.json()["grants"]
    assert seen["reviewer"] == {"kind": "orcid"} and "1825" not in author.text


async def test_revoking_ends_the_grant_and_its_tokens(env: GrantsEnv) -> None:
    grant = await env.created(max_uses=3)
    claims = env.svc.tokens.verify(
        token_of(await redeem(env.client, grant["url"], mode="anonymous"))
    )
    env.forget_browser()
    revoked = await env.client.request(
        "DELETE", f"/v1/grants/{grant['id']}", headers=bearer(await env.token(AUTHOR))
    )
    assert revoked.status == 200 and revoked.json()["status"] == "revoked"
    assert await is_revoked(env.svc, claims["jti"])
    record = await env.record(grant["id"])
    assert record.revoked_at is not None and record.revoked_by == AUTHOR.id
    [event] = audit_events(env.svc, "grant.revoked")
    assert event["data"]["revoked_jti"] == [claims["jti"]]
    again = await open_link(env.client, grant["url"])
    assert again.status == 403 and "revoked" in again.text
    assert len(await env.redemptions(grant["id"])) == 1


async def test_the_editors_receipt_verifies_against_the_published_keys(env: GrantsEnv) -> None:
    grant = await env.created(max_uses=2)
    await sign_in(env.client, "bob")
    assert (await redeem(env.client, grant["url"], mode="signed-in")).status == 200
    env.forget_browser()
    assert (await redeem(env.client, grant["url"], mode="anonymous")).status == 200
    path = f"/v1/grants/{grant['id']}/receipt"
    refused = await env.client.get(path, headers=bearer(await env.token(AUTHOR)))
    assert refused.status == 403  # the author may not learn who reviewed
    response = await env.client.get(path, headers=bearer(await env.token(EDITOR)))
    assert response.status == 200, response.text
    receipt = response.json()["receipt"]
    jwks = (await env.client.get("/jwks.json")).json()
    header = jwt.get_unverified_header(receipt)
    assert header["typ"] == "grant-receipt+jwt" and header["kid"] == response.json()["kid"]
    key = {k.key_id: k for k in jwt.PyJWKSet.from_dict(jwks).keys}[header["kid"]]
    claims = jwt.decode(
        receipt, key=key, algorithms=[header["alg"]],
        issuer=env.svc.settings.server.public_url, options={"require": ["iss", "iat", "sub"]},
    )  # fmt: skip
    assert claims["sub"] == grant["id"] and claims["requested_by"] == EDITOR.id
    who = [r.get("principal_id") for r in claims["grant"]["redemptions"]]
    assert who[0] == Principal(idp="dev", issuer=DEV_ISSUER, subject="bob").id
    assert who[1].startswith("anon-")
    events = [e["event"] for e in claims["events"]]
    assert events[0] == "grant.created" and events.count("grant.redeemed") == 2
    chain = {(r["seq"], r["hash"]) for r in audit_events(env.svc)}
    assert all((e["seq"], e["hash"]) in chain for e in claims["events"])
    # A receipt is not an access token.
    assert (await env.client.get("/v1/whoami", headers=bearer(receipt))).status == 401


async def test_the_owner_page_lists_creates_and_revokes(env: GrantsEnv) -> None:
    await sign_in(env.client, "eve", groups=("journal-editors",))
    page = await env.client.get("/grants", headers=HTML)
    assert page.status == 200 and "There are none." in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    form = {
        "csrf": csrf.group(1), "repo": REPO, "commit": COMMIT, "days": "7", "max_uses": "1",
        "reviewer": "anonymous", "who": "", "note": "Please review by Friday",
    }  # fmt: skip
    created = await env.client.post("/grants", data=form, headers=HTML)
    assert created.status == 200, created.text
    link = re.search(r'<pre id="link">([^<]+)</pre>', created.text)
    assert link is not None and "/review?k=" in link.group(1)
    listed = await env.client.get("/grants", params={"repo": REPO}, headers=HTML)
    assert "Please review by Friday" in listed.text and COMMIT in listed.text
    grant_id = re.search(r'name="grant_id" value="([^"]+)"', listed.text)
    assert grant_id is not None
    forged = await env.client.post(
        "/grants/revoke", data={"grant_id": grant_id.group(1)}, headers=HTML
    )
    assert forged.status == 400 and (await env.record(grant_id.group(1))).revoked_at is None
    done = await env.client.post(
        "/grants/revoke", data={"csrf": csrf.group(1), "grant_id": grant_id.group(1)},
        headers=HTML,
    )  # fmt: skip
    assert done.status == 303 and done.headers["Location"] == "/grants"
    assert (await env.record(grant_id.group(1))).revoked_by is not None
    env.forget_browser()
    anonymous = await env.client.get("/grants", headers=HTML)
    assert anonymous.status == 302 and anonymous.headers["Location"].startswith("/login?next=")
