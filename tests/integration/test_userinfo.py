"""The OpenID Connect UserInfo endpoint (OIDC Core §5.3) against a broker on real OpenBao:
claims by scope, refusals per RFC 6750 §3.1, and DPoP-bound tokens (RFC 9449 §7) here and at
`/v1/whoami`."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from broker.oauth.bearer import revoke_access_token
from broker.oauth.dpop import jwk_thumbprint
from broker.services import Services
from tests.integration.test_introspect_revoke import (
    api,
    bearer,
    client_token,
    oauth_settings,
    person,
    svc,
    user_token,
)
from tests.peers.broker import ContractClient

__all__ = ["api", "oauth_settings", "svc"]  # fixtures shared with the introspection tests
PUBLIC_URL = "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("scopes", "expected"),
    [
        (["openid"], set()),
        (["openid", "profile"], {"name", "preferred_username"}),
        (["openid", "email"], {"email"}),
        (["openid", "groups"], {"groups"}),
        (["openid", "profile", "email", "groups"],
         {"name", "preferred_username", "email", "groups"}),
    ],
)  # fmt: skip
async def test_claims_follow_the_scopes(
    svc: Services, api: ContractClient, scopes: list[str], expected: set[str]
) -> None:
    erin = person("erin", groups=("physics", "binder-users"))
    issued = await user_token(svc, erin, scopes=scopes)
    token = issued.body["access_token"]
    for method in ("GET", "POST"):
        response = await api.request(method, "/oauth/userinfo", headers=bearer(token))
        assert response.status == 200, response.text
        assert response.headers["Cache-Control"] == "no-store"
        body = response.json()
        assert set(body) == {"sub"} | expected
        assert body["sub"] == erin.id == svc.tokens.verify(token)["sub"]
        if "email" in expected:
            assert body["email"] == "erin@example.edu"
        if "groups" in expected:
            assert body["groups"] == ["physics", "binder-users"]
        if "profile" in scopes:
            assert body["name"] == "Erin" and body["preferred_username"] == "erin"


async def test_userinfo_shows_the_latest_profile(svc: Services, api: ContractClient) -> None:
    issued = await user_token(svc, person("fay", groups=("a",)), scopes=["openid", "groups"])
    await user_token(svc, person("fay", groups=("a", "b")), scopes=["openid"])
    response = await api.get("/oauth/userinfo", headers=bearer(issued.body["access_token"]))
    assert response.json()["groups"] == ["a", "b"]


async def test_a_token_without_openid_is_refused(svc: Services, api: ContractClient) -> None:
    issued = await user_token(svc, person("gus"), scopes=["profile", "email"])
    response = await api.get("/oauth/userinfo", headers=bearer(issued.body["access_token"]))
    assert response.status == 403
    assert response.json()["error"] == "insufficient_scope"
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and 'error="insufficient_scope"' in challenge
    assert 'scope="openid"' in challenge
    assert "gus" not in response.text and "email" not in response.json()


async def test_a_client_credentials_token_is_refused(api: ContractClient) -> None:
    token = (await client_token(api, "launcher"))["access_token"]
    for method in ("GET", "POST"):
        response = await api.request(method, "/oauth/userinfo", headers=bearer(token))
        assert response.status == 403
        assert response.json()["error"] == "insufficient_scope"
        assert "sub" not in response.json()


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer"}, {"Authorization": "Bearer not-a-token"},
     {"Authorization": "Basic dXNlcjpwYXNz"}],
)  # fmt: skip
async def test_missing_or_invalid_tokens_are_challenged(
    api: ContractClient, headers: dict[str, str]
) -> None:
    response = await api.get("/oauth/userinfo", headers=headers)
    assert response.status == 401
    assert response.json()["error"] == "invalid_token"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "sub" not in response.json()


async def test_an_id_token_is_not_an_access_token(svc: Services, api: ContractClient) -> None:
    hal = person("hal")
    issued = await user_token(svc, hal, scopes=["openid", "profile"])
    response = await api.get("/oauth/userinfo", headers=bearer(issued.body["id_token"]))
    assert response.status == 401 and response.json()["error"] == "invalid_token"


def _dpop_key() -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return key, jwk


def _proof(
    key: ec.EllipticCurvePrivateKey, jwk: dict[str, Any], method: str, path: str, token: str
) -> str:
    ath = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=")
    claims = {"jti": secrets.token_urlsafe(12), "htm": method, "htu": PUBLIC_URL + path,
              "iat": int(time.time()), "ath": ath.decode()}  # fmt: skip
    return jwt.encode(claims, key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": jwk})


async def test_dpop_bound_tokens_need_their_proof(svc: Services, api: ContractClient) -> None:
    key, jwk = _dpop_key()
    ivy = person("ivy")
    issued = await user_token(svc, ivy, scopes=["openid", "email"], dpop_jkt=jwk_thumbprint(jwk))
    token = issued.body["access_token"]
    for path in ("/oauth/userinfo", "/v1/whoami"):
        as_bearer = await api.get(path, headers=bearer(token))
        assert as_bearer.status == 401 and as_bearer.json()["error"] == "invalid_token"
        unproved = await api.get(path, headers={"Authorization": f"DPoP {token}"})
        assert unproved.status == 401
        other_key, other_jwk = _dpop_key()
        wrong_key = await api.get(path, headers={
            "Authorization": f"DPoP {token}",
            "DPoP": _proof(other_key, other_jwk, "GET", path, token)})  # fmt: skip
        assert wrong_key.status == 401
        proof = _proof(key, jwk, "GET", path, token)
        good = await api.get(path, headers={"Authorization": f"DPoP {token}", "DPoP": proof})
        assert good.status == 200, good.text
        assert good.json()["sub"] == ivy.id
        replayed = await api.get(path, headers={"Authorization": f"DPoP {token}", "DPoP": proof})
        assert replayed.status == 401


async def test_whoami_refuses_a_revoked_token(svc: Services, api: ContractClient) -> None:
    token = (await user_token(svc, person("jo"), scopes=["openid"])).body["access_token"]
    assert (await api.get("/v1/whoami", headers=bearer(token))).status == 200
    claims = svc.tokens.verify(token)
    await revoke_access_token(svc, claims["jti"], claims["exp"])
    refused = await api.get("/v1/whoami", headers=bearer(token))
    assert refused.status == 401 and refused.json()["error"] == "invalid_token"
