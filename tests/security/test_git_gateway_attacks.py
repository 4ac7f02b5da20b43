"""Attacks on the git gateway, against the real `git http-backend` peer and OpenBao.

Each refusal is asserted with its status and error code, that nothing reached the git host
(its request log for the repository stays empty) and, where the token itself was valid,
that a `repo.denied` audit record names the reason.
"""

from __future__ import annotations

import base64
import gzip
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from adapters.base import Principal
from adapters.downstream.git_host import user_secret_path
from adapters.vault import AppRoleAuth
from broker.devvault import DevVault
from broker.oauth.bearer import revoke_access_token
from broker.oauth.issuance import remember_principal
from broker.routes.git import FLUSH, pkt
from tests.integration.test_git_gateway import (
    ADA,
    BACKEND,
    OWNER,
    Gateway,
    insert_grant,
    mint,
    new_repo,
    open_gateway,
    reviewer_token,
)
from tests.peers.broker import Checked, audit_events
from tests.peers.git_http import GitPeer

BOB = Principal(idp="dev", issuer="urn:binder-broker:dev", subject="bob", groups=("physics",))
CAROL = Principal(idp="dev", issuer="urn:binder-broker:dev", subject="carol", groups=("lab",))
UPLOAD = "application/x-git-upload-pack-request"


@pytest_asyncio.fixture
async def gateway(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth, git_peer: GitPeer
) -> AsyncIterator[Gateway]:
    """The broker of tests/integration/test_git_gateway.py in front of the git peer."""
    async with open_gateway(tmp_path, openbao, vault_approle, git_peer) as gw:
        yield gw


def refs_path(name: str, service: str = "git-upload-pack", owner: str = OWNER) -> str:
    return f"/git/{BACKEND}/{owner}/{name}.git/info/refs?service={service}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(password: str, username: str = "broker") -> dict[str, str]:
    pair = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


def forwarded(gw: Gateway, name: str) -> list[dict[str, Any]]:
    return gw.peer.requests(f"/{OWNER}/{name}.git/")


def denials(gw: Gateway, jti: str) -> list[dict[str, Any]]:
    return [r for r in audit_events(gw.svc, "repo.denied") if r["data"].get("jti") == jti]


def assert_refused(response: Checked, status: int, error: str) -> None:
    assert response.status == status, response.text
    assert response.json()["error"] == error
    assert response.headers["Cache-Control"] == "no-store"


# --- 401: no usable token; git is asked to authenticate ------------------------------------


async def _no_header(gw: Gateway) -> tuple[dict[str, str], str | None]:
    return {}, None


async def _garbage_bearer(gw: Gateway) -> tuple[dict[str, str], str | None]:
    return bearer("not-a-token"), None


async def _garbage_basic(gw: Gateway) -> tuple[dict[str, str], str | None]:
    return basic("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZGEifQ."), None  # alg=none


async def _upstream_secret_as_token(gw: Gateway) -> tuple[dict[str, str], str | None]:
    return basic(gw.peer.password, gw.peer.username), None


async def _other_audience(gw: Gateway) -> tuple[dict[str, str], str | None]:
    minted = await gw.svc.tokens.mint(
        subject=ADA.id, audience="https://other.example.org", client_id="launcher",
        scope=("repo:read",),
    )  # fmt: skip
    return bearer(minted.token), None


async def _revoked(gw: Gateway) -> tuple[dict[str, str], str | None]:
    minted = await gw.svc.tokens.mint(
        subject=ADA.id, audience=gw.url, client_id="launcher", scope=("repo:read",)
    )
    await revoke_access_token(gw.svc, minted.jti, minted.expires_at)
    return basic(minted.token), None


