"""Refresh tokens: opaque, stored as SHA-256 hashes, rotated on every use.

Each use marks the token used and issues its successor in the same family. Presenting a
used token again means it leaked (RFC 9700 §4.14.2): the whole family is revoked, and the
legitimate holder signs in again. Revoking a family (or a client's tokens for a user) also
revokes the access tokens issued with it (RFC 7009 §2.1): each refresh token's grant records
the jti and expiry of the access token minted beside it (`access_jti`, `access_exp`). The
"mark used" update is conditional, so two replicas racing on one token cannot both win.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from broker.cache import Cache
from broker.errors import InvalidGrant
from broker.oauth.revoked import revoke_jti
from broker.storage import Database, RefreshTokenRecord


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class RefreshGrant:
    """What a refresh token stands for."""

    family_id: str
    client_id: str
    subject: str
    grant: dict[str, Any]
    expires_at: datetime


class ReuseDetected(InvalidGrant):
    """A used refresh token came back; its family has been revoked."""


class RefreshStore:
    def __init__(self, db: Database, ttl: int, *, cache: Cache, clock_skew: float) -> None:
        self._db = db
        self._ttl = ttl
        self._cache = cache
        self._clock_skew = clock_skew

    async def create(
        self, *, client_id: str, subject: str, grant: dict[str, Any], family_id: str | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[str, str]:  # fmt: skip
        """A new refresh token (returned once, stored only as a hash) and its family id."""
        token = "rt_" + secrets.token_urlsafe(32)
        family = family_id or "rf_" + secrets.token_urlsafe(12)
        now = datetime.now(UTC)
        record = RefreshTokenRecord(
            token_hash=token_hash(token),
            family_id=family,
            client_id=client_id,
            subject=subject,
            grant=grant,
            created_at=now,
            expires_at=expires_at or now + timedelta(seconds=self._ttl),
            used_at=None,
            revoked=False,
        )
        async with self._db.sessions() as session, session.begin():
            session.add(record)
        return token, family

    async def lookup(self, token: str) -> RefreshTokenRecord | None:
        async with self._db.sessions() as session:
            return await session.get(RefreshTokenRecord, token_hash(token))

    async def use(self, token: str, client_id: str) -> RefreshGrant:
        """Consume `token` for `client_id`. Raises InvalidGrant (ReuseDetected on reuse)."""
        digest = token_hash(token)
        now = datetime.now(UTC)
        async with self._db.sessions() as session, session.begin():
            record = await session.get(RefreshTokenRecord, digest)
            if record is None or record.client_id != client_id:
                # A token of another client is treated as unknown and changes nothing.
                raise InvalidGrant("the refresh token is not valid")
            if record.revoked:
                raise InvalidGrant("the refresh token was revoked")
            if record.expires_at <= now:
                raise InvalidGrant("the refresh token has expired")
            claimed = await session.execute(
                update(RefreshTokenRecord)
                .where(
                    RefreshTokenRecord.token_hash == digest, RefreshTokenRecord.used_at.is_(None)
                )
                .values(used_at=now)
            )
            if getattr(claimed, "rowcount", 0) != 1:
                family = record.family_id
            else:
                return RefreshGrant(
                    record.family_id, record.client_id, record.subject, dict(record.grant),
                    record.expires_at,
                )  # fmt: skip
        await self.revoke_family(family)
        raise ReuseDetected("the refresh token was already used; its whole family is revoked")

    async def revoke_family(self, family_id: str) -> int:
        """Revoke every refresh token of the family and the access tokens issued with them;
        returns how many refresh tokens there were."""
        return await self._revoke(RefreshTokenRecord.family_id == family_id)

    async def revoke_for(self, client_id: str, subject: str) -> int:
        """Revoke every refresh token `client_id` holds for `subject` (consent withdrawn),
        and the access tokens issued with them."""
        return await self._revoke(
            RefreshTokenRecord.client_id == client_id, RefreshTokenRecord.subject == subject
        )

    async def _revoke(self, *where: Any) -> int:
        async with self._db.sessions() as session, session.begin():
            grants = list(await session.scalars(select(RefreshTokenRecord.grant).where(*where)))
            await session.execute(update(RefreshTokenRecord).where(*where).values(revoked=True))
        for grant in grants:
            jti, expires_at = grant.get("access_jti"), grant.get("access_exp")
            if isinstance(jti, str) and isinstance(expires_at, int | float):
                await revoke_jti(self._cache, jti, expires_at, self._clock_skew)
        return len(grants)

    async def family_active(self, family_id: str) -> bool:
        async with self._db.sessions() as session:
            rows = await session.execute(
                select(RefreshTokenRecord.token_hash).where(
                    RefreshTokenRecord.family_id == family_id,
                    RefreshTokenRecord.revoked.is_(False),
                )
            )
            return rows.first() is not None
