"""`RemoteCache`: one upstream credential per (repo, write, acting for), replaced before it
expires, the replaced one released, every cached one released when the broker stops."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from adapters.base import GitRemote, Permission, RepoFacts
from broker.remotes import REMOTE_MARGIN, RemoteCache


class CountingHost:
    """A repo host that mints numbered credentials living `lifetime` seconds."""

    id = "forge"

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self.minted: list[str] = []
        self.released: list[str] = []

    async def repo_facts(self, owner: str, name: str) -> RepoFacts:
        return RepoFacts(namespace=owner, visibility="private")

    async def user_permission(self, owner: str, name: str, account: str | None) -> Permission:
        return "none"

    async def remote(
        self, owner: str, name: str, *, write: bool, principal_id: str, ttl: int
    ) -> GitRemote:
        await asyncio.sleep(0)
        token_id = f"t{len(self.minted) + 1}"
        self.minted.append(token_id)
        expires = datetime.now(UTC) + timedelta(seconds=self.lifetime)
        return GitRemote(f"https://forge/{owner}/{name}.git", "x", "secret", expires, token_id)

    async def release(self, remote: GitRemote) -> None:
        assert remote.token_id is not None
        self.released.append(remote.token_id)


async def test_a_live_credential_is_shared_by_concurrent_requests() -> None:
    host, cache = CountingHost(3600), RemoteCache()
    got = await asyncio.gather(
        *(cache.get(host, "o", "r", write=False, acting_for="u1", ttl=3600) for _ in range(5))
    )
    assert {g.token_id for g in got} == {"t1"} and host.minted == ["t1"]
    other = await cache.get(host, "o", "r", write=True, acting_for="u1", ttl=3600)
    assert other.token_id == "t2"  # write access never shares a read-only credential
    await cache.close({"forge": host})
    assert sorted(host.released) == ["t1", "t2"]


async def test_a_credential_close_to_expiry_is_replaced_and_released() -> None:
    host, cache = CountingHost(REMOTE_MARGIN - 1), RemoteCache()
    first = await cache.get(host, "o", "r", write=False, acting_for="u1", ttl=3600)
    second = await cache.get(host, "o", "r", write=False, acting_for="u1", ttl=3600)
    assert (first.token_id, second.token_id) == ("t1", "t2")
    await cache.close({"forge": host})
    assert sorted(host.released) == ["t1", "t2"]