async def _dpop_bound(gw: Gateway) -> tuple[dict[str, str], str | None]:
    minted = await gw.svc.tokens.mint(
        subject=ADA.id, audience=gw.url, client_id="launcher", scope=("repo:read",),
        cnf={"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"},
    )  # fmt: skip
    return bearer(minted.token), minted.jti


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param(_no_header, id="no-token"),
        pytest.param(_garbage_bearer, id="garbage-bearer"),
        pytest.param(_garbage_basic, id="alg-none-as-basic-password"),
        pytest.param(_upstream_secret_as_token, id="upstream-secret-is-not-a-broker-token"),
        pytest.param(_other_audience, id="token-for-another-audience"),
        pytest.param(_revoked, id="revoked-jti"),
        pytest.param(_dpop_bound, id="dpop-bound-token"),
    ],
)
async def test_no_valid_token_is_a_basic_challenge_and_nothing_is_forwarded(
    gateway: Gateway, credentials: Any
) -> None:
    gw = gateway
    name, _ = new_repo(gw.peer, commits=1)
    headers, jti = await credentials(gw)
    for response in (
        await gw.client.get(refs_path(name), headers=headers),
        await gw.client.post(
            f"/git/{BACKEND}/{OWNER}/{name}.git/git-upload-pack", data=b"0000",
            headers={**headers, "Content-Type": UPLOAD},
        ),
    ):  # fmt: skip
        assert_refused(response, 401, "invalid_token")
        assert response.headers["WWW-Authenticate"].startswith('Basic realm="binder-broker"')
    assert forwarded(gw, name) == []
    assert not [r for r in audit_events(gw.svc, "repo.read") if name in r["data"]["repo"]]
    if jti is not None:  # the token itself was valid: its refusal is audited
        [first, _second] = denials(gw, jti)
        assert "key-bound" in first["data"]["reason"]


# --- 403: a valid token that may not do this ------------------------------------------------


async def test_a_token_without_repo_read_is_refused(gateway: Gateway) -> None:
    gw = gateway
    name, _ = new_repo(gw.peer, commits=1)
    token, jti = await mint(gw, scope=("launch:home",))
    response = await gw.client.get(refs_path(name), headers=bearer(token))
    assert_refused(response, 403, "access_denied")
    assert "repo:read" in response.json()["error_description"]
    assert forwarded(gw, name) == []
    [record] = denials(gw, jti)
    assert record["data"]["reason"] == "no scope repo:read" and record["actor"] == ADA.id


async def test_a_user_no_policy_lets_read_is_refused(gateway: Gateway) -> None:
    gw = gateway
    await remember_principal(gw.svc, BOB)
    name, _ = new_repo(gw.peer, commits=1)
    token, jti = await mint(gw, subject=BOB.id)
    response = await gw.client.get(refs_path(name), headers=basic(token))
    assert_refused(response, 403, "access_denied")
    assert forwarded(gw, name) == []
    [record] = denials(gw, jti)
    assert record["actor"] == BOB.id and record["data"]["repo"] == f"{BACKEND}/{OWNER}/{name}"
    assert record["data"]["policies"] == []


@pytest.mark.parametrize("scope", [("repo:read",), ("repo:read", "repo:write")])
async def test_receive_pack_is_refused_without_write(
    gateway: Gateway, scope: tuple[str, ...]
) -> None:
    gw = gateway
    name, _ = new_repo(gw.peer, commits=1)
    token, jti = await mint(gw, scope=scope)
    advert = await gw.client.get(refs_path(name, "git-receive-pack"), headers=basic(token))
    assert_refused(advert, 403, "access_denied")
    push = await gw.client.post(
        f"/git/{BACKEND}/{OWNER}/{name}.git/git-receive-pack", data=FLUSH,
        headers={**basic(token), "Content-Type": "application/x-git-receive-pack-request"},
    )  # fmt: skip
    assert_refused(push, 403, "access_denied")
    assert forwarded(gw, name) == []
    records = denials(gw, jti)
    assert len(records) == 2 and all(r["data"]["write"] is True for r in records)
    if "repo:write" in scope:  # the scope is there; Cedar has no write_repo permit
        assert "no policy lets you write to" in push.json()["error_description"]
    else:
        assert records[0]["data"]["reason"] == "no scope repo:write"


