"""Tokens of trusted issuers (peer binder deployments, other OpenID providers), verified with
the keys each issuer publishes.

An issuer's keys come from its JWKS, found through its discovery document (OpenID Connect
Discovery 1.0 §4, whose `issuer` must equal the configured one exactly, §4.3) unless
`jwks_uri` is configured. Keys are parsed once and cached for five minutes; a token with a
`kid` the cache does not know refetches them, at most once a minute per issuer, so a flood of
made-up `kid`s cannot turn the broker into a traffic amplifier against its peer.

Only the issuer's configured asymmetric algorithms are accepted: never `none`, never HMAC (an
HMAC "key" made from a published public key is the classic algorithm-confusion forgery).
Failures to reach the issuer raise `UpstreamFailed` (503); tokens that do not verify raise
`InvalidToken` with a description that never holds the token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.errors import InvalidToken, UpstreamFailed
from broker.settings import TrustedIssuerConfig, check_issuer_url

CACHE_FOR = 300.0
REFETCH_AFTER = 60.0
MAX_DOCUMENT_BYTES = 256 * 1024
_FETCH_TIMEOUT = aiohttp.ClientTimeout(total=5)
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384"}
_KTY = {"ES256": "EC", "ES384": "EC", "RS256": "RSA", "PS256": "RSA", "EdDSA": "OKP"}
_MIN_RSA_BITS = 2048

Expected = Literal["access", "id", "any"]
# RFC 9068 §2.1 / RFC 8725 §3.11: explicit typing keeps an ID token from passing as an access
# token and back. "any" (a `jwt` subject token) accepts either.
_TYP = {
    "access": frozenset({"at+jwt", "application/at+jwt"}),
    "id": frozenset({"", "jwt", "application/jwt"}),
}


@dataclass(frozen=True, slots=True)
class _PeerKey:
    kid: str | None
    alg: str
    key: Any  # a cryptography public key object, parsed once


@dataclass(frozen=True, slots=True)
class _KeySet:
    fetched_at: float
    keys: tuple[_PeerKey, ...]

    def find(self, kid: str | None, alg: str) -> _PeerKey | None:
        """The key for `kid` and `alg`; without a `kid`, only an unambiguous single key."""
        matches = [k for k in self.keys if k.alg == alg and (kid is None or k.kid == kid)]
        return matches[0] if len(matches) == 1 else None


class PeerKeys:
    """The parsed JWKS of each trusted issuer, cached in this process.

    Keyed by what determines the keys (issuer, configured `jwks_uri`, allowed algorithms), so
    several broker instances in one process (tests) can share it safely.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sets: dict[tuple[str, str | None, tuple[str, ...]], _KeySet] = {}
        self._last_attempt: dict[tuple[str, str | None, tuple[str, ...]], float] = {}

    async def find(
        self, http: aiohttp.ClientSession, issuer: TrustedIssuerConfig, kid: str | None, alg: str
    ) -> Any | None:
        """The public key `issuer` publishes for (`kid`, `alg`), or None if it has none."""
        cache_key = (issuer.issuer, issuer.jwks_uri, tuple(issuer.algorithms))
        now = self._clock()
        cached = self._sets.get(cache_key)
        if cached is None or now - cached.fetched_at >= CACHE_FOR:
            cached = await self._refresh(http, issuer, cache_key)
        found = cached.find(kid, alg)
        if found is None and now - self._last_attempt.get(cache_key, 0.0) >= REFETCH_AFTER:
            # The issuer may have rotated since we fetched: look once more, rate-limited.
            cached = await self._refresh(http, issuer, cache_key)
            found = cached.find(kid, alg)
        return found.key if found is not None else None

    async def _refresh(
        self,
        http: aiohttp.ClientSession,
        issuer: TrustedIssuerConfig,
        cache_key: tuple[str, str | None, tuple[str, ...]],
    ) -> _KeySet:
        # Recorded before the fetch so concurrent requests with unknown kids do not all refetch.
        self._last_attempt[cache_key] = self._clock()
        jwks_uri = issuer.jwks_uri or await _discover_jwks_uri(http, issuer.issuer)
        document = await _fetch_json(http, jwks_uri, "JWKS")
        keys = _parse_jwks(document, issuer.algorithms)
        key_set = _KeySet(self._clock(), keys)
        self._sets[cache_key] = key_set
        return key_set


PEER_KEYS = PeerKeys()


def trusted_issuer(
    issuers: Sequence[TrustedIssuerConfig], iss: object
) -> TrustedIssuerConfig | None:
    """The configured entry whose `issuer` is exactly `iss`, or None."""
    if not isinstance(iss, str):
        return None
    return next((i for i in issuers if i.issuer == iss), None)


