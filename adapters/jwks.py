"""A cache of one JSON Web Key Set (RFC 7517) fetched over the broker's aiohttp session.

Contracts:
- Each JWK is parsed once into a `cryptography` public key object (PyJWT re-parses strings on
  every call); `key_for(kid, alg)` returns that object, ready for `jwt.decode`.
- The set is refetched when its lifetime ends (Cache-Control max-age, clipped to
  [`min_ttl`, `max_ttl`]) and when a `kid` is unknown, at most once per `min_refresh` seconds,
  so tokens with made-up kids cannot make the broker hammer the issuer.
- A failed refetch keeps the last good set (the issuer's published keys do not become less
  trustworthy because it is briefly down); with no good set, `UpstreamFailed`.
- Only `adapters.errors` types leave: `InvalidToken` for a kid or alg that no published key
  fits, `UpstreamFailed` when the set cannot be fetched or parsed.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt import PyJWK
from jwt.exceptions import PyJWKError

from adapters.errors import InvalidRequest, InvalidToken, UpstreamFailed

__all__ = ["ASYMMETRIC_ALGS", "JwksCache", "PublicKey", "decode_signed"]

log = structlog.get_logger(__name__)

PublicKey = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey

# Which JWK key type and curve each JWS algorithm needs (RFC 7518 §3, RFC 8037). Symmetric
# and "none" algorithms are absent on purpose: a public JWKS can never verify them.
ASYMMETRIC_ALGS: Final[Mapping[str, tuple[str, str | None]]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?", re.IGNORECASE)
_MAX_BYTES: Final = 512 * 1024


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    key: PublicKey


class JwksCache:
    """The keys published at `url`. Safe to share between concurrent requests."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        url: str,
        *,
        min_refresh: float = 60.0,
        min_ttl: float = 300.0,
        max_ttl: float = 86400.0,
        default_ttl: float = 3600.0,
    ) -> None:
        self.url = url
        self._http = http
        self._min_refresh = min_refresh
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._default_ttl = default_ttl
        self._keys: tuple[_Key, ...] | None = None
        self._expires_at = 0.0
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def key_for(self, kid: str | None, alg: str) -> PublicKey:
        """The published key for `kid` that can verify `alg`.

        A token without `kid` is accepted only if exactly one published key fits `alg`.
        Raises `InvalidToken` (no such key / wrong type) or `UpstreamFailed` (no key set).
        """
        if alg not in ASYMMETRIC_ALGS:
            raise InvalidToken(
                "The token's signature algorithm is not accepted.",
                log_detail=f"alg {alg!r} cannot be verified with a public key set",
            )
        now = time.monotonic()
        if self._keys is None or now >= self._expires_at:
            await self._refresh(force=self._keys is None)
        found = self._find(kid, alg)
        if found is None and time.monotonic() - self._fetched_at >= self._min_refresh:
            # The issuer may have rotated: look once more, rate-limited.
            await self._refresh(force=False)
            found = self._find(kid, alg)
        if found is None:
            raise InvalidToken(
                "The token was not signed with a key its issuer publishes.",
                log_detail=f"no key in {self.url} fits kid={kid!r} alg={alg}",
            )
        return found

    def _find(self, kid: str | None, alg: str) -> PublicKey | None:
        kty, crv = ASYMMETRIC_ALGS[alg]
        fitting = [
            k
            for k in self._keys or ()
            if k.kty == kty
            and (crv is None or k.crv == crv)
            and (k.alg is None or k.alg == alg)
            and (kid is None or k.kid == kid)
        ]
        return fitting[0].key if len(fitting) == 1 else None

    async def _refresh(self, *, force: bool) -> None:
        started = time.monotonic()
        async with self._lock:
            if self._fetched_at >= started:
                return  # another task fetched while this one waited
            if not force and self._keys is not None and started < self._expires_at:
                if started - self._fetched_at < self._min_refresh:
                    return
            try:
                keys, ttl = await self._fetch()
            except UpstreamFailed:
                self._fetched_at = time.monotonic()  # a failure also counts against the rate
                if self._keys is None:
                    raise
                log.warning("jwks.refresh_failed_keeping_last", url=self.url)
                self._expires_at = self._fetched_at + self._min_refresh
                return
            self._keys = keys
            self._fetched_at = time.monotonic()
            self._expires_at = self._fetched_at + ttl

    async def _fetch(self) -> tuple[tuple[_Key, ...], float]:
        try:
            async with self._http.get(
                self.url, headers={"Accept": "application/json"}, allow_redirects=False
            ) as response:
                if response.status != 200:
                    raise UpstreamFailed(
                        "The identity provider's signing keys are unavailable.",
                        log_detail=f"GET {self.url}: HTTP {response.status}",
                    )
                body = await response.content.read(_MAX_BYTES + 1)
                cache_control = response.headers.get("Cache-Control", "")
        except (aiohttp.ClientError, TimeoutError) as error:
            raise UpstreamFailed(
                "The identity provider's signing keys are unavailable.",
                log_detail=f"GET {self.url}: {type(error).__name__}",
            ) from None
        if len(body) > _MAX_BYTES:
            raise UpstreamFailed(
                "The identity provider's signing keys are unavailable.",
                log_detail=f"{self.url}: key set larger than {_MAX_BYTES} bytes",
            )
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise UpstreamFailed(
                "The identity provider's signing keys are unavailable.",
                log_detail=f"{self.url}: not a JWK set",
            )
        keys = tuple(k for k in (_parse(jwk) for jwk in document["keys"]) if k is not None)
        return keys, self._ttl(cache_control)

    def _ttl(self, cache_control: str) -> float:
        """Cache-Control max-age clipped to [min_ttl, max_ttl]; no-store/no-cache count as
        the minimum (refetching on every token would let callers drive our traffic)."""
        lowered = cache_control.lower()
        if "no-store" in lowered or "no-cache" in lowered:
            return self._min_ttl
        match = _MAX_AGE.search(cache_control)
        if match is None:
            return self._default_ttl
        return min(max(float(match.group(1)), self._min_ttl), self._max_ttl)


