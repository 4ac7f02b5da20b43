"""Forged and misused broker tokens: each is refused by `TokenService.verify` with
InvalidToken, and by `/v1/whoami` with a 401 `invalid_token` that never echoes the token.

The forgeries are built by hand (or with PyJWT and keys the attacker could hold) against the
broker's real key ring in OpenBao; only the control tokens are signed with the broker's key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.errors import InvalidToken
from broker.keyring import SigningKey
from broker.services import Services
from tests.peers.broker import ContractClient

AUDIENCE = "https://launcher.example.org"
OTHER_AUDIENCE = "https://other-launcher.example.org"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64json(header)}.{b64json(claims)}.{b64(signature)}"


def hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


@dataclass
class Ring:
    """What an attack needs: the broker's current key, its issuer, and genuine tokens."""

    key: SigningKey
    issuer: str
    skew: int
    access: str  # a genuine access token for AUDIENCE
    id_token: str  # a genuine ID token for AUDIENCE

    def claims(self, **changes: Any) -> dict[str, Any]:
        """Access-token claims that would verify, with `changes` (None removes a claim)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer, "sub": "u-alice", "aud": AUDIENCE, "iat": now,
            "exp": now + 600, "jti": "forged-jti", "client_id": "binderhub", "scope": "openid",
            "auth_time": now,
        }  # fmt: skip
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def header(self, **changes: Any) -> dict[str, Any]:
        header: dict[str, Any] = {"alg": self.key.alg, "typ": "at+jwt", "kid": self.key.kid}
        header.update(changes)
        return {k: v for k, v in header.items() if v is not None}

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        """Signed with the broker's own private key (only for claims-level attacks)."""
        assert self.key.private_key is not None, "tests run with signing = 'local'"
        fields = self.header(**header)
        alg = fields.pop("alg")
        return jwt.encode(claims, self.key.private_key, algorithm=alg, headers=fields)

    @property
    def public_pem(self) -> bytes:
        return self.key.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest_asyncio.fixture
async def ring(broker: Services) -> Ring:
    access = await broker.tokens.mint(
        subject="u-alice", audience=AUDIENCE, client_id="binderhub", scope=("openid",)
    )
    id_token = await broker.tokens.mint(
        subject="u-alice", audience=AUDIENCE, client_id="binderhub", kind="id", nonce="n-1"
    )
    return Ring(
        key=broker.keyring.signer(),
        issuer=broker.tokens.issuer,
        skew=broker.settings.tokens.clock_skew,
        access=access.token,
        id_token=id_token.token,
    )


def _other_ec_key_with_broker_kid(r: Ring) -> str:
    attacker = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(r.claims(), attacker, algorithm="ES256", headers=r.header(alg=None))


def _unknown_kid(r: Ring) -> str:
    attacker = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(
        r.claims(), attacker, algorithm="ES256", headers=r.header(alg=None, kid="attacker-kid")
    )


def _embedded_jwk(r: Ring) -> str:
    attacker = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(attacker.public_key()))
    return jwt.encode(r.claims(), attacker, algorithm="ES256", headers=r.header(alg=None, jwk=jwk))


def _rs256_on_es256_kid(r: Ring) -> str:
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(r.claims(), attacker, algorithm="RS256", headers=r.header(alg=None))


def _tampered_payload(r: Ring) -> str:
    header, payload, signature = r.access.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "u-admin"
    claims["scope"] = "openid admin"
    return f"{header}.{b64json(claims)}.{signature}"


def _retyped_id_token(r: Ring) -> str:
    """An ID token whose header is edited to claim `at+jwt`, signature kept."""
    header, payload, signature = r.id_token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    fields["typ"] = "at+jwt"
    return f"{b64json(fields)}.{payload}.{signature}"


def _swapped_signature(r: Ring) -> str:
    """The access token's header and payload with the ID token's (valid) signature."""
    header, payload, _ = r.access.split(".")
    return f"{header}.{payload}.{r.id_token.split('.')[2]}"


def _zero_signature(r: Ring) -> str:
    """CVE-2022-21449 ("psychic signatures"): r = s = 0."""
    return unsigned(r.header(), r.claims(), bytes(64))


