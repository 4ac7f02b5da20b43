"""Repository credentials handed to a launcher through `/v1/credentials` (kind "git").

Where a launcher cannot use the gateway, it may ask for a credential of its own for ONE
repository: `{backend: "github", repo: "owner/name", duration}`. Each lease gets a fresh
forge token (never the gateway's cached one), so ending the lease revokes exactly it. Some
forges revoke a token only with the token itself (GitHub's `DELETE /installation/token`), so
the broker keeps it in Vault under `{prefix}/lease-secrets/{lease id}` until the lease ends;
the lease's `handle` holds only the token id.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from adapters.base import Credential, GitRemote, Grant, RepoHost
from adapters.vault import VaultClient


class RepoCredentialBackend:
    """`Backend` + `Revocable` over a repository host; `grant.resource` is `owner/name`
    (already allowed by Cedar `read_repo`)."""

    def __init__(self, host: RepoHost, *, vault: VaultClient, prefix: str, max_ttl: int) -> None:
        self.id = host.id
        self.host = host
        self._vault = vault
        self._prefix = prefix
        self.max_ttl = max_ttl

    def _vault_path(self, lease_id: str) -> str:
        return f"{self._prefix}/lease-secrets/{lease_id}"

    async def issue(self, grant: Grant) -> Credential:
        owner, _, name = grant.resource.rpartition("/")
        ttl = min(grant.ttl or self.max_ttl, self.max_ttl)
        remote = await self.host.remote(
            owner, name, write=False, principal_id=grant.principal.id, ttl=ttl
        )
        lease_id = f"lease-{secrets.token_urlsafe(12)}"
        expires_at = datetime.now(UTC) + timedelta(seconds=ttl)
        if remote.expires_at is not None:
            expires_at = min(expires_at, remote.expires_at)
        if remote.token_id is not None:
            await self._vault.kv_write(
                self._vault_path(lease_id),
                {"username": remote.username, "password": remote.password, "url": remote.url},
            )
        return Credential(
            backend=self.id,
            kind="git",
            secret={"url": remote.url, "username": remote.username, "password": remote.password},
            expires_at=expires_at,
            lease_id=lease_id,
            handle={"repo": grant.resource, "token_id": remote.token_id or ""},
            details={"repo": grant.resource, "url": remote.url, "read_only": True},
        )

    async def revoke(self, lease_id: str, handle: Mapping[str, str]) -> None:
        """Revoke the lease's forge token (a stored secret is left to its owner)."""
        if not handle.get("token_id"):
            return
        path = self._vault_path(lease_id)
        entry = await self._vault.kv_read(path)
        if entry is not None:
            await self.host.release(
                GitRemote(
                    url=str(entry.data.get("url", "")),
                    username=str(entry.data.get("username", "")),
                    password=str(entry.data.get("password", "")),
                    token_id=handle["token_id"],
                )
            )
        await self._vault.kv_delete(path)