async def decode_signed(
    token: str, jwks: JwksCache, *, algs: tuple[str, ...], audience: str, issuer: str,
    leeway: float, require: list[str], refusal: str, what: str = "id_token",
) -> dict[str, Any]:  # fmt: skip
    """The claims of a JWT signed by a key of `jwks`, with one of `algs`, for `audience` from
    `issuer`, carrying every `require`d claim; else InvalidRequest(`refusal`) with the reason
    in `log_detail` only. The alg is checked before any key is looked up, so "none" and an
    HMAC keyed with a public key never reach a verifier."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as error:
        raise InvalidRequest(refusal, log_detail=f"{what} header: {error}") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algs:
        raise InvalidRequest(refusal, log_detail=f"{what} alg {str(alg)[:20]!r} not in {algs}")
    kid = header.get("kid")
    try:
        key = await jwks.key_for(kid if isinstance(kid, str) else None, alg)
    except InvalidToken as error:
        raise InvalidRequest(refusal, log_detail=f"{what}: {error.log_detail}") from None
    try:
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=[alg], audience=audience, issuer=issuer, leeway=leeway,
            options={"require": require},
        )  # fmt: skip
    except jwt.InvalidTokenError as error:
        raise InvalidRequest(
            refusal, log_detail=f"{what}: {type(error).__name__}: {error}"
        ) from None
    return claims


def _parse(jwk: Any) -> _Key | None:
    """One published signing key, or None for keys that cannot sign (use=enc, symmetric,
    private parts, unsupported types); a bad key must not hide the good ones."""
    if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
        return None
    kty = jwk.get("kty")
    if kty not in ("RSA", "EC", "OKP") or "d" in jwk:
        return None
    alg = jwk.get("alg")
    if alg is not None and alg not in ASYMMETRIC_ALGS:
        return None
    try:
        parsed = PyJWK(jwk, algorithm=alg)
    except (PyJWKError, ValueError, TypeError, KeyError) as error:
        log.info("jwks.key_skipped", kid=jwk.get("kid"), reason=type(error).__name__)
        return None
    key = parsed.key
    if not isinstance(
        key, RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey
    ):
        return None
    kid = jwk.get("kid")
    crv = jwk.get("crv")
    return _Key(
        kid=kid if isinstance(kid, str) else None,
        kty=kty,
        crv=crv if isinstance(crv, str) else None,
        alg=alg,
        key=key,
    )