async def test_a_grant_for_repo_a_is_refused_on_repo_b(gateway: Gateway) -> None:
    gw = gateway
    repo_a, _ = new_repo(gw.peer, commits=1)
    repo_b, _ = new_repo(gw.peer, commits=1)
    full_a = f"{BACKEND}/{OWNER}/{repo_a}"
    grant_id = await insert_grant(gw, full_a, None)
    token = await reviewer_token(gw, full_a, grant_id, None)
    response = await gw.client.get(refs_path(repo_b), headers=basic(token))
    assert_refused(response, 403, "access_denied")
    assert forwarded(gw, repo_b) == []
    [record] = [
        r for r in audit_events(gw.svc, "repo.denied") if r["data"].get("grant") == grant_id
    ]
    assert record["data"]["reason"] == "the grant is for another repository"
    assert record["data"]["repo"] == f"{BACKEND}/{OWNER}/{repo_b}"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        pytest.param(
            {"expires_at": datetime.now(UTC) - timedelta(minutes=1)}, "the grant has expired",
            id="expired",
        ),
        pytest.param(
            {"revoked_at": datetime.now(UTC), "revoked_by": ADA.id}, "the grant was revoked",
            id="revoked",
        ),
    ],
)  # fmt: skip
async def test_a_dead_grant_reads_nothing(
    gateway: Gateway, changes: dict[str, Any], reason: str
) -> None:
    gw = gateway
    name, shas = new_repo(gw.peer, commits=1)
    repo = f"{BACKEND}/{OWNER}/{name}"
    grant_id = await insert_grant(gw, repo, shas[0], **changes)
    token = await reviewer_token(gw, repo, grant_id, shas[0])
    response = await gw.client.get(refs_path(name), headers=basic(token))
    assert_refused(response, 403, "access_denied")
    assert response.json()["error_description"] == reason
    assert forwarded(gw, name) == []
    [record] = [
        r for r in audit_events(gw.svc, "repo.denied") if r["data"].get("grant") == grant_id
    ]
    assert record["data"]["reason"] == reason


def _want(sha: str, caps: bytes = b" multi_ack_detailed side-band-64k ofs-delta") -> bytes:
    return pkt(b"want " + sha.encode() + caps + b"\n")


@pytest.mark.parametrize(
    ("body", "gzipped"),
    [
        pytest.param(lambda s: _want(s[1]) + FLUSH + pkt(b"done\n"), False, id="other-commit"),
        pytest.param(lambda s: _want(s[1]) + FLUSH + pkt(b"done\n"), True, id="other-gzip"),
        pytest.param(
            lambda s: _want(s[0]) + _want(s[1], b"") + FLUSH + pkt(b"done\n"), False,
            id="pinned-then-other",
        ),
        pytest.param(
            lambda s: pkt(b"command=fetch\n") + b"0001" + _want(s[1], b"") + FLUSH, False,
            id="protocol-v2-request",
        ),
        pytest.param(lambda s: FLUSH + pkt(b"done\n"), False, id="no-want-at-all"),
    ],
)  # fmt: skip
async def test_a_pinned_grant_refuses_any_other_want(
    gateway: Gateway, body: Any, gzipped: bool
) -> None:
    gw = gateway
    name, shas = new_repo(gw.peer, commits=2)
    repo = f"{BACKEND}/{OWNER}/{name}"
    grant_id = await insert_grant(gw, repo, shas[0])
    token = await reviewer_token(gw, repo, grant_id, shas[0])
    data = body(shas)
    headers = {**basic(token), "Content-Type": UPLOAD, "Git-Protocol": "version=2"}
    if gzipped:
        data = gzip.compress(data)
        headers["Content-Encoding"] = "gzip"
    response = await gw.client.post(
        f"/git/{BACKEND}/{OWNER}/{name}.git/git-upload-pack", data=data, headers=headers
    )
    assert_refused(response, 403, "access_denied")
    assert forwarded(gw, name) == []
    [record] = [
        r for r in audit_events(gw.svc, "repo.denied") if r["data"].get("grant") == grant_id
    ]
    assert record["data"]["reason"].startswith("this grant reads only its pinned commit")