Forge = Callable[[Ring], str]
# (how to forge, the kind verify is asked for, the audience it requires)
FORGERIES: list[Any] = [
    pytest.param(lambda r: unsigned(r.header(alg="none"), r.claims()), "access", None,
                 id="alg-none"),
    pytest.param(lambda r: unsigned(r.header(alg="None"), r.claims()), "access", None,
                 id="alg-None-capitalised"),
    pytest.param(lambda r: unsigned(r.header(alg="none", kid=None), r.claims()), "access", None,
                 id="alg-none-without-kid"),
    pytest.param(lambda r: hs256(r.header(alg="HS256"), r.claims(), r.public_pem), "access",
                 None, id="hs256-keyed-with-public-pem"),
    pytest.param(lambda r: hs256(r.header(alg="HS256"), r.claims(),
                                 json.dumps(dict(r.key.jwk)).encode()),
                 "access", None, id="hs256-keyed-with-public-jwk"),
    pytest.param(lambda r: hs256(r.header(alg="HS256", kid=None), r.claims(), r.public_pem),
                 "access", None, id="hs256-without-kid"),
    pytest.param(_other_ec_key_with_broker_kid, "access", None,
                 id="other-ec-key-with-broker-kid"),
    pytest.param(_embedded_jwk, "access", None, id="attacker-key-in-jwk-header"),
    pytest.param(_unknown_kid, "access", None, id="unknown-kid"),
    pytest.param(lambda r: r.sign(r.claims(), kid=None), "access", None,
                 id="broker-signed-without-kid"),
    pytest.param(_rs256_on_es256_kid, "access", None, id="rs256-header-on-es256-kid"),
    pytest.param(lambda r: unsigned(r.header(alg="ES384"), r.claims(), bytes(96)), "access",
                 None, id="alg-outside-allow-list"),
    pytest.param(_tampered_payload, "access", None, id="tampered-payload"),
    pytest.param(_swapped_signature, "access", None, id="signature-from-another-token"),
    pytest.param(_zero_signature, "access", None, id="zero-signature"),
    pytest.param(lambda r: r.sign(r.claims(exp=int(time.time()) - r.skew - 30,
                                          iat=int(time.time()) - 900)),
                 "access", None, id="expired-beyond-skew"),
    pytest.param(lambda r: r.sign(r.claims(nbf=int(time.time()) + r.skew + 600)), "access",
                 None, id="not-before-beyond-skew"),
    pytest.param(lambda r: r.sign(r.claims(iss="https://evil.example")), "access", None,
                 id="wrong-issuer"),
    pytest.param(lambda r: r.sign(r.claims(iss=None)), "access", None, id="no-issuer"),
    pytest.param(lambda r: r.sign(r.claims(iss=r.issuer + "/")), "access", None,
                 id="issuer-with-trailing-slash"),
    pytest.param(lambda r: r.access, "access", OTHER_AUDIENCE, id="wrong-audience"),
    pytest.param(lambda r: r.sign(r.claims(aud=None)), "access", AUDIENCE, id="no-audience"),
    pytest.param(lambda r: r.sign(r.claims(client_id=None)), "access", None,
                 id="access-token-without-client_id"),
    pytest.param(lambda r: r.sign(r.claims(jti=None)), "access", None,
                 id="access-token-without-jti"),
    pytest.param(lambda r: r.sign(r.claims(exp=None)), "access", None, id="no-expiry"),
    pytest.param(lambda r: r.id_token, "access", AUDIENCE, id="id-token-as-access-token"),
    pytest.param(_retyped_id_token, "access", AUDIENCE, id="id-token-retyped-in-header"),
    pytest.param(lambda r: r.sign(r.claims(), typ=""), "access", None, id="no-typ"),
    pytest.param(lambda r: r.access, "id", AUDIENCE, id="access-token-as-id-token"),
    pytest.param(lambda r: r.access[: len(r.access) // 2], "access", None, id="truncated"),
    pytest.param(lambda r: r.access.rsplit(".", 1)[0], "access", None, id="two-segments"),
    pytest.param(lambda r: r.access + ".extra", "access", None, id="four-segments"),
    pytest.param(lambda r: "garbage-that-is-not-a-jwt", "access", None, id="garbage"),
    pytest.param(lambda r: "not.base64!.at-all", "access", None, id="bad-base64"),
    pytest.param(lambda r: f"{b64(b'[1,2,3]')}.{b64json(r.claims())}.c2ln", "access", None,
                 id="header-not-an-object"),
    pytest.param(lambda r: f"{b64(b'{nope')}.{b64json(r.claims())}.c2ln", "access", None,
                 id="header-not-json"),
    pytest.param(lambda r: unsigned(r.header(kid=["x"]), r.claims()), "access", None,
                 id="kid-not-a-string"),
]  # fmt: skip


async def test_control_genuine_tokens_verify(broker: Services, ring: Ring) -> None:
    claims = broker.tokens.verify(ring.access, audience=AUDIENCE)
    assert claims["sub"] == "u-alice" and claims["client_id"] == "binderhub"
    assert broker.tokens.verify(ring.id_token, audience=AUDIENCE, kind="id")["nonce"] == "n-1"
    # The hand-built claims verify when signed by the broker, so each forgery below fails
    # for the one thing it changes.
    assert broker.tokens.verify(ring.sign(ring.claims()), audience=AUDIENCE)["jti"] == (
        "forged-jti"
    )
    # Expired, but within the configured clock skew: still accepted.
    recent = ring.sign(ring.claims(exp=int(time.time()) - ring.skew // 2))
    assert broker.tokens.verify(recent)["sub"] == "u-alice"
    # Without a required audience, any audience is accepted (what /v1/whoami does).
    assert broker.tokens.verify(ring.access)["aud"] == AUDIENCE


@pytest.mark.parametrize(("forge", "kind", "audience"), FORGERIES)
async def test_forged_token_is_rejected(
    broker: Services, ring: Ring, forge: Forge, kind: str, audience: str | None
) -> None:
    token = forge(ring)
    with pytest.raises(InvalidToken) as caught:
        broker.tokens.verify(token, audience=audience, kind=kind)  # type: ignore[arg-type]
    assert caught.value.status == 401 and caught.value.error == "invalid_token"
    # The description is shown to callers: it never repeats the token or a part of it.
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in caught.value.description
            assert part not in caught.value.log_detail


# /v1/whoami verifies access tokens without an audience: the audience rows and the ID-token
# row that needs it do not apply there, every other forgery does.
WHOAMI_FORGERIES = [
    p for p in FORGERIES
    if p.values[2] is None and p.values[1] == "access"
] + [
    pytest.param(lambda r: r.id_token, "access", None, id="id-token-as-access-token"),
    pytest.param(_retyped_id_token, "access", None, id="id-token-retyped-in-header"),
]  # fmt: skip


async def _whoami(client: ContractClient, token: str) -> Any:
    return await client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize(("forge", "kind", "audience"), WHOAMI_FORGERIES)
async def test_whoami_refuses_forged_token(
    client: ContractClient, ring: Ring, forge: Forge, kind: str, audience: str | None
) -> None:
    token = forge(ring)
    response = await _whoami(client, token)
    assert response.status == 401
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    body = response.json()
    assert body["error"] == "invalid_token"
    assert body["request_id"] == response.headers["X-Request-Id"]
    assert set(body) == {"error", "error_description", "request_id"}
    everything = response.text + json.dumps(dict(response.headers))
    assert token not in everything
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in everything


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="no-header"),
        pytest.param("Bearer", id="bearer-without-token"),
        pytest.param("Basic dXNlcjpwYXNz", id="basic-scheme"),
        pytest.param("Token something-long-enough", id="other-scheme"),
    ],
)
async def test_whoami_without_a_bearer_token(
    client: ContractClient, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = await client.get("/v1/whoami", headers=headers)
    assert response.status == 401
    assert response.headers["Cache-Control"] == "no-store"
    assert response.json()["error"] == "invalid_token"
    assert "dXNlcjpwYXNz" not in response.text and "something-long-enough" not in response.text


async def test_whoami_control_genuine_token(client: ContractClient, ring: Ring) -> None:
    response = await _whoami(client, ring.access)
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert body["sub"] == "u-alice" and body["client_id"] == "binderhub"
    assert body["aud"] == AUDIENCE
    assert ring.access not in response.text
