"""Attacks on the token endpoint and on DPoP-bound tokens (RFC 9449), each asserting the
rejection and that nothing was issued."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric import ec

from adapters.base import Principal
from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault
from broker.oauth.clients import hash_secret
from broker.oauth.issuance import TokenRequest, issue, remember_principal
from broker.services import Services
from tests.peers.broker import ContractClient, audit_events, make_settings, start_broker

SECRET_A, SECRET_B = "secret-a-0123456789", "secret-b-0123456789"
ISSUER = "http://127.0.0.1:8080"
TOKEN_URL = f"{ISSUER}/oauth/token"
WHOAMI_URL = f"{ISSUER}/v1/whoami"


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


class Holder:
    """A DPoP key holder: makes proofs the way a client library would."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))

    def proof(self, htm: str, htu: str, *, token: str | None = None, **overrides: Any) -> str:
        claims: dict[str, Any] = {
            "jti": secrets.token_urlsafe(12),
            "htm": htm,
            "htu": htu,
            "iat": int(time.time()),
        }
        if token is not None:
            digest = hashlib.sha256(token.encode()).digest()
            claims["ath"] = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        claims.update(overrides)
        headers = {"typ": "dpop+jwt", "jwk": self.jwk}
        return jwt.encode(claims, self.key, algorithm="ES256", headers=headers)


@pytest_asyncio.fixture
async def server(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[tuple[Services, ContractClient]]:
    clients = [
        {
            "client_id": "a",
            "secret_hash": hash_secret(SECRET_A),
            "audiences": ["https://a.example"],
            "grant_types": ["client_credentials", "refresh_token"],
            "scopes": ["openid", "launch:aws"],
        },
        {
            "client_id": "b",
            "secret_hash": hash_secret(SECRET_B),
            "grant_types": ["client_credentials", "refresh_token"],
        },
        {
            "client_id": "bound",
            "secret_hash": hash_secret(SECRET_A),
            "require_dpop": True,
            "grant_types": ["client_credentials"],
        },
    ]
    settings = make_settings(tmp_path, openbao.address, vault_approle, clients=clients)
    services = await start_broker(settings)
    async with TestClient(TestServer(app_with_services(services))) as raw:
        yield services, ContractClient(raw)
    await services.close()


async def test_dpop_binds_the_token_and_the_resource_demands_the_proof(
    server: tuple[Services, ContractClient],
) -> None:
    svc, client = server
    holder = Holder()
    token = await client.post(
        "/oauth/token",
        headers={**basic("a", SECRET_A), "DPoP": holder.proof("POST", TOKEN_URL)},
        data={"grant_type": "client_credentials"},
    )
    assert token.status == 200, token.text
    body = token.json()
    assert body["token_type"] == "DPoP"
    claims = svc.tokens.verify(body["access_token"])
    assert claims["cnf"]["jkt"]
    access = body["access_token"]
    ok = await client.get(
        "/v1/whoami",
        headers={
            "Authorization": f"DPoP {access}",
            "DPoP": holder.proof("GET", WHOAMI_URL, token=access),
        },
    )
    assert ok.status == 200, ok.text
    as_bearer = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {access}"})
    assert as_bearer.status == 401  # a bound token is useless without the key


@pytest.mark.parametrize(
    "attack",
    [
        "replayed",
        "wrong-htu",
        "wrong-htm",
        "stale-iat",
        "future-iat",
        "no-ath",
        "wrong-ath",
        "other-key",
        "no-proof",
        "hmac-proof",
        "private-jwk",
        "bad-typ",
    ],
)
async def test_resource_refuses_bad_dpop_proofs(
    server: tuple[Services, ContractClient], attack: str
) -> None:
    _svc, client = server
    holder = Holder()
    token = await client.post(
        "/oauth/token",
        headers={**basic("a", SECRET_A), "DPoP": holder.proof("POST", TOKEN_URL)},
        data={"grant_type": "client_credentials"},
    )
    access = token.json()["access_token"]
    proof = holder.proof("GET", WHOAMI_URL, token=access)
    if attack == "replayed":
        first = await client.get(
            "/v1/whoami", headers={"Authorization": f"DPoP {access}", "DPoP": proof}
        )
        assert first.status == 200
    elif attack == "wrong-htu":
        proof = holder.proof("GET", f"{ISSUER}/v1/other", token=access)
    elif attack == "wrong-htm":
        proof = holder.proof("POST", WHOAMI_URL, token=access)
    elif attack == "stale-iat":
        proof = holder.proof("GET", WHOAMI_URL, token=access, iat=int(time.time()) - 3600)
    elif attack == "future-iat":
        proof = holder.proof("GET", WHOAMI_URL, token=access, iat=int(time.time()) + 3600)
    elif attack == "no-ath":
        proof = holder.proof("GET", WHOAMI_URL)
    elif attack == "wrong-ath":
        proof = holder.proof("GET", WHOAMI_URL, token=access + "x")
    elif attack == "other-key":
        proof = Holder().proof("GET", WHOAMI_URL, token=access)
    elif attack == "hmac-proof":
        proof = jwt.encode(
            {"jti": "j", "htm": "GET", "htu": WHOAMI_URL, "iat": int(time.time())},
            "k" * 32,
            algorithm="HS256",
            headers={"typ": "dpop+jwt", "jwk": holder.jwk},
        )
    elif attack == "private-jwk":
        private = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(holder.key))
        proof = jwt.encode(
            {"jti": "j2", "htm": "GET", "htu": WHOAMI_URL, "iat": int(time.time())},
            holder.key,
            algorithm="ES256",
            headers={"typ": "dpop+jwt", "jwk": private},
        )
    elif attack == "bad-typ":
        proof = jwt.encode(
            {"jti": "j3", "htm": "GET", "htu": WHOAMI_URL, "iat": int(time.time())},
            holder.key,
            algorithm="ES256",
            headers={"typ": "JWT", "jwk": holder.jwk},
        )
    headers = {"Authorization": f"DPoP {access}"}
    if attack != "no-proof":
        headers["DPoP"] = proof
    response = await client.get("/v1/whoami", headers=headers)
    assert response.status == 401
    assert response.json()["error"] in ("invalid_dpop_proof", "invalid_token")
    assert "DPoP" in response.headers.get("WWW-Authenticate", "DPoP")
    assert access not in response.text