async def test_the_pinned_commit_itself_is_served_even_gzipped(gateway: Gateway) -> None:
    gw = gateway
    name, shas = new_repo(gw.peer, commits=2)
    repo = f"{BACKEND}/{OWNER}/{name}"
    grant_id = await insert_grant(gw, repo, shas[0])
    token = await reviewer_token(gw, repo, grant_id, shas[0])
    data = gzip.compress(_want(shas[0]) + FLUSH + pkt(b"done\n"))
    headers = {**basic(token), "Content-Type": UPLOAD, "Content-Encoding": "gzip"}
    response = await gw.client.post(
        f"/git/{BACKEND}/{OWNER}/{name}.git/git-upload-pack", data=data, headers=headers
    )
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/x-git-upload-pack-result"
    assert response.headers["Cache-Control"] == "no-cache"
    assert b"PACK" in response.body
    [seen] = forwarded(gw, name)
    assert seen["authorized"] and seen["git_protocol"] is None


# --- names, backends and the upstream ----------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/git/campus/lab~../x.git/info/refs?service=git-upload-pack",
        "/git/campus/%2e%2e/x.git/info/refs?service=git-upload-pack",
        "/git/campus/lab/..%2F..%2Fetc.git/info/refs?service=git-upload-pack",
        "/git/campus/..%2Flab/x.git/info/refs?service=git-upload-pack",
        "/git/campus/.lab/-x.git/info/refs?service=git-upload-pack",
        "/git/campus/lab/x%00y.git/info/refs?service=git-upload-pack",
        "/git/..%2Fcampus/lab/x.git/info/refs?service=git-upload-pack",
        "/git/campus/lab/x.git/info/refs?service=git-upload-archive",
        "/git/campus/lab/x.git/info/refs",
    ],
)
async def test_bad_names_and_services_never_reach_the_git_host(gateway: Gateway, path: str) -> None:
    gw = gateway
    token, _ = await mint(gw)
    before = len(gw.peer.requests())
    async with gw.client.raw.get(path, headers=bearer(token)) as response:
        assert response.status in (400, 404), path
    assert len(gw.peer.requests()) == before


async def test_an_unknown_backend_is_not_found(gateway: Gateway) -> None:
    gw = gateway
    token, _ = await mint(gw)
    response = await gw.client.get(
        "/git/nowhere/lab/x.git/info/refs?service=git-upload-pack", headers=bearer(token)
    )
    assert_refused(response, 404, "not_found")


async def test_an_upstream_refusing_the_secret_is_a_502_that_echoes_nothing(
    gateway: Gateway,
) -> None:
    gw = gateway
    await remember_principal(gw.svc, CAROL)
    wrong = f"wrong-{secrets.token_urlsafe(16)}"
    await gw.svc.vault.kv_write(
        user_secret_path(gw.svc.settings.vault.prefix, BACKEND, CAROL.id),
        {"username": gw.peer.username, "password": wrong},
    )
    name, _ = new_repo(gw.peer, commits=1)
    token, jti = await mint(gw, subject=CAROL.id)
    response = await gw.client.get(refs_path(name), headers=basic(token))
    assert_refused(response, 502, "upstream_refused")
    assert wrong not in response.text and "authentication required" not in response.text
    [seen] = forwarded(gw, name)
    assert seen["authorized"] is False  # it did reach the host, with the stored secret
    assert not [r for r in audit_events(gw.svc, "repo.read") if r["data"]["jti"] == jti]
    await gw.svc.vault.kv_delete(  # the OpenBao server is shared by the whole session
        user_secret_path(gw.svc.settings.vault.prefix, BACKEND, CAROL.id)
    )
