"""OpenStackBackend against a real Keystone (tests/peers/keystone.py).

The adapter signs the user in through Keystone federation with a broker-signed JWT, creates
an application credential, and revokes it with its own service account. Each credential is
checked from Keystone's side (GET as admin) and by authenticating with it through
keystoneauth1, run in the Keystone venv.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import pytest_asyncio
import structlog
import yaml
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric import ec

from adapters.base import Grant, Principal, Revocable
from adapters.downstream.openstack import OpenStackBackend
from adapters.errors import AccessDenied, InvalidRequest, UpstreamFailed
from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.credentials import clean_up_expired
from broker.devvault import DevVault
from broker.oauth.clients import hash_secret
from broker.oauth.issuance import remember_principal
from broker.services import Services
from policies.decision import Limits
from tests.peers.broker import ContractClient, audit_events, make_settings, start_broker
from tests.peers.keystone import (
    COURSE,
    IDP,
    ISSUER,
    OTHER_COURSE,
    READER,
    STRANGER,
    STUDENT,
    Keystone,
)

RULES = [{"service": "compute", "method": "GET", "path": "/v2.1/servers"}]


class EsSigner:
    """An `adapters.base.TokenSigner` with its own ES256 key (the broker's KeyRingSigner does
    the same over the key ring; the API-level tests use that one)."""

    def __init__(self, issuer: str = ISSUER) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.kid = secrets.token_hex(8)
        self._issuer = issuer
        self.minted: list[str] = []

    @property
    def issuer(self) -> str:
        return self._issuer

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self._key.public_key()))
        return {"keys": [{**jwk, "kid": self.kid, "alg": "ES256", "use": "sig"}]}

    async def sign(self, claims: Mapping[str, Any], *, audience: str, ttl: int) -> str:
        now = int(time.time())
        body = {**claims, "iss": self._issuer, "aud": audience, "iat": now, "exp": now + ttl}
        token = jwt.encode(body, self._key, algorithm="ES256", headers={"kid": self.kid})
        self.minted.append(token)
        return token


@pytest.fixture(scope="module")
def signer(keystone: Keystone) -> EsSigner:
    trusted = EsSigner()
    keystone.trust_jwks(trusted.jwks())
    return trusted


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def make_backend(
    keystone: Keystone, http: aiohttp.ClientSession, signer: EsSigner | None, **overrides: Any
) -> OpenStackBackend:
    options: dict[str, Any] = {
        "id": "jetstream2",
        "auth_url": keystone.auth_url,
        "region": "RegionOne",
        "interface": "public",
        "service_user": keystone.service_user,
        "service_password": keystone.service_password,
        "service_user_domain": "Default",
        "service_project": keystone.service_project,
        "service_project_domain": "Default",
        "user_domain": "Default",
        "user_name": "email",
        "projects": {"ds100": keystone.ids[COURSE], "cs61": keystone.ids[OTHER_COURSE]},
        "default_project": keystone.ids[COURSE],
        "roles": ["member"],
        "access_rules": RULES,
        "max_ttl": 3600,
        "http": http,
        "signer": signer,
        "identity_provider": IDP,
    }
    options.update(overrides)
    return OpenStackBackend(**options)


def grant_for(email: str, *, project: str | None = "ds100", ttl: int = 1800) -> Grant:
    principal = Principal(
        idp="campus", issuer="https://idp.campus.example.edu", subject=email, email=email
    )
    return Grant(
        principal=principal,
        action="launch",
        resource="jetstream2",
        limits=Limits(max_ttl=3600),
        policy_ids=("students-launch-small",),
        ttl=ttl,
        project=project,
        client="binderhub",
    )


def app_credentials(keystone: Keystone, user: str) -> list[dict[str, Any]]:
    listing = keystone.admin("GET", f"/v3/users/{keystone.ids[user]}/application_credentials")
    return list(listing["application_credentials"])


async def test_issue_authenticate_revoke(
    keystone: Keystone, http: aiohttp.ClientSession, signer: EsSigner
) -> None:
    backend = make_backend(keystone, http, signer)
    assert isinstance(backend, Revocable)
    before = datetime.now(UTC)
    cred = await backend.issue(grant_for(STUDENT))

    assert cred.kind == "openstack" and cred.backend == "jetstream2"
    secret = cred.secret["application_credential_secret"]
    cred_id = cred.secret["application_credential_id"]
    assert secret not in repr(cred)
    assert cred.handle == {
        "user_id": keystone.ids[STUDENT],
        "application_credential_id": cred_id,
    }
    assert 1790 <= (cred.expires_at - before).total_seconds() <= 1800
    env = cred.secret["env"]
    assert env["OS_AUTH_TYPE"] == "v3applicationcredential"
    assert env["OS_APPLICATION_CREDENTIAL_SECRET"] == secret
    assert env["OS_AUTH_URL"] == keystone.auth_url
    assert env["OS_REGION_NAME"] == "RegionOne" and env["OS_IDENTITY_API_VERSION"] == "3"
    cloud = yaml.safe_load(cred.secret["clouds_yaml"])["clouds"]["jetstream2"]
    assert cloud["auth_type"] == "v3applicationcredential"
    assert cloud["region_name"] == "RegionOne" and cloud["interface"] == "public"

    # Authenticate with what clouds.yaml says, as a user's openstack client would.
    ok, project = keystone.authenticate(
        cloud["auth"]["application_credential_id"], cloud["auth"]["application_credential_secret"]
    )
    assert ok and project == keystone.ids[COURSE]

    status, body = keystone.app_credential(keystone.ids[STUDENT], cred_id)
    assert status == 200
    seen = body["application_credential"]
    assert seen["unrestricted"] is False
    assert seen["project_id"] == keystone.ids[COURSE]
    assert [{k: r[k] for k in ("service", "method", "path")} for r in seen["access_rules"]] == RULES
    assert datetime.fromisoformat(seen["expires_at"]).replace(tzinfo=UTC) == cred.expires_at
    assert cred.details["access_rules"] == RULES
    assert cred.details["project_id"] == keystone.ids[COURSE]
    assert cred.details["name"] == seen["name"]

    await backend.revoke(cred.lease_id, cred.handle)
    ok, error = keystone.authenticate(cred_id, secret)
    assert not ok and error in ("Unauthorized", "NotFound")
    assert keystone.app_credential(keystone.ids[STUDENT], cred_id)[0] == 404
    await backend.revoke(cred.lease_id, cred.handle)  # already gone: still a success


async def test_roles_are_the_configured_subset_the_user_holds(
    keystone: Keystone, http: aiohttp.ClientSession, signer: EsSigner
) -> None:
    # The student holds member and reader; the backend hands out reader (and would hand out
    # admin, which the student does not hold).
    backend = make_backend(keystone, http, signer, roles=["reader", "admin"])
    cred = await backend.issue(grant_for(STUDENT))
    try:
        status, body = keystone.app_credential(
            keystone.ids[STUDENT], cred.handle["application_credential_id"]
        )
        assert status == 200
        assert {r["name"] for r in body["application_credential"]["roles"]} == {"reader"}
        assert cred.details["roles"] == ["reader"]
    finally:
        await backend.revoke(cred.lease_id, cred.handle)


async def test_unknown_project_is_an_invalid_request(
    keystone: Keystone, http: aiohttp.ClientSession, signer: EsSigner
) -> None:
    backend = make_backend(keystone, http, signer)
    before, minted = app_credentials(keystone, STUDENT), len(signer.minted)
    with pytest.raises(InvalidRequest, match="unknown project"):
        await backend.issue(grant_for(STUDENT, project="physics101"))
    assert len(signer.minted) == minted  # refused before signing the user in
    assert app_credentials(keystone, STUDENT) == before


@pytest.mark.parametrize(
    ("user", "project"),
    [
        pytest.param(READER, "ds100", id="only-reader-role-but-member-configured"),
        pytest.param(STRANGER, "ds100", id="no-role-on-project"),
        pytest.param(STUDENT, "cs61", id="student-not-in-that-course"),
        pytest.param("nobody@campus.example.edu", "ds100", id="no-keystone-user"),
    ],
)
async def test_user_without_the_roles_is_denied(
    keystone: Keystone, http: aiohttp.ClientSession, signer: EsSigner, user: str, project: str
) -> None:
    backend = make_backend(keystone, http, signer)
    before = app_credentials(keystone, user) if user in keystone.ids else []
    with pytest.raises(AccessDenied) as caught:
        await backend.issue(grant_for(user, project=project))
    assert "OpenStack" in caught.value.description
    if user in keystone.ids:
        assert app_credentials(keystone, user) == before


async def test_expired_credential_is_cleaned_up_by_revoke(
    keystone: Keystone, http: aiohttp.ClientSession, signer: EsSigner
) -> None:
    backend = make_backend(keystone, http, signer, max_ttl=2)
    cred = await backend.issue(grant_for(STUDENT))
    cred_id = cred.handle["application_credential_id"]
    while datetime.now(UTC) <= cred.expires_at:
        await asyncio.sleep(0.5)
    ok, _ = keystone.authenticate(cred_id, cred.secret["application_credential_secret"])
    assert not ok  # Keystone itself refuses it now, yet keeps the record ...
    assert keystone.app_credential(keystone.ids[STUDENT], cred_id)[0] == 200
    await backend.revoke(cred.lease_id, cred.handle)  # ... which the reaper's revoke removes
    assert keystone.app_credential(keystone.ids[STUDENT], cred_id)[0] == 404


def _assert_no_secret(error: Exception, *secrets_: str) -> None:
    assert isinstance(error, UpstreamFailed)
    for text in (str(error), error.description, error.log_detail):
        for secret in secrets_:
            assert secret not in text


async def test_unreachable_keystone_is_upstream_failed_without_secrets(
    http: aiohttp.ClientSession, keystone: Keystone, signer: EsSigner
) -> None:
    closed = _closed_port()
    backend = make_backend(keystone, http, signer, auth_url=f"http://127.0.0.1:{closed}/v3")
    signer.minted.clear()
    with pytest.raises(UpstreamFailed) as issued:
        await backend.issue(grant_for(STUDENT))
    _assert_no_secret(issued.value, *signer.minted)
    assert "unreachable" in issued.value.description
    with pytest.raises(UpstreamFailed) as revoked:
        await backend.revoke("lease-x", {"user_id": "u", "application_credential_id": "c"})
    _assert_no_secret(revoked.value, keystone.service_password)


async def test_untrusted_broker_signature_is_upstream_failed(
    keystone: Keystone, http: aiohttp.ClientSession
) -> None:
    stranger_key = EsSigner()  # same issuer, key never published to Keystone's front
    backend = make_backend(keystone, http, stranger_key)
    before = app_credentials(keystone, STUDENT)
    with pytest.raises(UpstreamFailed) as caught:
        await backend.issue(grant_for(STUDENT))
    _assert_no_secret(caught.value, *stranger_key.minted)
    assert "did not accept the broker" in caught.value.description
    assert app_credentials(keystone, STUDENT) == before


async def test_wrong_service_password_fails_revocation_without_leaking_it(
    keystone: Keystone, http: aiohttp.ClientSession, signer: EsSigner
) -> None:
    good = make_backend(keystone, http, signer)
    cred = await good.issue(grant_for(STUDENT))
    wrong = "not-" + keystone.service_password
    bad = make_backend(keystone, http, signer, service_password=wrong)
    with pytest.raises(UpstreamFailed) as caught:
        await bad.revoke(cred.lease_id, cred.handle)
    _assert_no_secret(caught.value, wrong, keystone.service_password)
    cred_id = cred.handle["application_credential_id"]
    assert keystone.app_credential(keystone.ids[STUDENT], cred_id)[0] == 200  # untouched
    await good.revoke(cred.lease_id, cred.handle)
    assert keystone.app_credential(keystone.ids[STUDENT], cred_id)[0] == 404


# --- through the API: POST /v1/credentials ------------------------------------------------

CLIENT_SECRET = "launcher-secret-openstack-0123456789"
BACKENDS = ("jetstream2", "jetstream2-short", "jetstream2-down")
STUDENT_PRINCIPAL = Principal(
    idp="dev", issuer="urn:test", subject="student-1", email=STUDENT, display_name="Student"
)


@pytest_asyncio.fixture
async def api(
    keystone: Keystone, tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[tuple[Services, ContractClient]]:
    """A broker with an openstack backend on the session's Keystone and one on a closed port;
    Keystone's front trusts the broker's JWKS."""
    password_file = tmp_path / "keystone-service-password"
    password_file.write_text(keystone.service_password)
    common = {
        "type": "openstack",
        "region": "RegionOne",
        "service_user": keystone.service_user,
        "service_password": {"file": str(password_file)},
        "service_project": keystone.service_project,
        "user_name": "email",
        "projects": {"ds100": keystone.ids[COURSE]},
        "roles": ["member"],
        "access_rules": RULES,
        "max_ttl": 3600,
    }
    settings = make_settings(
        tmp_path, openbao.address, vault_approle, mode="production", upstreams=[],
        backends=[
            {**common, "id": "jetstream2", "auth_url": keystone.auth_url},
            {**common, "id": "jetstream2-short", "auth_url": keystone.auth_url, "max_ttl": 2},
            {**common, "id": "jetstream2-down",
             "auth_url": f"http://127.0.0.1:{_closed_port()}/v3"},
        ],
        clients=[{
            "client_id": "launcher", "name": "Launcher", "secret_hash": hash_secret(CLIENT_SECRET),
            "grant_types": ["urn:ietf:params:oauth:grant-type:token-exchange"],
            "scopes": [f"launch:{b}" for b in BACKENDS], "first_party": True,
        }],
    )  # fmt: skip
    svc = await start_broker(settings, dev_mode=False)
    try:
        assert svc.settings.server.public_url == ISSUER  # the issuer Keystone's IdP names
        keystone.trust_jwks(json.loads(svc.keyring.jwks()))
        await remember_principal(svc, STUDENT_PRINCIPAL)
        async with TestClient(TestServer(app_with_services(svc))) as raw:
            yield svc, ContractClient(raw)
    finally:
        await svc.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_api_issues_and_revokes_without_logging_or_auditing_the_secret(
    keystone: Keystone,
    api: tuple[Services, ContractClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    svc, client = api
    minted = await svc.tokens.mint(
        subject=STUDENT_PRINCIPAL.id, audience=svc.settings.server.public_url,
        client_id="launcher", scope=tuple(f"launch:{b}" for b in BACKENDS),
    )  # fmt: skip
    bearer = {"Authorization": f"Bearer {minted.token}"}
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events:
        issued = await client.post(
            "/v1/credentials",
            json={"backend": "jetstream2", "duration": 1200, "project": "ds100"},
            headers=bearer,
        )
        failed = await client.post(
            "/v1/credentials",
            json={"backend": "jetstream2-down", "duration": 1200, "project": "ds100"},
            headers=bearer,
        )
        unknown = await client.post(
            "/v1/credentials",
            json={"backend": "jetstream2", "duration": 1200, "project": "physics"},
            headers=bearer,
        )
        assert issued.status == 201, issued.text
        body = issued.json()
        secret = body["credential"]["application_credential_secret"]
        cred_id = body["credential"]["application_credential_id"]
        ok, project = keystone.authenticate(cred_id, secret)
        assert ok and project == keystone.ids[COURSE]
        assert body["kind"] == "openstack" and body["details"]["access_rules"] == RULES
        assert "member" in body["details"]["roles"]

        revoked = await client.request(
            "DELETE", f"/v1/credentials/{body['lease_id']}", headers=bearer
        )
        assert revoked.status in (200, 204), revoked.text
        ok, _ = keystone.authenticate(cred_id, secret)
        assert not ok
        assert keystone.app_credential(keystone.ids[STUDENT], cred_id)[0] == 404

    assert failed.status == 503 and failed.json()["error"] == "temporarily_unavailable"
    assert unknown.status == 400 and unknown.json()["error"] == "invalid_request"
    audit = audit_events(svc)
    [record] = [r for r in audit if r["event"] == "credential.issued"]
    assert record["data"]["lease"] == body["lease_id"]
    assert record["data"]["backend"] == "jetstream2"
    [revocation] = [r for r in audit if r["event"] == "credential.revoked"]
    assert revocation["data"]["lease"] == body["lease_id"]
    assert revocation["data"]["upstream_revoked"] is True
    logs = "\n".join(
        [json.dumps(e, default=repr, sort_keys=True) for e in events]
        + [r.getMessage() for r in caplog.records]
    )
    audit_text = Path(svc.settings.audit.path).read_text()
    assert events and audit_text  # something was logged and audited
    for planted in (secret, keystone.service_password, minted.token):
        assert planted not in logs
        assert planted not in audit_text
        assert planted not in failed.text and planted not in unknown.text


async def test_api_reaper_deletes_expired_application_credentials(
    keystone: Keystone, api: tuple[Services, ContractClient]
) -> None:
    svc, client = api
    minted = await svc.tokens.mint(
        subject=STUDENT_PRINCIPAL.id, audience=svc.settings.server.public_url,
        client_id="launcher", scope=tuple(f"launch:{b}" for b in BACKENDS),
    )  # fmt: skip
    issued = await client.post(
        "/v1/credentials",
        json={"backend": "jetstream2-short", "duration": 600, "project": "ds100"},
        headers={"Authorization": f"Bearer {minted.token}"},
    )
    assert issued.status == 201, issued.text
    cred_id = issued.json()["credential"]["application_credential_id"]
    expires_at = datetime.fromisoformat(issued.json()["expires_at"].replace("Z", "+00:00"))
    assert keystone.app_credential(keystone.ids[STUDENT], cred_id)[0] == 200
    while datetime.now(UTC) <= expires_at:
        await asyncio.sleep(0.5)
    assert await clean_up_expired(svc) == 1
    assert keystone.app_credential(keystone.ids[STUDENT], cred_id)[0] == 404
    assert audit_events(svc, "credential.cleaned_up")