async def verify_peer_token(
    http: aiohttp.ClientSession,
    issuer: TrustedIssuerConfig,
    token: str,
    *,
    expected: Expected,
    clock_skew: int,
    keys: PeerKeys = PEER_KEYS,
    now: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """The claims of `token` if `issuer` signed it for its configured audience; else
    InvalidToken. Checks: the header's `alg` is in the issuer's allow-list and is the `alg` of
    the published key; `typ` fits `expected`; `iss` exact; `aud` contains the configured
    audience; `exp`, `iat`, `nbf` against `now` with `clock_skew`."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidToken("the token is malformed") from None
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or alg not in issuer.algorithms:
        raise InvalidToken("the token's algorithm is not accepted", log_detail=f"alg={alg!r}")
    if kid is not None and not isinstance(kid, str):
        raise InvalidToken("the token's key id is malformed")
    typ = str(header.get("typ", "")).lower()
    if expected != "any" and typ not in _TYP[expected]:
        raise InvalidToken("the token is not of the expected type", log_detail=f"typ={typ!r}")
    key = await keys.find(http, issuer, kid, alg)
    if key is None:
        raise InvalidToken("the token was not signed by a key its issuer publishes")
    try:
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=[alg], audience=issuer.audience, issuer=issuer.issuer,
            options={
                "require": ["iss", "sub", "aud", "exp", "iat"],
                # Times are checked below, the same way as for the broker's own tokens.
                "verify_exp": False, "verify_iat": False, "verify_nbf": False,
            },
        )  # fmt: skip
    except jwt.InvalidAudienceError:
        raise InvalidToken("the token is not meant for this broker") from None
    except jwt.PyJWTError as error:
        raise InvalidToken("the token is not valid", log_detail=type(error).__name__) from None
    if not isinstance(claims["sub"], str) or not claims["sub"]:
        raise InvalidToken("the token has no subject")
    _check_times(claims, now(), clock_skew)
    return claims


def _check_times(claims: Mapping[str, Any], now: float, skew: int) -> None:
    try:
        exp, iat = float(claims["exp"]), float(claims["iat"])
        nbf = float(claims.get("nbf", iat))
    except (TypeError, ValueError):
        raise InvalidToken("the token's times are not numbers") from None
    if now >= exp + skew:
        raise InvalidToken("the token has expired")
    if iat > now + skew or nbf > now + skew:
        raise InvalidToken("the token is not valid yet")


async def _discover_jwks_uri(http: aiohttp.ClientSession, issuer: str) -> str:
    document = await _fetch_json(http, f"{issuer}/.well-known/openid-configuration", "discovery")
    if document.get("issuer") != issuer:
        # OIDC Discovery §4.3: a document naming another issuer is not this issuer's.
        raise UpstreamFailed(
            "a trusted issuer's discovery document names another issuer",
            log_detail=f"configured {issuer!r}, document {str(document.get('issuer'))[:200]!r}",
        )
    jwks_uri = document.get("jwks_uri")
    try:
        if not isinstance(jwks_uri, str):
            raise ValueError("missing")
        check_issuer_url(jwks_uri)
    except ValueError as error:
        raise UpstreamFailed(
            "a trusted issuer's discovery document has no usable jwks_uri",
            log_detail=f"{issuer}: {error}",
        ) from None
    return jwks_uri


async def _fetch_json(http: aiohttp.ClientSession, url: str, what: str) -> dict[str, Any]:
    """GET a JSON object; any failure (network, status, size, syntax) is UpstreamFailed."""
    try:
        # No redirects: the issuer's own URLs must answer, not wherever they point.
        async with http.get(url, timeout=_FETCH_TIMEOUT, allow_redirects=False) as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            body = await response.content.read(MAX_DOCUMENT_BYTES + 1)
        if len(body) > MAX_DOCUMENT_BYTES:
            raise ValueError("document too large")
        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        raise UpstreamFailed(
            f"a trusted issuer's {what} document could not be fetched",
            log_detail=f"{url}: {error!r}",
        ) from None
    return document


def _parse_jwks(document: Mapping[str, Any], algorithms: Sequence[str]) -> tuple[_PeerKey, ...]:
    """Every (key, algorithm) pair the JWKS allows among `algorithms`; unusable entries are
    skipped (a JWKS may carry keys for other purposes)."""
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise UpstreamFailed("a trusted issuer's JWKS has no `keys` list")
    parsed: list[_PeerKey] = []
    for entry in entries:
        if not isinstance(entry, dict) or not _usable_for_signatures(entry):
            continue
        kid = entry.get("kid") if isinstance(entry.get("kid"), str) else None
        for alg in algorithms:
            if entry.get("alg") not in (None, alg) or entry.get("kty") != _KTY[alg]:
                continue
            if alg in _EC_CURVES and entry.get("crv") != _EC_CURVES[alg]:
                continue
            try:
                key = jwt.PyJWK(entry, algorithm=alg).key
            except (jwt.PyJWTError, ValueError, TypeError):
                continue
            if isinstance(key, rsa.RSAPublicKey) and key.key_size < _MIN_RSA_BITS:
                continue
            parsed.append(_PeerKey(kid, alg, key))
    return tuple(parsed)


def _usable_for_signatures(entry: Mapping[str, Any]) -> bool:
    if entry.get("use") not in (None, "sig"):
        return False
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return False
    # Private parts in a published JWKS: refuse rather than verify with a private key object.
    return "d" not in entry