@pytest.mark.parametrize("attack", ["replayed", "wrong-htu", "stale-iat", "missing-required"])
async def test_token_endpoint_refuses_bad_dpop_proofs_and_issues_nothing(
    server: tuple[Services, ContractClient], attack: str
) -> None:
    svc, client = server
    holder = Holder()
    proof = holder.proof("POST", TOKEN_URL)
    client_id = "a"
    if attack == "replayed":
        first = await client.post(
            "/oauth/token",
            headers={**basic("a", SECRET_A), "DPoP": proof},
            data={"grant_type": "client_credentials"},
        )
        assert first.status == 200
    elif attack == "wrong-htu":
        proof = holder.proof("POST", f"{ISSUER}/oauth/other")
    elif attack == "stale-iat":
        proof = holder.proof("POST", TOKEN_URL, iat=int(time.time()) - 3600)
    before = len(audit_events(svc, "token.issued"))
    headers = {**basic(client_id, SECRET_A), "DPoP": proof}
    if attack == "missing-required":
        headers = basic("bound", SECRET_A)
    response = await client.post(
        "/oauth/token", headers=headers, data={"grant_type": "client_credentials"}
    )
    assert response.status == 400
    assert response.json()["error"] == "invalid_dpop_proof"
    assert len(audit_events(svc, "token.issued")) == before


async def test_refresh_token_of_client_a_is_useless_to_client_b(
    server: tuple[Services, ContractClient],
) -> None:
    svc, client = server
    ada = Principal(idp="dev", issuer="urn:test", subject="ada", auth_time=int(time.time()))
    await remember_principal(svc, ada)
    a = await svc.oauth.clients.get("a")
    assert a is not None
    issued = await issue(
        svc,
        TokenRequest(
            grant_type="refresh_token",
            client=a,
            principal=ada,
            scopes=["openid"],
            audience=["https://a.example"],
            refresh=True,
        ),
    )
    refresh = issued.body["refresh_token"]
    before = len(audit_events(svc, "token.issued"))
    stolen = await client.post(
        "/oauth/token",
        headers=basic("b", SECRET_B),
        data={"grant_type": "refresh_token", "refresh_token": refresh},
    )
    assert stolen.status == 400 and stolen.json()["error"] == "invalid_grant"
    assert len(audit_events(svc, "token.issued")) == before
    # The failed theft did not burn the token for its rightful owner.
    rightful = await client.post(
        "/oauth/token",
        headers=basic("a", SECRET_A),
        data={"grant_type": "refresh_token", "refresh_token": refresh},
    )
    assert rightful.status == 200


