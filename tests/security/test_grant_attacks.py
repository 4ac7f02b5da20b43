"""Attacks on reviewer grants: guessed and malformed links; expired, revoked and used-up
grants (also raced); the wrong reviewer; a pseudonymous redemption of a grant that names its
reviewer; posts without the CSRF token; a grant's token used on another repository through
the git gateway; a non-owner creating, revoking or exporting. Each asserts the refusal
(status and error code), that nothing was issued (no redemption, `uses` unchanged) and the
audit record.

Fixtures and helpers come from tests/integration/test_grants.py (same broker set-up).
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest_asyncio
from sqlalchemy import func, select, update

from adapters.vault import AppRoleAuth
from broker import grants
from broker.devvault import DevVault
from broker.storage import GrantRecord, RedemptionRecord
from tests.integration.test_grants import (
    AUTHOR,
    EDITOR,
    HTML,
    STRANGER,
    GrantsEnv,
    bearer,
    forms,
    grants_env,
    link_path,
    open_link,
    redeem,
    token_of,
)
from tests.peers.broker import audit_events, sign_in


@pytest_asyncio.fixture
async def env(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth, database_url: str
) -> AsyncIterator[GrantsEnv]:
    """Once on SQLite and once on PostgreSQL (`database_url`)."""
    async with grants_env(tmp_path, openbao, vault_approle, database_url) as started:
        yield started


async def nothing_issued(env: GrantsEnv, grant_id: str | None = None, uses: int = 0) -> None:
    async with env.svc.db.reads() as db:
        query = select(func.count()).select_from(RedemptionRecord)
        if grant_id is not None:
            query = query.where(RedemptionRecord.grant_id == grant_id)
        assert (await db.execute(query)).scalar_one() == 0
    if grant_id is not None:
        assert (await env.record(grant_id)).uses == uses
    assert audit_events(env.svc, "grant.redeemed") == []


def denials(env: GrantsEnv, reason: str) -> list[dict[str, Any]]:
    return [
        e for e in audit_events(env.svc, "grant.redeem_denied") if reason in e["data"]["reason"]
    ]


async def press(env: GrantsEnv, form: dict[str, str], *, html: bool = False) -> Any:
    return await env.client.post("/review", data=form, headers=HTML if html else {})


async def test_guessed_and_malformed_links_are_refused(env: GrantsEnv) -> None:
    await env.created()
    for secret in (secrets.token_urlsafe(32), "short", "../../etc/passwd", "A" * 44, ""):
        page = await env.client.get("/review", params={"k": secret}, headers=HTML)
        assert page.status == 404 and "request id" in page.text
        api = await env.client.get("/review", params={"k": secret})
        assert api.status == 404 and api.json()["error"] == "not_found"
        posted = await env.client.post("/review", data={"k": secret, "csrf": "x"})
        assert posted.status == 404 and posted.json()["error"] == "not_found"
    await nothing_issued(env)
    assert len(denials(env, "unknown review link")) == 3
    assert len(denials(env, "malformed review link")) == 12


async def test_an_expired_grant_is_refused(env: GrantsEnv) -> None:
    grant = await env.created()
    [form] = forms((await open_link(env.client, grant["url"])).text)
    async with env.svc.db.sessions() as db, db.begin():
        await db.execute(
            update(GrantRecord)
            .where(GrantRecord.id == grant["id"])
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    page = await open_link(env.client, grant["url"])
    assert page.status == 403 and "expired" in page.text
    refused = await press(env, form)
    assert refused.status == 403 and refused.json()["error"] == "access_denied"
    await nothing_issued(env, grant["id"])
    assert len(denials(env, "expired")) == 2


async def test_a_revoked_grant_is_refused(env: GrantsEnv) -> None:
    grant = await env.created()
    [form] = forms((await open_link(env.client, grant["url"])).text)
    deleted = await env.client.request(
        "DELETE", f"/v1/grants/{grant['id']}", headers=bearer(await env.token(AUTHOR))
    )
    assert deleted.status == 200
    refused = await press(env, form)
    assert refused.status == 403 and refused.json()["error"] == "access_denied"
    await nothing_issued(env, grant["id"])
    [denied] = denials(env, "revoked")
    assert denied["data"]["grant"] == grant["id"]


async def test_a_used_up_grant_is_refused_even_when_raced(env: GrantsEnv) -> None:
    grant = await env.created(max_uses=1, reviewer={"any_signed_in": True})
    await sign_in(env.client, "bob")
    [form] = forms((await open_link(env.client, grant["url"])).text)
    assert (await press(env, form, html=True)).status == 200
    again = await press(env, form)  # the session's CSRF token is still good
    assert again.status == 403 and again.json()["error"] == "access_denied"
    assert (await env.record(grant["id"])).uses == 1
    assert len(audit_events(env.svc, "grant.redeemed")) == 1
    assert len(denials(env, "used as often")) == 1
    # Many redemptions of a grant read before any of them counted: the SQL count decides.
    raced = await env.created(max_uses=2)
    stale = await env.record(raced["id"])
    results = await asyncio.gather(
        *(grants.redeem(env.svc, stale, None) for _ in range(6)), return_exceptions=True
    )
    issued = [r for r in results if isinstance(r, grants.Redeemed)]
    refused = [r for r in results if isinstance(r, grants.GrantUnavailable)]
    assert len(issued) == 2 and len(refused) == 4
    assert (await env.record(raced["id"])).uses == 2
    assert len(await env.redemptions(raced["id"])) == 2


async def test_the_wrong_reviewer_is_refused(env: GrantsEnv) -> None:
    grant = await env.created(reviewer={"email": "carol@dev.invalid"})
    await sign_in(env.client, "bob")
    page = await open_link(env.client, grant["url"])
    assert page.status == 200 and "this link is for another reviewer" in page.text
    assert forms(page.text) == []
    home = await env.client.get("/", headers=HTML)
    csrf = re.search(r'name="csrf" value="([^"]+)"', home.text)
    assert csrf is not None
    secret = link_path(grant["url"]).partition("k=")[2]
    for mode, reason in (("signed-in", "not the named reviewer"),
                         ("anonymous", "sign-in required")):  # fmt: skip
        refused = await press(env, {"k": secret, "csrf": csrf.group(1), "mode": mode})
        assert refused.status == 403 and refused.json()["error"] == "access_denied"
        [denied] = denials(env, reason)
        assert denied["data"]["grant"] == grant["id"]
    await nothing_issued(env, grant["id"])


async def test_a_post_without_the_csrf_token_is_refused(env: GrantsEnv) -> None:
    grant = await env.created()
    secret = link_path(grant["url"]).partition("k=")[2]
    bare = await press(env, {"k": secret, "mode": "anonymous"})
    assert bare.status == 400 and bare.json()["error"] == "invalid_request"
    await open_link(env.client, grant["url"])  # sets the double-submit cookie
    wrong = await press(env, {"k": secret, "mode": "anonymous", "csrf": "guess"})
    assert wrong.status == 400 and wrong.json()["error"] == "invalid_request"
    await sign_in(env.client, "bob")
    signed_in = await press(env, {"k": secret, "mode": "signed-in"})
    assert signed_in.status == 400 and signed_in.json()["error"] == "invalid_request"
    await nothing_issued(env, grant["id"])
    assert len(denials(env, "csrf")) == 3


async def test_a_grant_token_does_not_open_another_repository(env: GrantsEnv) -> None:
    grant = await env.created()
    token = token_of(await redeem(env.client, grant["url"], mode="anonymous"))
    basic = base64.b64encode(f"reviewer:{token}".encode()).decode()
    async with env.client.raw.get(
        "/git/campus/ada/other.git/info/refs",
        params={"service": "git-upload-pack"},
        headers={"Authorization": f"Basic {basic}"},
    ) as response:
        assert response.status == 403
        assert (await response.json())["error"] == "access_denied"
    [denied] = audit_events(env.svc, "repo.denied")
    assert denied["data"]["grant"] == grant["id"]
    assert denied["data"]["repo"] == "campus/ada/other"
    assert "another repository" in denied["data"]["reason"]
    # Nor can a reviewer's token manage grants.
    refused = await env.client.get("/v1/grants", headers=bearer(token))
    assert refused.status == 403 and refused.json()["error"] == "insufficient_scope"


async def test_a_non_owner_cannot_create_revoke_or_export(env: GrantsEnv) -> None:
    created = await env.create(STRANGER)
    assert created.status == 403 and created.json()["error"] == "access_denied"
    grant = await env.created()
    stranger = bearer(await env.token(STRANGER))
    revoke = await env.client.request("DELETE", f"/v1/grants/{grant['id']}", headers=stranger)
    assert revoke.status == 403 and revoke.json()["error"] == "access_denied"
    assert (await env.record(grant["id"])).revoked_at is None
    for who in (STRANGER, AUTHOR):
        receipt = await env.client.get(
            f"/v1/grants/{grant['id']}/receipt", headers=bearer(await env.token(who))
        )
        assert receipt.status == 403 and receipt.json()["error"] == "access_denied"
    actions = [e["data"]["action"] for e in audit_events(env.svc, "grant.denied")]
    assert actions == ["create a grant", "revoke a grant", "export a receipt", "export a receipt"]
    async with env.svc.db.reads() as db:
        owners = (await db.execute(select(GrantRecord.created_by))).scalars().all()
    assert owners == [AUTHOR.id]
    assert audit_events(env.svc, "grant.receipt") == []
    editor = await env.client.get(
        f"/v1/grants/{grant['id']}/receipt", headers=bearer(await env.token(EDITOR))
    )
    assert editor.status == 200  # the same grant, by someone the policy allows
    [exported] = audit_events(env.svc, "grant.receipt")
    assert exported["actor"] == EDITOR.id and exported["data"]["grant"] == grant["id"]
