"""`/v1/credentials` against a real OpenBao (the vault_secret backend): the policy decides,
the duration is clipped and says so, oversized requests are refused naming the policy, the
lease is listed and revoked, tokens of another audience, without the scope or revoked are
refused, and no secret reaches the audit log."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from adapters.base import Principal
from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault, provision
from broker.oauth.bearer import revoke_access_token
from broker.oauth.clients import hash_secret
from broker.oauth.issuance import remember_principal
from broker.services import Services
from tests.peers.broker import ContractClient, audit_events, make_settings, start_broker

ADA = Principal(idp="dev", issuer="urn:binder-broker:dev", subject="ada", groups=("students",))
SECRET = "ada-home-s3cret-value"
CLIENT_SECRET = "launcher-secret-0123456789abcdef"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
SITE_POLICY = """
@id("launch-home-for-students")
@max_ttl("1800")
@cpu("4")
@memory("8")
@disk("20")
@gpu("0")
permit (principal in Group::"students", action == Action::"launch", resource == Backend::"home");
"""


@pytest_asyncio.fixture
async def api(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[tuple[Services, ContractClient]]:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "site.cedar").write_text(SITE_POLICY)
    schema = Path(__file__).resolve().parents[2] / "policies" / "broker.cedarschema"
    (policies / schema.name).write_text(schema.read_text())
    settings = make_settings(
        tmp_path, openbao.address, vault_approle, mode="production", upstreams=[],
        backends=[
            {"type": "vault_secret", "id": "home", "name": "home-token", "max_ttl": 7200},
            {"type": "vault_secret", "id": "other", "name": "other-token"},
        ],
        policy={"directory": str(policies)},
        clients=[{
            "client_id": "launcher", "name": "Launcher", "secret_hash": hash_secret(CLIENT_SECRET),
            "grant_types": ["urn:ietf:params:oauth:grant-type:token-exchange"],
            "scopes": ["launch:home"], "first_party": True,
        }],
    )  # fmt: skip
    svc = await start_broker(settings, dev_mode=False)
    try:
        await remember_principal(svc, ADA)
        prefix = svc.settings.vault.prefix
        await svc.vault.kv_write(f"{prefix}/users/{ADA.id}/home-token", {"token": SECRET})
        await svc.vault.kv_write(f"{prefix}/users/{ADA.id}/other-token", {"token": "other"})
        async with TestClient(TestServer(app_with_services(svc))) as raw:
            yield svc, ContractClient(raw)
    finally:
        await svc.close()


async def token(
    svc: Services,
    *,
    scope: tuple[str, ...] = ("launch:home", "launch:other"),
    audience: str | None = None,
    subject: str = ADA.id,
) -> tuple[str, str, int]:
    minted = await svc.tokens.mint(
        subject=subject, audience=audience or svc.settings.server.public_url,
        client_id="launcher", scope=scope,
    )  # fmt: skip
    return minted.token, minted.jti, minted.expires_at


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


async def post(client: ContractClient, access: str, body: dict[str, Any]) -> Any:
    return await client.post("/v1/credentials", json=body, headers=bearer(access))


def leases(svc: Services) -> list[dict[str, Any]]:
    return [r for r in audit_events(svc) if r["event"].startswith("credential.")]


async def test_issue_list_and_revoke(api: tuple[Services, ContractClient]) -> None:
    svc, client = api
    access, _, _ = await token(svc)
    before = time.time()
    issued = await post(client, access, {"backend": "home", "duration": 600})
    assert issued.status == 201, issued.text
    assert issued.headers["Cache-Control"] == "no-store"
    body = issued.json()
    assert body["credential"] == {"token": SECRET}
    assert body["kind"] == "secret" and body["backend"] == "home"
    assert body["clipped"] is False and body["policies"] == ["launch-home-for-students"]
    expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00")).timestamp()
    assert before + 598 <= expires <= time.time() + 601
    listed = await client.get("/v1/credentials", headers=bearer(access))
    [lease] = listed.json()["leases"]
    assert lease["lease_id"] == body["lease_id"] and "credential" not in lease
    assert SECRET not in listed.text
    [record] = [r for r in leases(svc) if r["event"] == "credential.issued"]
    assert record["actor"] == ADA.id
    assert record["data"]["lease"] == body["lease_id"]
    assert record["data"]["policies"] == ["launch-home-for-students"]
    assert record["data"]["client"] == "launcher"
    revoked = await client.request(
        "DELETE", f"/v1/credentials/{body['lease_id']}", headers=bearer(access)
    )
    assert revoked.status == 200 and revoked.json()["revoked_by_backend"] is False
    assert (await client.get("/v1/credentials", headers=bearer(access))).json()["leases"] == []
    again = await client.request(
        "DELETE", f"/v1/credentials/{body['lease_id']}", headers=bearer(access)
    )
    assert again.status == 404
    audit_text = Path(svc.settings.audit.path).read_text()
    assert SECRET not in audit_text


async def test_a_longer_duration_is_clipped_to_max_ttl_and_says_so(
    api: tuple[Services, ContractClient],
) -> None:
    svc, client = api
    access, _, _ = await token(svc)
    issued = await post(client, access, {"backend": "home", "duration": 86400})
    assert issued.status == 201
    body = issued.json()
    assert body["clipped"] is True and body["requested_duration"] == 86400
    expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00")).timestamp()
    assert expires <= time.time() + 1800 + 1  # the policy's max_ttl, not the backend's 7200


async def test_resources_above_the_limits_are_refused_naming_the_policy(
    api: tuple[Services, ContractClient],
) -> None:
    svc, client = api
    access, _, _ = await token(svc)
    refused = await post(client, access, {"backend": "home", "resources": {"cpu": 16, "memory": 8}})
    assert refused.status == 403
    assert refused.json()["error"] == "access_denied"
    assert "launch-home-for-students" in refused.json()["error_description"]
    assert "cpu 16 > 4" in refused.json()["error_description"]
    [denied] = [r for r in leases(svc) if r["event"] == "credential.denied"]
    assert denied["data"]["policies"] == ["launch-home-for-students"]
    assert not [r for r in leases(svc) if r["event"] == "credential.issued"]
    assert (await client.get("/v1/credentials", headers=bearer(access))).json()["leases"] == []


async def test_no_policy_no_credential(api: tuple[Services, ContractClient]) -> None:
    svc, client = api
    access, _, _ = await token(svc)
    refused = await post(client, access, {"backend": "other"})  # no permit names it
    assert refused.status == 403 and refused.json()["error"] == "access_denied"
    assert "credential" not in refused.json()
    [denied] = [r for r in leases(svc) if r["event"] == "credential.denied"]
    assert denied["data"]["backend"] == "other" and denied["data"]["policies"] == []
    assert not [r for r in leases(svc) if r["event"] == "credential.issued"]


async def test_tokens_that_do_not_qualify_are_refused(
    api: tuple[Services, ContractClient],
) -> None:
    svc, client = api
    other_audience, _, _ = await token(svc, audience="https://launcher.example.org")
    wrong = await post(client, other_audience, {"backend": "home"})
    assert wrong.status == 401 and wrong.json()["error"] == "invalid_token"
    no_scope, _, _ = await token(svc, scope=("launch:other",))
    narrow = await post(client, no_scope, {"backend": "home"})
    assert narrow.status == 403 and narrow.json()["error"] == "insufficient_scope"
    client_only, _, _ = await token(svc, subject="launcher")
    machine = await post(client, client_only, {"backend": "home"})
    assert machine.status == 403
    revoked, jti, expires_at = await token(svc)
    await revoke_access_token(svc, jti, expires_at)
    gone = await post(client, revoked, {"backend": "home"})
    assert gone.status == 401
    missing = await client.post("/v1/credentials", json={"backend": "home"})
    assert missing.status == 401
    assert not [r for r in leases(svc) if r["event"] == "credential.issued"]


async def test_bad_requests_are_clear_and_change_nothing(
    api: tuple[Services, ContractClient],
) -> None:
    svc, client = api
    access, _, _ = await token(svc)
    for body, fragment in [
        ({"backend": "nope"}, "no backend"),
        ({"backend": "home", "duration": 0}, "duration"),
        ({"backend": "home", "resources": {"cpu": "2"}}, "resources.cpu"),
        ({"backend": "home", "colour": "blue"}, "colour"),
    ]:
        answer = await post(client, access, body)
        assert answer.status == 400, body
        assert fragment in answer.json()["error_description"], answer.json()
    assert not [r for r in leases(svc) if r["event"] == "credential.issued"]
    assert (await client.get("/v1/credentials", headers=bearer(access))).json()["leases"] == []


async def test_token_exchange_with_a_backend_as_resource(
    api: tuple[Services, ContractClient],
) -> None:
    svc, client = api
    access, _, _ = await token(svc)
    form = {
        "grant_type": EXCHANGE, "subject_token": access, "subject_token_type": ACCESS,
        "resource": "home", "duration": "300",
    }  # fmt: skip
    basic = base64.b64encode(f"launcher:{CLIENT_SECRET}".encode()).decode()
    auth = {"Authorization": f"Basic {basic}"}
    exchanged = await client.post("/oauth/token", data=form, headers=auth)
    assert exchanged.status == 200, exchanged.text
    body = exchanged.json()
    assert body["token_type"] == "N_A"
    assert body["issued_token_type"] == "urn:binder-broker:token-type:credential"
    assert json.loads(body["access_token"]) == {"token": SECRET}
    assert 290 <= body["expires_in"] <= 300 and body["backend"] == "home"
    [record] = [r for r in leases(svc) if r["event"] == "credential.issued"]
    assert record["data"]["lease"] == body["lease_id"] and record["data"]["client"] == "launcher"
    narrow, _, _ = await token(svc, scope=("launch:other",))
    refused = await client.post("/oauth/token", data=form | {"subject_token": narrow}, headers=auth)
    assert refused.status == 400 and refused.json()["error"] == "invalid_scope"
    assert len([r for r in leases(svc) if r["event"] == "credential.issued"]) == 1


async def test_vault_unreachable_is_503_with_nothing_issued_or_leaked(
    tmp_path: Path, fresh_openbao: DevVault
) -> None:
    auth = await provision(fresh_openbao.address, fresh_openbao.root_token)
    settings = make_settings(
        tmp_path, fresh_openbao.address, auth, mode="production", upstreams=[],
        backends=[{"type": "vault_secret", "id": "home", "name": "home-token"}],
    )  # fmt: skip
    svc = await start_broker(settings, dev_mode=False)
    try:
        await remember_principal(svc, ADA)
        await svc.vault.kv_write(
            f"{svc.settings.vault.prefix}/users/{ADA.id}/home-token", {"token": SECRET}
        )
        access, _, _ = await token(svc, scope=("launch:home",))
        fresh_openbao.stop()
        async with TestClient(TestServer(app_with_services(svc))) as raw:
            client = ContractClient(raw)
            answer = await post(client, access, {"backend": "home"})
            assert answer.status == 503
            assert answer.json()["error"] == "temporarily_unavailable"
            assert SECRET not in answer.text and access not in answer.text
            listed = await client.get("/v1/credentials", headers=bearer(access))
            assert listed.json()["leases"] == []
        [failed] = [r for r in leases(svc) if r["event"] == "credential.failed"]
        assert failed["data"]["backend"] == "home"
        assert not [r for r in leases(svc) if r["event"] == "credential.issued"]
        assert SECRET not in Path(svc.settings.audit.path).read_text()
    finally:
        await svc.close()
