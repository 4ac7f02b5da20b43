"""The admin API for OAuth clients against a broker on real OpenBao, and the
`broker clients hash-secret` / `new-secret` commands.

Only a user the policy lets `admin` (default: group broker-admins with MFA), holding a token
issued to a first-party client, may list, create or delete clients. A refusal stores nothing.
Secrets are stored as scrypt hashes; no response or audit record holds a hash or a secret
(except the one response that hands out a generated secret).
"""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.oauth.clients import check_secret
from broker.services import Services
from tests.integration.test_introspect_revoke import (
    api,
    bearer,
    client_token,
    oauth_settings,
    person,
    raw_post,
    svc,
    user_token,
)
from tests.peers.broker import Checked, ContractClient, audit_events

__all__ = ["api", "oauth_settings", "svc"]  # fixtures shared with the introspection tests
ADMIN_GROUPS = ("broker-admins",)
# broker/oauth/clients.py `register` stores `model_dump_json(...)`, which masks the SecretStr
# secret_hash as "**********"; reading the client back then fails validation (500). Strict:
# once that is fixed these pass, fail as XPASS, and the mark must go.


async def admin_token(svc: Services, *, subject: str = "root-admin") -> tuple[str, str]:
    """A token of an MFA'd broker-admin, issued to the first-party `console` client."""
    admin = person(subject, ADMIN_GROUPS, mfa=True)
    issued = await user_token(svc, admin, client_id="console", scopes=["openid"],
                              audience=["console"])  # fmt: skip
    return issued.body["access_token"], admin.id


async def create(api: ContractClient, token: str, document: Any) -> Checked:
    return await api.post("/v1/admin/clients", json=document, headers=bearer(token))


async def delete(api: ContractClient, token: str, client_id: str) -> Checked:
    return await api.request("DELETE", f"/v1/admin/clients/{client_id}", headers=bearer(token))


async def stored_ids(svc: Services) -> set[str]:
    return {c.id for c in await svc.oauth.clients.list() if c.source == "admin"}


def _basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


async def test_refusals_store_nothing(svc: Services, api: ContractClient) -> None:
    plain_user = person("mallory", ("physics",), mfa=True)
    no_group = (await user_token(svc, plain_user, client_id="console")).body["access_token"]
    no_mfa_user = person("trent", ADMIN_GROUPS, mfa=False)
    no_mfa = (await user_token(svc, no_mfa_user, client_id="console")).body["access_token"]
    # A real admin's token, but issued to a third-party launcher that could replay it here.
    admin = person("root-admin", ADMIN_GROUPS, mfa=True)
    replayed = (await user_token(svc, admin, client_id="launcher")).body["access_token"]
    machine = (await client_token(api, "console"))["access_token"]
    document = {"client_id": "sneaky", "grant_types": ["client_credentials"]}
    for token in (no_group, no_mfa, replayed, machine):
        for response in (
            await api.get("/v1/admin/clients", headers=bearer(token)),
            await create(api, token, document),
            await delete(api, token, "launcher"),
        ):
            assert response.status == 403, response.text
            assert response.json()["error"] == "access_denied"
            assert "clients" not in response.json() and "client_secret" not in response.json()
    for headers in ({}, {"Authorization": "Bearer forged.token.value"}):
        anonymous = await api.post("/v1/admin/clients", json=document, headers=headers)
        assert anonymous.status == 401 and anonymous.json()["error"] == "invalid_token"
    assert await stored_ids(svc) == set()
    assert await svc.oauth.clients.get("sneaky") is None
    assert await svc.oauth.clients.get("launcher") is not None
    assert audit_events(svc, "admin.client_created") == []
    assert audit_events(svc, "admin.client_deleted") == []
    denied = audit_events(svc, "admin.denied")
    assert len(denied) == 12 and {r["outcome"] for r in denied} == {"denied"}
    no_mfa_denials = [r for r in denied if r["actor"] == no_mfa_user.id]
    assert all("forbid-unverified-admin" in r["data"]["policies"] for r in no_mfa_denials)


async def test_create_with_generated_secret_then_use_it(svc: Services, api: ContractClient) -> None:
    token, admin_id = await admin_token(svc)
    document = {"client_id": "new-launcher", "grant_types": ["client_credentials"],
                "scopes": ["launch:aws"], "audiences": ["https://new.example.org"]}  # fmt: skip
    response = await create(api, token, document)
    assert response.status == 201, response.text
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    secret = body["client_secret"]
    assert len(secret) >= 32 and body["client_secret_expires_at"] == 0
    assert body["client_id"] == "new-launcher" and body["source"] == "admin"
    assert body["auth_method"] == "client_secret_basic"
    assert "secret_hash" not in body and "scrypt$" not in response.text
    # The stored client holds only the hash, and the secret works at the token endpoint.
    stored = await svc.oauth.clients.get("new-launcher")
    assert stored is not None and stored.config.secret_hash is not None
    assert check_secret(secret, stored.config.secret_hash.get_secret_value())
    issued = await raw_post(
        api, "/oauth/token", data={"grant_type": "client_credentials"},
        headers=_basic("new-launcher", secret),
    )  # fmt: skip
    assert issued.status == 200, issued.text
    claims = svc.tokens.verify(issued.json()["access_token"])
    assert claims["client_id"] == "new-launcher" and claims["aud"] == ["https://new.example.org"]
    [record] = audit_events(svc, "admin.client_created")
    assert record["actor"] == admin_id and record["data"]["client"] == "new-launcher"
    audit_text = Path(svc.settings.audit.path).read_text()
    assert secret not in audit_text and "scrypt$" not in audit_text


