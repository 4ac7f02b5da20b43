"""`/v1/secrets` and repository credentials on a generic git host, against a real OpenBao:
a stored secret is never readable back, an organisation's secret needs `admin` (refusal
audited), Cedar `read_repo` decides a repo credential, and `RepoRef` refuses bad names."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from adapters.base import Principal
from adapters.downstream.git_host import org_secret_path, user_secret_path
from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault
from broker.errors import InvalidRequest
from broker.oauth.issuance import remember_principal
from broker.repos import RepoRef
from broker.services import Services
from tests.peers.broker import ContractClient, audit_events, make_settings, start_broker

# The OpenBao server (and so the Vault paths) is shared by the whole session: names of our own.
RUN = secrets.token_hex(4)
ADA = Principal(idp="dev", issuer="urn:binder-broker:dev", subject=f"ada-{RUN}", groups=("lab",))
ORG = f"lab-{RUN}"
ROOT = Principal(
    idp="dev", issuer="urn:binder-broker:dev", subject=f"root-{RUN}", groups=("broker-admins",),
    mfa=True,
)  # fmt: skip
PASSWORD = "campus-git-password-0123456789"
SITE_POLICY = """
@id("lab-reads-campus")
@max_ttl("900")
permit (principal in Group::"lab", action == Action::"read_repo", resource)
when { resource.backend == "campus" && resource.namespace == "lab" };
"""


@pytest_asyncio.fixture
async def api(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[tuple[Services, ContractClient]]:
    policies = tmp_path / "policies"
    policies.mkdir()
    root = Path(__file__).resolve().parents[2] / "policies"
    for name in ("broker.cedarschema", "default.cedar"):
        (policies / name).write_text((root / name).read_text())
    (policies / "site.cedar").write_text(SITE_POLICY)
    settings = make_settings(
        tmp_path, openbao.address, vault_approle, mode="production", upstreams=[],
        backends=[
            {"type": "git", "id": "campus", "url": "http://127.0.0.1:9/git"},
            {"type": "vault_secret", "id": "home", "name": "home-token"},
        ],
        policy={"directory": str(policies)},
    )  # fmt: skip
    svc = await start_broker(settings, dev_mode=False)
    try:
        await remember_principal(svc, ADA)
        await remember_principal(svc, ROOT)
        async with TestClient(TestServer(app_with_services(svc))) as raw:
            yield svc, ContractClient(raw)
    finally:
        await svc.close()


async def bearer(svc: Services, who: Principal, *scopes: str) -> dict[str, str]:
    minted = await svc.tokens.mint(
        subject=who.id, audience=svc.settings.server.public_url, client_id="launcher",
        scope=scopes or ("secrets",),
    )  # fmt: skip
    return {"Authorization": f"Bearer {minted.token}"}


async def test_a_stored_git_secret_is_used_but_never_shown(
    api: tuple[Services, ContractClient],
) -> None:
    svc, client = api
    headers = await bearer(svc, ADA)
    stored = await client.request(
        "PUT", "/v1/secrets/campus", json={"username": "ada", "password": PASSWORD},
        headers=headers,
    )  # fmt: skip
    assert stored.status == 204 and stored.body == b""
    entry = await svc.vault.kv_read(user_secret_path(svc.settings.vault.prefix, "campus", ADA.id))
    assert entry is not None and entry.data == {"username": "ada", "password": PASSWORD}
    listed = await client.get("/v1/secrets", headers=headers)
    assert listed.json() == {"secrets": [{"backend": "campus", "scope": "user"}]}
    assert PASSWORD not in listed.text
    assert PASSWORD not in Path(svc.settings.audit.path).read_text()
    [record] = [r for r in audit_events(svc) if r["event"] == "secret.stored"]
    assert record["actor"] == ADA.id and record["data"]["backend"] == "campus"
    deleted = await client.request("DELETE", "/v1/secrets/campus", headers=headers)
    assert deleted.status == 204
    assert (await client.get("/v1/secrets", headers=headers)).json() == {"secrets": []}


async def test_an_organisation_secret_needs_admin(api: tuple[Services, ContractClient]) -> None:
    svc, client = api
    body = {"password": PASSWORD, "scope": "organisation", "organisation": ORG}
    path = org_secret_path(svc.settings.vault.prefix, "campus", ORG)
    refused = await client.request(
        "PUT", "/v1/secrets/campus", json=body, headers=await bearer(svc, ADA)
    )
    assert refused.status == 403 and refused.json()["error"] == "access_denied"
    assert await svc.vault.kv_read(path) is None
    [denied] = [r for r in audit_events(svc) if r["event"] == "secret.denied"]
    assert denied["actor"] == ADA.id and denied["outcome"] == "denied"
    allowed = await client.request(
        "PUT", "/v1/secrets/campus", json=body, headers=await bearer(svc, ROOT)
    )
    assert allowed.status == 204
    entry = await svc.vault.kv_read(path)
    assert entry is not None and entry.data["password"] == PASSWORD


@pytest.mark.parametrize(
    ("body", "scopes", "status", "error"),
    [
        ({"password": PASSWORD}, ("launch:home",), 403, "insufficient_scope"),
        ({"password": ""}, ("secrets",), 400, "invalid_request"),
        ({"password": PASSWORD, "extra": "x"}, ("secrets",), 400, "invalid_request"),
        ({"password": PASSWORD, "scope": "organisation"}, ("secrets",), 400, "invalid_request"),
    ],
)
async def test_bad_secret_requests_store_nothing(
    api: tuple[Services, ContractClient], body: dict[str, Any], scopes: tuple[str, ...],
    status: int, error: str,
) -> None:  # fmt: skip
    svc, client = api
    response = await client.request(
        "PUT", "/v1/secrets/campus", json=body, headers=await bearer(svc, ADA, *scopes)
    )
    assert response.status == status and response.json()["error"] == error
    assert response.headers["Cache-Control"] == "no-store"
    prefix = svc.settings.vault.prefix
    assert await svc.vault.kv_read(user_secret_path(prefix, "campus", ADA.id)) is None


async def test_a_vault_secret_backend_secret_is_stored_for_launches(
    api: tuple[Services, ContractClient],
) -> None:
    svc, client = api
    stored = await client.request(
        "PUT", "/v1/secrets/home", json={"token": "home-s3cret"}, headers=await bearer(svc, ADA)
    )
    assert stored.status == 204
    path = f"{svc.settings.vault.prefix}/users/{ADA.id}/home-token"
    entry = await svc.vault.kv_read(path)
    assert entry is not None and entry.data == {"token": "home-s3cret"}
    nested = await client.request(
        "PUT", "/v1/secrets/home", json={"token": {"a": 1}}, headers=await bearer(svc, ADA)
    )
    assert nested.status == 400


async def test_repo_credentials_follow_read_repo(api: tuple[Services, ContractClient]) -> None:
    svc, client = api
    await client.request(
        "PUT", "/v1/secrets/campus", json={"username": "ada", "password": PASSWORD},
        headers=await bearer(svc, ADA),
    )  # fmt: skip
    launch = await bearer(svc, ADA, "launch:campus")
    issued = await client.post(
        "/v1/credentials", json={"backend": "campus", "repo": "lab/thesis", "duration": 3600},
        headers=launch,
    )  # fmt: skip
    assert issued.status == 201, issued.text
    body = issued.json()
    assert body["kind"] == "git" and body["policies"] == ["lab-reads-campus"]
    assert body["credential"]["url"] == "http://127.0.0.1:9/git/lab/thesis.git"
    assert body["clipped"] is True  # the site policy's 900 s
    refused = await client.post(
        "/v1/credentials", json={"backend": "campus", "repo": "other/thesis"}, headers=launch
    )
    assert refused.status == 403 and refused.json()["error"] == "access_denied"
    denied = [r for r in audit_events(svc) if r["event"] == "credential.denied"]
    assert [d["data"]["repo"] for d in denied] == ["campus/other/thesis"]
    no_repo = await client.post("/v1/credentials", json={"backend": "campus"}, headers=launch)
    assert no_repo.status == 400
    assert PASSWORD not in Path(svc.settings.audit.path).read_text()


@pytest.mark.parametrize(
    "name",
    ["campus/lab", "campus/../x/y", "campus/lab/..", "campus//x", "campus/lab/a b",
     "campus/lab/x/y", "campus/lab/.hidden..", "campus/la%2fb/x"],
)  # fmt: skip
def test_repo_names_are_checked(name: str) -> None:
    with pytest.raises(InvalidRequest):
        RepoRef.parse(name)


def test_repo_names_parse() -> None:
    ref = RepoRef.parse("gitlab/group~sub/project.git")
    assert (ref.backend, ref.forge_owner, ref.name) == ("gitlab", "group/sub", "project")
    assert str(ref) == "gitlab/group~sub/project"
