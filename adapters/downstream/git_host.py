"""Any git host over smart HTTP, reached with a secret kept in Vault.

Secrets are stored through the broker's `/v1/secrets` API (never readable back) at
`{prefix}/repo-secrets/{backend}/users/{principal id}` (a user's own) and
`{prefix}/repo-secrets/{backend}/orgs/{owner}` (for every repo of that owner), each
`{"username": …, "password": …}`. A user's own secret wins. The host has no API, so the
broker knows no facts beyond the configured visibility and nobody's forge permission.
"""

from __future__ import annotations

from urllib.parse import quote

from adapters.base import GitRemote, Permission, RepoFacts
from adapters.errors import NotFound
from adapters.vault import VaultClient


def user_secret_path(prefix: str, backend: str, principal_id: str) -> str:
    return f"{prefix}/repo-secrets/{backend}/users/{principal_id}"


def org_secret_path(prefix: str, backend: str, owner: str) -> str:
    return f"{prefix}/repo-secrets/{backend}/orgs/{quote(owner, safe='')}"


class GitSecretHost:
    """Repositories at `{url}/{owner}/{name}.git`, reached with a stored secret."""

    def __init__(
        self, *, id: str, url: str, visibility: str, vault: VaultClient, prefix: str
    ) -> None:
        self.id = id
        self._url = url
        self._visibility = visibility
        self._vault = vault
        self._prefix = prefix

    async def repo_facts(self, owner: str, name: str) -> RepoFacts:
        return RepoFacts(namespace=owner, visibility=self._visibility, organisation=owner)

    async def user_permission(self, owner: str, name: str, account: str | None) -> Permission:
        return "none"

    async def remote(
        self, owner: str, name: str, *, write: bool, principal_id: str, ttl: int
    ) -> GitRemote:
        for path in (
            user_secret_path(self._prefix, self.id, principal_id),
            org_secret_path(self._prefix, self.id, owner),
        ):
            entry = await self._vault.kv_read(path)
            if entry is not None:
                return GitRemote(
                    url=f"{self._url}/{quote(owner)}/{quote(name)}.git",
                    username=str(entry.data.get("username", "")),
                    password=str(entry.data["password"]),
                    write=write,
                )
        raise NotFound(f"no secret is stored for {owner}/{name} at {self.id}")

    async def release(self, remote: GitRemote) -> None:
        """A stored secret is not revoked by the broker: its owner replaces it."""
