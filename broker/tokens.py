"""Minting and verifying the broker's own JWTs.

Access tokens follow RFC 9068 (`typ: at+jwt`, iss, sub, aud, client_id, scope, iat, exp, jti,
auth_time, acr); ID tokens follow OpenID Connect Core §2. Verification pins the algorithm to
the one the `kid` was published with, from an allow-list, and never contacts Vault.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jwt
from jwt.algorithms import Algorithm

from adapters.errors import InvalidRequest, InvalidToken
from broker.keyring import SUPPORTED_ALGORITHMS, KeyRing, SigningKey

TokenKind = Literal["access", "id"]
_TYP = {"access": "at+jwt", "id": "JWT"}
_ACCEPTED_TYP = {"access": ("at+jwt", "application/at+jwt"), "id": ("jwt", "application/jwt")}
_RESERVED = frozenset(
    {"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "client_id", "scope", "auth_time", "acr",
     "nonce", "azp", "cnf", "act"}
)  # fmt: skip
_REQUIRED = {"access": ["iss", "sub", "aud", "exp", "iat", "jti", "client_id"],
             "id": ["iss", "sub", "aud", "exp", "iat"]}  # fmt: skip
# Header segments seen by `verify` and their parsed headers, kept only for headers that name
# a current broker key. Broker tokens carry a handful (one per key and type), so the header is
# parsed once, not on every call; the bounds keep crafted headers from growing it.
_MAX_CACHED_HEADERS = 256
_MAX_HEADER_SEGMENT = 512  # characters; ours are ~100
# Tokens that passed `verify`'s signature and claim checks, by (token, audience, kind): the
# same bytes checked with the same key give the same verdict, so a token presented again (a
# resource server introspecting it, a launcher calling the API with it) skips the signature
# and the parse. What can change is re-checked on every call: the key must still be the same
# published key, and the times. Only exact strings that verified are stored (an attacker
# cannot add entries without valid tokens); the oldest entry goes first when it is full.
_MAX_VERIFIED = 1024
_MAX_VERIFIED_TOKEN = 4096  # characters; larger tokens are verified every time


def _b64(data: bytes) -> bytes:
    """base64url without padding (RFC 7515 §2), as PyJWT encodes segments."""
    return base64.urlsafe_b64encode(data).replace(b"=", b"")


@dataclass(frozen=True, slots=True)
class MintedToken:
    """A signed token and the facts about it that may be logged (never the token itself)."""

    token: str
    jti: str
    kid: str
    issued_at: int
    expires_at: int

    def __repr__(self) -> str:
        return f"MintedToken(jti={self.jti!r}, kid={self.kid!r}, expires_at={self.expires_at})"


class TokenService:
    """Mints and verifies broker JWTs with the key ring's current key."""

    def __init__(
        self,
        keyring: KeyRing,
        *,
        issuer: str,
        access_token_ttl: int,
        id_token_ttl: int,
        max_ttl: int,
        clock_skew: int,
        on_mint: Callable[[TokenKind], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keyring = keyring
        self.issuer = issuer
        self._default_ttl = {"access": access_token_ttl, "id": id_token_ttl}
        self.max_ttl = max_ttl
        self._skew = clock_skew
        self._on_mint = on_mint
        self._clock = clock
        self._header_segments: dict[tuple[str, str, str], bytes] = {}
        self._algorithms: dict[str, Algorithm] = {}
        self._headers_seen: dict[str, dict[str, Any]] = {}
        self._verified: dict[tuple[str, str | None, str], tuple[SigningKey, str]] = {}

    async def mint(
        self,
        *,
        subject: str,
        audience: str | Sequence[str],
        client_id: str,
        kind: TokenKind = "access",
        scope: Sequence[str] = (),
        ttl: int | None = None,
        auth_time: int | None = None,
        acr: str | None = None,
        nonce: str | None = None,
        cnf: Mapping[str, Any] | None = None,
        act: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> MintedToken:
        """Sign a new token. `ttl` is clipped to the configured maximum, never extended.

        `cnf` binds the token to a key (RFC 9449 §6), `act` names the actor (RFC 8693 §4.1).
        `extra` adds claims but cannot replace a registered one. Raises UpstreamFailed when
        the key ring cannot be trusted (Vault unreachable for too long).
        """
        if not subject or not client_id or not audience:
            raise InvalidRequest("a token needs a subject, a client and an audience")
        if extra and not _RESERVED.isdisjoint(extra):
            raise InvalidRequest("extra claims may not replace registered claims")
        key = self._keyring.signer()
        now = int(self._clock())
        lifetime = min(ttl if ttl is not None else self._default_ttl[kind], self.max_ttl)
        if lifetime <= 0:
            raise InvalidRequest("the token lifetime must be positive")
        jti = secrets.token_urlsafe(18)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience if isinstance(audience, str) else list(audience),
            "iat": now,
            "exp": now + lifetime,
            "jti": jti,
            "auth_time": auth_time if auth_time is not None else now,
        }
        if kind == "access":
            claims["client_id"] = client_id
            claims["scope"] = " ".join(scope)
        else:
            claims["azp"] = client_id
            if nonce is not None:
                claims["nonce"] = nonce
        if acr is not None:
            claims["acr"] = acr
        if cnf:
            claims["cnf"] = dict(cnf)
        if act:
            claims["act"] = dict(act)
        if extra:
            claims.update(extra)
        # The JWS is assembled here rather than by `jwt.encode`: the header segment is the same
        # for every token of one key and type, so it is serialised once (the bytes `jwt.encode`
        # would produce: sorted keys, compact), and the signature comes from PyJWT's algorithm
        # object, locally or from Vault transit alike.
        token = await self.sign_jws(key, _TYP[kind], claims)
        if self._on_mint is not None:
            self._on_mint(kind)
        return MintedToken(
            token=token, jti=jti, kid=key.kid, issued_at=now, expires_at=now + lifetime
        )

    async def sign_jws(self, key: SigningKey, typ: str, claims: Mapping[str, Any]) -> str:
        """A compact JWS of `claims` with `key` (locally or through Vault transit), its header
        `{alg, kid, typ}` serialised once per key and type."""
        signing_input = (
            self._header_segment(key, typ)
            + b"."
            + _b64(json.dumps(claims, separators=(",", ":")).encode())
        )
        if key.private_key is not None:
            signature = self._algorithm(key.alg).sign(signing_input, key.private_key)
        else:
            signature = await self._keyring.sign(key, signing_input)
        return (signing_input + b"." + _b64(signature)).decode()

    def _header_segment(self, key: SigningKey, typ: str) -> bytes:
        cache_key = (key.kid, key.alg, typ)
        segment = self._header_segments.get(cache_key)
        if segment is None:
            header = {"alg": key.alg, "kid": key.kid, "typ": typ}
            segment = _b64(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())
            if len(self._header_segments) > 64:  # rotated keys: keep the dict small
                self._header_segments.clear()
            self._header_segments[cache_key] = segment
        return segment

    def _algorithm(self, alg: str) -> Algorithm:
        algorithm = self._algorithms.get(alg)
        if algorithm is None:
            algorithm = self._algorithms[alg] = jwt.get_algorithm_by_name(alg)
        return algorithm

    def _unverified_header(self, token: str) -> tuple[dict[str, Any], bool]:
        """The token's header, and whether it came from the cache (whose entries were parsed,
        with the whole token, by `jwt.get_unverified_header`). Raises `jwt.PyJWTError`."""
        header = self._headers_seen.get(token.partition(".")[0])
        if header is not None:
            return header, True
        return jwt.get_unverified_header(token), False

    def _remember_header(self, token: str, header: dict[str, Any]) -> None:
        """Cache a header that names a current broker key (after `verify`'s checks of it)."""
        segment = token.partition(".")[0]
        if len(segment) <= _MAX_HEADER_SEGMENT:
            if len(self._headers_seen) >= _MAX_CACHED_HEADERS:
                self._headers_seen.clear()  # crafted variants cannot crowd ours out for good
            self._headers_seen[segment] = header

    def verify(
        self, token: str, *, audience: str | None = None, kind: TokenKind = "access"
    ) -> dict[str, Any]:
        """Check a broker token; returns its claims or raises InvalidToken.

        Accepts only algorithms from the allow-list, and only the algorithm the `kid` was
        published with; checks `typ`, issuer, expiry (with the configured skew) and, when
        given, the audience.
        """
        memo = (token, audience, kind)
        seen = self._verified.get(memo)
        if seen is not None:
            known, payload = seen
            current = self._keyring.keyset.find(known.kid, self._clock())
            if current is known or (current is not None and current == known):
                fresh: dict[str, Any] = json.loads(payload)  # callers may change theirs
                self._check_times(fresh)
                return fresh
            del self._verified[memo]  # the key left the ring or changed: check afresh
        try:
            header, cached = self._unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("the token is malformed") from None
        alg, kid, typ = header.get("alg"), header.get("kid"), str(header.get("typ", "")).lower()
        if alg not in SUPPORTED_ALGORITHMS:
            raise InvalidToken("the token's algorithm is not accepted", log_detail=f"alg={alg!r}")
        if typ not in _ACCEPTED_TYP[kind]:
            raise InvalidToken("the token is not of the expected type", log_detail=f"typ={typ!r}")
        key = self._keyring.keyset.find(str(kid), self._clock()) if kid else None
        if key is None or key.alg != alg:
            raise InvalidToken("the token was not signed by a current broker key")
        if not cached:
            self._remember_header(token, header)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.public_key,
                algorithms=[key.alg],
                audience=audience,
                issuer=self.issuer,
                options={
                    "require": _REQUIRED[kind],
                    "verify_aud": audience is not None,
                    # Times are checked below against this service's clock.
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidAudienceError:
            raise InvalidToken("the token is not meant for this audience") from None
        except jwt.DecodeError as error:
            # A known header spared the first parse; the rest of the token is first parsed
            # here, and what that parse refuses is what the first parse would have refused.
            if cached and not isinstance(error, jwt.InvalidSignatureError):
                raise InvalidToken("the token is malformed") from None
            raise InvalidToken("the token is not valid", log_detail=type(error).__name__) from None
        except jwt.PyJWTError as error:
            raise InvalidToken("the token is not valid", log_detail=type(error).__name__) from None
        self._check_times(claims)
        if len(token) <= _MAX_VERIFIED_TOKEN:
            if len(self._verified) >= _MAX_VERIFIED:
                del self._verified[next(iter(self._verified))]
            self._verified[memo] = (key, json.dumps(claims, separators=(",", ":")))
        return claims

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        try:
            exp, iat = float(claims["exp"]), float(claims["iat"])
            nbf = float(claims.get("nbf", iat))
        except (TypeError, ValueError):
            raise InvalidToken("the token's times are not numbers") from None
        if now >= exp + self._skew:
            raise InvalidToken("the token has expired")
        if iat > now + self._skew or nbf > now + self._skew:
            raise InvalidToken("the token is not valid yet")