@pytest.mark.parametrize(
    ("body", "headers", "status", "error"),
    [
        pytest.param(
            b"grant_type=client_credentials&grant_type=client_credentials",
            {"Content-Type": "application/x-www-form-urlencoded"},
            400,
            "invalid_request",
            id="duplicate-parameter",
        ),
        pytest.param(
            b'{"grant_type": "client_credentials"}',
            {"Content-Type": "application/json"},
            400,
            "invalid_request",
            id="json-body",
        ),
        pytest.param(
            b"grant_type=%ff%fe",
            {"Content-Type": "application/x-www-form-urlencoded"},
            400,
            "invalid_request",
            id="not-utf8",
        ),
        pytest.param(
            b"grant_type=client_credentials&x=" + b"a" * (1024 * 1024),
            {"Content-Type": "application/x-www-form-urlencoded"},
            413,
            "invalid_request",
            id="oversized",
        ),
        pytest.param(
            b"",
            {"Content-Type": "application/x-www-form-urlencoded"},
            400,
            "invalid_request",
            id="empty",
        ),
    ],
)
async def test_malformed_token_requests(
    server: tuple[Services, ContractClient],
    body: bytes,
    headers: dict[str, str],
    status: int,
    error: str,
) -> None:
    svc, client = server
    before = len(audit_events(svc, "token.issued"))
    response = await client.post(
        "/oauth/token", data=body, headers={**basic("a", SECRET_A), **headers}
    )
    assert response.status == status
    assert response.json()["error"] == error
    assert response.headers["Cache-Control"] == "no-store"
    assert len(audit_events(svc, "token.issued")) == before


@pytest.mark.parametrize(
    ("headers", "form"),
    [
        pytest.param(basic("a", "wrong"), {}, id="wrong-secret"),
        pytest.param(basic("nobody", SECRET_A), {}, id="unknown-client"),
        pytest.param({}, {"client_id": "a", "client_secret": SECRET_A}, id="wrong-method-post"),
        pytest.param(basic("a", SECRET_A), {"client_secret": SECRET_A}, id="two-methods"),
        pytest.param({"Authorization": "Basic !!!"}, {}, id="malformed-basic"),
        pytest.param({}, {"client_id": "a"}, id="confidential-without-secret"),
    ],
)
async def test_client_authentication_failures_issue_nothing(
    server: tuple[Services, ContractClient], headers: dict[str, str], form: dict[str, str]
) -> None:
    svc, client = server
    before = len(audit_events(svc, "token.issued"))
    response = await client.post(
        "/oauth/token", headers=headers, data={"grant_type": "client_credentials", **form}
    )
    assert response.status in (400, 401)
    assert response.json()["error"] in ("invalid_client", "invalid_request")
    if "Authorization" in headers and response.status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert len(audit_events(svc, "token.issued")) == before


async def test_dpop_nonce_is_demanded_when_configured(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> None:
    clients = [
        {
            "client_id": "a",
            "secret_hash": hash_secret(SECRET_A),
            "grant_types": ["client_credentials"],
        }
    ]
    settings = make_settings(
        tmp_path, openbao.address, vault_approle, clients=clients,
        oauth={"dpop_require_nonce": True},
    )  # fmt: skip
    services = await start_broker(settings)
    try:
        async with TestClient(TestServer(app_with_services(services))) as raw:
            client = ContractClient(raw)
            holder = Holder()
            headers = basic("a", SECRET_A)
            first = await client.post(
                "/oauth/token",
                headers={**headers, "DPoP": holder.proof("POST", TOKEN_URL)},
                data={"grant_type": "client_credentials"},
            )
            assert first.status == 400 and first.json()["error"] == "use_dpop_nonce"
            nonce = first.headers["DPoP-Nonce"]
            assert len(audit_events(services, "token.issued")) == 0
            forged = await client.post(
                "/oauth/token",
                headers={**headers, "DPoP": holder.proof("POST", TOKEN_URL, nonce="made-up")},
                data={"grant_type": "client_credentials"},
            )
            assert forged.status == 400 and forged.json()["error"] == "use_dpop_nonce"
            second = await client.post(
                "/oauth/token",
                headers={**headers, "DPoP": holder.proof("POST", TOKEN_URL, nonce=nonce)},
                data={"grant_type": "client_credentials"},
            )
            assert second.status == 200, second.text
            assert second.json()["token_type"] == "DPoP"
            assert len(audit_events(services, "token.issued")) == 1
    finally:
        await services.close()
