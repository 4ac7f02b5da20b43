"""A user's own secret, kept in Vault KV under the broker's prefix, handed to a launch.

Layout: `{prefix}/users/{principal id}/{name}` on the KV v2 mount. The broker only reads it
here; a later API stores it. The credential's lifetime is the grant's `max_ttl`, capped by
the backend's own `max_ttl`.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

from adapters.base import Credential, Grant
from adapters.errors import NotFound
from adapters.vault import VaultClient


class VaultSecretBackend:
    """Issues the signed-in user's stored secret `name` for at most `max_ttl` seconds."""

    def __init__(
        self, id: str, *, vault: VaultClient, prefix: str, name: str, max_ttl: int
    ) -> None:
        self.id = id
        self._vault = vault
        self._prefix = prefix
        self._name = name
        self._max_ttl = max_ttl

    def path_for(self, principal_id: str) -> str:
        return f"{self._prefix}/users/{principal_id}/{self._name}"

    async def issue(self, grant: Grant) -> Credential:
        entry = await self._vault.kv_read(self.path_for(grant.principal.id))
        if entry is None:
            raise NotFound(f"you have not stored a secret named {self._name!r}")
        lifetime = min(self._max_ttl, grant.ttl or grant.limits.max_ttl or self._max_ttl)
        return Credential(
            backend=self.id,
            kind="secret",
            secret=dict(entry.data),
            expires_at=datetime.now(UTC) + timedelta(seconds=lifetime),
            lease_id=f"lease-{secrets.token_urlsafe(12)}",
        )
