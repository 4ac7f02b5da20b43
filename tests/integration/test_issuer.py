"""The issuer surface against a real OpenBao: discovery, JWKS, and tokens that an
independent implementation (python-jose) verifies with the served JWKS."""

from __future__ import annotations

import pytest
from jose import jwt as jose_jwt

from broker.errors import InvalidRequest
from broker.services import Services
from tests.peers.broker import ContractClient

ISSUER = "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    "path", ["/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"]
)
async def test_discovery_documents(client: ContractClient, path: str) -> None:
    response = await client.get(path)
    assert response.status == 200
    assert response.headers["Cache-Control"] == "public, max-age=3600"
    meta = response.json()
    assert meta["issuer"] == ISSUER
    assert meta["jwks_uri"] == f"{ISSUER}/jwks.json"
    assert meta["id_token_signing_alg_values_supported"] == ["ES256", "RS256"]
    # Every advertised endpoint is served, and nothing weaker than S256 is offered.
    assert meta["token_endpoint"] == f"{ISSUER}/oauth/token"
    assert meta["authorization_endpoint"] == f"{ISSUER}/oauth/authorize"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["response_types_supported"] == ["code"]
    assert "implicit" not in meta["grant_types_supported"]
    assert {"authorization_code", "refresh_token", "client_credentials"} <= set(
        meta["grant_types_supported"]
    )


async def test_jwks_is_cacheable_and_public_only(client: ContractClient) -> None:
    response = await client.get("/jwks.json")
    assert response.status == 200
    assert response.headers["Cache-Control"] == "public, max-age=3600"
    keys = response.json()["keys"]
    assert len(keys) == 1
    assert keys[0]["kty"] == "EC" and keys[0]["alg"] == "ES256" and keys[0]["use"] == "sig"
    assert not {"d", "p", "q"} & set(keys[0])
    again = await client.get("/jwks.json", headers={"If-None-Match": response.headers["ETag"]})
    assert again.status == 304


async def test_access_token_verifies_with_python_jose(
    broker: Services, client: ContractClient
) -> None:
    minted = await broker.tokens.mint(
        subject="u-123",
        audience="https://launcher.example.org",
        client_id="binderhub",
        scope=("openid", "launch:aws"),
        auth_time=1_700_000_000,
        acr="urn:example:mfa",
    )
    jwks = (await client.get("/jwks.json")).json()
    header = jose_jwt.get_unverified_header(minted.token)
    assert header["typ"] == "at+jwt" and header["kid"] == minted.kid
    claims = jose_jwt.decode(
        minted.token,
        jwks,
        algorithms=["ES256"],
        audience="https://launcher.example.org",
        issuer=ISSUER,
    )
    assert claims["sub"] == "u-123"
    assert claims["client_id"] == "binderhub"
    assert claims["scope"] == "openid launch:aws"
    assert claims["jti"] == minted.jti
    assert claims["auth_time"] == 1_700_000_000 and claims["acr"] == "urn:example:mfa"
    assert claims["exp"] - claims["iat"] == 600


async def test_id_token_verifies_with_python_jose(broker: Services, client: ContractClient) -> None:
    minted = await broker.tokens.mint(
        kind="id",
        subject="u-123",
        audience="binderhub",
        client_id="binderhub",
        nonce="n-0S6",
        extra={"email": "a@example.edu"},
    )
    jwks = (await client.get("/jwks.json")).json()
    claims = jose_jwt.decode(
        minted.token, jwks, algorithms=["ES256"], audience="binderhub", issuer=ISSUER
    )
    assert claims["nonce"] == "n-0S6" and claims["azp"] == "binderhub"
    assert claims["email"] == "a@example.edu"
    assert jose_jwt.get_unverified_header(minted.token)["typ"] == "JWT"
    assert broker.tokens.verify(minted.token, kind="id", audience="binderhub")["sub"] == "u-123"


async def test_ttl_is_clipped_to_the_maximum(broker: Services) -> None:
    minted = await broker.tokens.mint(
        subject="u-1", audience="a", client_id="c", ttl=10 * broker.tokens.max_ttl
    )
    assert minted.expires_at - minted.issued_at == broker.tokens.max_ttl


async def test_extra_claims_cannot_replace_registered_ones(broker: Services) -> None:
    with pytest.raises(InvalidRequest):
        await broker.tokens.mint(subject="u-1", audience="a", client_id="c", extra={"sub": "x"})


async def test_whoami_accepts_a_broker_token(broker: Services, client: ContractClient) -> None:
    minted = await broker.tokens.mint(subject="u-9", audience="a", client_id="c")
    response = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {minted.token}"})
    assert response.status == 200
    assert response.json()["sub"] == "u-9"
    denied = await client.get("/v1/whoami", headers={"Authorization": "Bearer nope"})
    assert denied.status == 401
    assert denied.json()["error"] == "invalid_token"
    assert denied.headers["Cache-Control"] == "no-store"
