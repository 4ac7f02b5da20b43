"""Checking the access token presented to a broker resource endpoint (RFC 6750, RFC 9449).

A token bound to a key (`cnf.jkt`) is only accepted with the `DPoP` scheme and a valid proof
for this very request; a revoked `jti` (RFC 7009, shared through the cache) is refused.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from broker.errors import InvalidToken
from broker.oauth import dpop
from broker.oauth.revoked import jti_revoked, revoke_jti
from broker.services import Services


async def revoke_access_token(svc: Services, jti: str, expires_at: float) -> None:
    """Put `jti` on the shared revoked list until the token would have expired anyway."""
    await revoke_jti(svc.cache, jti, expires_at, svc.settings.tokens.clock_skew)


async def is_revoked(svc: Services, jti: str) -> bool:
    return await jti_revoked(svc.cache, jti)


def public_url(svc: Services, request: web.Request) -> str:
    """The URL of this request as the outside world addressed it (for DPoP `htu`)."""
    return f"{svc.settings.server.public_url}{request.path}"


async def access_token_claims(
    svc: Services, request: web.Request, *, audience: str | None = None
) -> dict[str, Any]:
    """Claims of the valid, unrevoked broker access token this request carries."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    scheme, token = scheme.lower(), token.strip()
    if scheme not in ("bearer", "dpop") or not token:
        error = InvalidToken("send a broker access token as `Authorization: Bearer …`")
        error.headers["WWW-Authenticate"] = 'Bearer realm="binder-broker"'
        raise error
    claims = svc.tokens.verify(token, audience=audience)
    if await is_revoked(svc, str(claims["jti"])):
        raise InvalidToken("the token was revoked")
    bound = claims.get("cnf", {}).get("jkt") if isinstance(claims.get("cnf"), dict) else None
    if bound is not None:
        if scheme != "dpop":
            raise InvalidToken("this token is bound to a key: use the DPoP scheme with a proof")
        try:
            jkt = await dpop.verify_proof(
                svc, request, htm=request.method, htu=public_url(svc, request), access_token=token
            )
        except dpop.UseDPoPNonce as error:
            nonce_challenge = dpop.UseDPoPNonceAtResource(error.description)
            nonce_challenge.headers.update(error.headers)
            nonce_challenge.headers["WWW-Authenticate"] = 'DPoP error="use_dpop_nonce"'
            raise nonce_challenge from None
        except dpop.InvalidDPoPProof as error:
            proof_challenge = dpop.InvalidDPoPProofAtResource(error.description)
            proof_challenge.headers["WWW-Authenticate"] = 'DPoP error="invalid_dpop_proof"'
            raise proof_challenge from None
        if jkt != bound:
            raise InvalidToken("the DPoP proof is not signed by the key the token is bound to")
    elif scheme == "dpop":
        raise InvalidToken("this token is not bound to a key: use the Bearer scheme")
    return claims
