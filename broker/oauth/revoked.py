"""The shared list of revoked access-token ids (RFC 7009), kept in the cache.

An entry lives until the token would have expired anyway (plus the clock skew), so the list
never outgrows the tokens in circulation. Every replica sharing the cache sees it.
"""

from __future__ import annotations

import time

from broker.cache import Cache


def revoked_key(jti: str) -> str:
    return f"revoked-jti:{jti}"


async def revoke_jti(cache: Cache, jti: str, expires_at: float, clock_skew: float) -> None:
    """Put `jti` on the revoked list until `expires_at` + `clock_skew`."""
    remaining = expires_at - time.time() + clock_skew
    if remaining > 0:
        await cache.set(revoked_key(jti), "1", remaining)


async def jti_revoked(cache: Cache, jti: str) -> bool:
    return await cache.get(revoked_key(jti)) is not None