async def test_create_with_given_secret_never_echoes_it(svc: Services, api: ContractClient) -> None:
    token, _ = await admin_token(svc)
    secret = "a-secret-chosen-by-the-admin-0123456789"
    document = {
        "client_id": "poster",
        "auth_method": "client_secret_post",
        "client_secret": secret,
        "grant_types": ["client_credentials"],
        "scopes": [],
    }
    response = await create(api, token, document)
    assert response.status == 201, response.text
    assert "client_secret" not in response.json() and secret not in response.text
    issued = await raw_post(
        api,
        "/oauth/token",
        data={"grant_type": "client_credentials", "client_id": "poster", "client_secret": secret},
    )
    assert issued.status == 200, issued.text
    wrong = await raw_post(
        api,
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "poster",
            "client_secret": secret + "x",
        },
    )
    assert wrong.status == 401  # fmt: skip


async def test_list_hides_hashes(svc: Services, api: ContractClient) -> None:
    token, _ = await admin_token(svc)
    created = await create(
        api, token, {"client_id": "listed", "grant_types": ["client_credentials"]}
    )
    assert created.status == 201
    response = await api.get("/v1/admin/clients", headers=bearer(token))
    assert response.status == 200
    clients = {c["client_id"]: c for c in response.json()["clients"]}
    assert {"launcher", "rs", "other", "console", "broker-cli", "listed"} <= set(clients)
    assert clients["listed"]["source"] == "admin" and clients["launcher"]["source"] == "settings"
    assert clients["broker-cli"]["source"] == "builtin"
    assert all("secret_hash" not in c and "client_secret" not in c for c in clients.values())
    assert "scrypt$" not in response.text


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"client_id": "bad id!"}, "client_id"),
        ({"client_id": "pub", "auth_method": "none", "grant_types": ["client_credentials"]},
         "public client"),
        ({"client_id": "code", "grant_types": ["authorization_code"]}, "redirect_uri"),
        ({"client_id": "typo", "grant_type": ["client_credentials"]}, "unknown key"),
        ({"client_id": "short", "client_secret": "too-short"}, "at least 32"),
        ({"client_id": "both", "client_secret": "x" * 40, "secret_hash": "scrypt$1$1$1$a$b"},
         "not both"),
        (["not", "an", "object"], "JSON object"),
    ],
)  # fmt: skip
async def test_invalid_documents_are_refused(
    svc: Services, api: ContractClient, document: Any, problem: str
) -> None:
    token, _ = await admin_token(svc)
    response = await create(api, token, document)
    assert response.status == 400, response.text
    assert response.json()["error"] == "invalid_request"
    assert problem in response.json()["error_description"]
    assert await stored_ids(svc) == set()
    assert audit_events(svc, "admin.client_created") == []


async def test_malformed_bodies_are_refused(svc: Services, api: ContractClient) -> None:
    token, _ = await admin_token(svc)
    for data, ctype in ((b"{not json", "application/json"), (b"\xff\xfe", "application/json"),
                        (b"client_id=x", "application/x-www-form-urlencoded")):  # fmt: skip
        response = await api.post(
            "/v1/admin/clients", data=data, headers={**bearer(token), "Content-Type": ctype}
        )
        assert response.status == 400 and response.json()["error"] == "invalid_request"
    assert await stored_ids(svc) == set()


async def test_duplicates_conflict(svc: Services, api: ContractClient) -> None:
    token, _ = await admin_token(svc)
    document = {"client_id": "twice", "grant_types": ["client_credentials"]}
    assert (await create(api, token, document)).status == 201
    again = await create(api, token, document)
    assert again.status == 409 and "client_secret" not in again.json()
    settings_client = await create(api, token, {**document, "client_id": "launcher"})
    assert settings_client.status == 409
    assert len(audit_events(svc, "admin.client_created")) == 1


async def test_delete(svc: Services, api: ContractClient) -> None:
    token, admin_id = await admin_token(svc)
    created = await create(
        api, token, {"client_id": "doomed", "grant_types": ["client_credentials"]}
    )
    secret = created.json()["client_secret"]
    response = await delete(api, token, "doomed")
    assert response.status == 204 and response.body == b""
    assert await svc.oauth.clients.get("doomed") is None
    refused = await raw_post(
        api, "/oauth/token", data={"grant_type": "client_credentials"},
        headers=_basic("doomed", secret),
    )  # fmt: skip
    assert refused.status == 401 and "access_token" not in refused.json()
    [record] = audit_events(svc, "admin.client_deleted")
    assert record["actor"] == admin_id and record["data"]["client"] == "doomed"
    missing = await delete(api, token, "doomed")
    assert missing.status == 404 and missing.json()["error"] == "not_found"
    from_settings = await delete(api, token, "launcher")
    assert from_settings.status == 409
    assert await svc.oauth.clients.get("launcher") is not None
    assert len(audit_events(svc, "admin.client_deleted")) == 1


def _cli(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", "clients", *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_hash_secret_command() -> None:
    secret = "a secret with spaces and ünïcode  "
    result = _cli("hash-secret", stdin=secret + "\n")
    assert result.returncode == 0, result.stderr
    digest = result.stdout.strip()
    assert digest.startswith("scrypt$") and secret not in result.stdout + result.stderr
    assert check_secret(secret, digest)
    assert not check_secret(secret.strip(), digest)
    assert not check_secret(secret + "\n", digest)
    empty = _cli("hash-secret", stdin="")
    assert empty.returncode == 2 and empty.stdout == ""


def test_new_secret_command() -> None:
    result = _cli("new-secret", stdin="")
    assert result.returncode == 0, result.stderr
    values: dict[str, str] = {}
    for line in result.stdout.splitlines():
        name, _, rest = line.partition(" = ")
        values[name] = rest.split('"')[1]
    assert len(values["client_secret"]) >= 32
    assert check_secret(values["client_secret"], values["secret_hash"])
