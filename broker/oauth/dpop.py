"""DPoP proofs (RFC 9449 §4.3): who holds the key a token is bound to.

A proof is a JWT of `typ: dpop+jwt`, signed with an asymmetric key whose public JWK rides in
its header; it names the request (`htm`, `htu`), is fresh (`iat`), unique (`jti`, kept in the
shared cache) and, at resource endpoints, bound to the access token (`ath`). With
`oauth.dpop_require_nonce` the broker also demands a nonce it handed out (§8).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jwt
from aiohttp import web

from broker.errors import BrokerError
from broker.services import Services

PROOF_ALGORITHMS = ["ES256", "ES384", "RS256", "PS256", "EdDSA"]
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"),
                       "OKP": ("crv", "kty", "x")}  # fmt: skip
_PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
NONCE_TTL = 300


class InvalidDPoPProof(BrokerError):
    error, status, title = "invalid_dpop_proof", 400, "The DPoP proof is not valid"


class UseDPoPNonce(BrokerError):
    error, status, title = "use_dpop_nonce", 400, "Send a DPoP proof with the server's nonce"


class InvalidDPoPProofAtResource(InvalidDPoPProof):
    """At a resource endpoint the same failure is a 401 challenge (RFC 9449 §7.1)."""

    status = 401


class UseDPoPNonceAtResource(UseDPoPNonce):
    status = 401


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint, base64url without padding."""
    members = _THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None or any(m not in jwk for m in members):
        raise InvalidDPoPProof("the proof's jwk is not a supported public key")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _normalise(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", "", ""))


def has_proof(request: web.Request) -> bool:
    return "DPoP" in request.headers


async def new_nonce(svc: Services) -> str:
    nonce = secrets.token_urlsafe(24)
    await svc.cache.set(f"dpop-nonce:{nonce}", "1", NONCE_TTL)
    return nonce


async def verify_proof(
    svc: Services, request: web.Request, *, htm: str, htu: str, access_token: str | None = None
) -> str:
    """Check the request's DPoP proof and return its key's thumbprint (`jkt`)."""
    values = request.headers.getall("DPoP", [])
    if len(values) != 1:
        raise InvalidDPoPProof("send exactly one DPoP header")
    proof = values[0]
    try:
        header = jwt.get_unverified_header(proof)
    except jwt.PyJWTError:
        raise InvalidDPoPProof("the DPoP proof is not a JWT") from None
    alg, jwk = header.get("alg"), header.get("jwk")
    if header.get("typ") != "dpop+jwt":
        raise InvalidDPoPProof("the DPoP proof must have typ dpop+jwt")
    if alg not in PROOF_ALGORITHMS:
        raise InvalidDPoPProof("the DPoP proof's algorithm is not accepted")
    if not isinstance(jwk, dict) or _PRIVATE_MEMBERS & set(jwk):
        raise InvalidDPoPProof("the DPoP proof must carry a public jwk")
    jkt = jwk_thumbprint(jwk)
    try:
        key = jwt.PyJWK(jwk, algorithm=str(alg)).key
        claims: dict[str, Any] = jwt.decode(
            proof, key, algorithms=[str(alg)],
            options={"require": ["jti", "htm", "htu", "iat"], "verify_aud": False,
                     "verify_exp": False, "verify_iat": False},
        )  # fmt: skip
    except jwt.PyJWTError as error:
        raise InvalidDPoPProof(
            "the DPoP proof's signature or claims are not valid", log_detail=type(error).__name__
        ) from None
    if claims["htm"] != htm:
        raise InvalidDPoPProof("the DPoP proof is for another HTTP method")
    if not isinstance(claims["htu"], str) or _normalise(claims["htu"]) != _normalise(htu):
        raise InvalidDPoPProof("the DPoP proof is for another URL")
    window = svc.settings.oauth.dpop_iat_window
    try:
        age = time.time() - float(claims["iat"])
    except (TypeError, ValueError):
        raise InvalidDPoPProof("the DPoP proof's iat is not a number") from None
    if age > window or age < -svc.settings.tokens.clock_skew:
        raise InvalidDPoPProof("the DPoP proof is stale or from the future")
    if access_token is not None:
        expected = base64.urlsafe_b64encode(hashlib.sha256(access_token.encode()).digest())
        if claims.get("ath") != expected.rstrip(b"=").decode():
            raise InvalidDPoPProof("the DPoP proof is not bound to this access token (ath)")
    if svc.settings.oauth.dpop_require_nonce:
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or await svc.cache.get(f"dpop-nonce:{nonce}") is None:
            demand = UseDPoPNonce("the DPoP proof needs the nonce in the DPoP-Nonce header")
            demand.headers["DPoP-Nonce"] = await new_nonce(svc)
            raise demand
    fresh = await svc.cache.add(f"dpop-jti:{jkt}:{claims['jti']}", "1", window * 2 + 60)
    if not fresh:
        raise InvalidDPoPProof("the DPoP proof was already used")
    return jkt
