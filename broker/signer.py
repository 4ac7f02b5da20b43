"""JWTs for downstream systems that trust the broker as an identity provider.

AWS STS (AssumeRoleWithWebIdentity) and similar services verify these against the broker's
discovery document and JWKS, like any OpenID provider's ID token. They are signed with the
key ring's current key (local or Vault transit), carry a `kid`, and are never OAuth access
tokens: `typ` is plain "JWT" and they hold no `scope` or `client_id`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from broker.errors import InvalidRequest
from broker.keyring import KeyRing
from broker.tokens import TokenService

_REGISTERED = frozenset({"iss", "aud", "iat", "nbf", "exp", "jti"})


class KeyRingSigner:
    """`adapters.base.TokenSigner` over the broker's key ring."""

    def __init__(
        self,
        keyring: KeyRing,
        tokens: TokenService,
        *,
        issuer: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keyring = keyring
        self._tokens = tokens
        self._issuer = issuer
        self._clock = clock

    @property
    def issuer(self) -> str:
        return self._issuer

    async def sign(self, claims: Mapping[str, Any], *, audience: str, ttl: int) -> str:
        """Raises InvalidRequest for a missing `sub`, a registered claim in `claims` or a
        lifetime that is not positive; UpstreamFailed when the key ring cannot be trusted."""
        if not claims.get("sub"):
            raise InvalidRequest("a signed identity needs a subject")
        if not _REGISTERED.isdisjoint(claims):
            raise InvalidRequest("claims may not replace registered claims")
        if ttl <= 0:
            raise InvalidRequest("the lifetime must be positive")
        key = self._keyring.signer()
        now = int(self._clock())
        body = {
            **claims,
            "iss": self._issuer,
            "aud": audience,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": secrets.token_urlsafe(18),
        }
        return await self._tokens.sign_jws(key, "JWT", body)
