"""Upstream git credentials the gateway uses, cached per (backend, repo, write, acting for).

A credential is reused until `REMOTE_MARGIN` seconds before it expires; a replaced one is
revoked early (`RepoHost.release`), and so is every cached one when the broker stops. They
never leave the broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import structlog

from adapters.base import GitRemote, RepoHost

log = structlog.get_logger(__name__)

REMOTE_MARGIN = 300.0  # seconds before expiry at which a credential is replaced

_Key = tuple[str, str, str, bool, str]


class RemoteCache:
    """Live upstream credentials, one per (backend, owner, name, write, acting_for)."""

    def __init__(self) -> None:
        self._remotes: dict[_Key, GitRemote] = {}
        self._locks: dict[_Key, asyncio.Lock] = {}
        self._releasing: set[asyncio.Task[None]] = set()

    async def get(
        self, host: RepoHost, owner: str, name: str, *, write: bool, acting_for: str, ttl: int
    ) -> GitRemote:
        """A credential for this one repo with at least `REMOTE_MARGIN` seconds to live."""
        key = (host.id, owner, name, write, acting_for)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._remotes.get(key)
            if cached is not None and _fresh(cached):
                return cached
            fresh = await host.remote(owner, name, write=write, principal_id=acting_for, ttl=ttl)
            self._remotes[key] = fresh
            if cached is not None:
                task = asyncio.create_task(_release_quietly(host, cached))
                self._releasing.add(task)
                task.add_done_callback(self._releasing.discard)
            return fresh

    def forget(self, host_id: str) -> None:
        """Drop (without revoking) every credential of one backend, e.g. after a 401."""
        for key in [k for k in self._remotes if k[0] == host_id]:
            del self._remotes[key]

    async def close(self, hosts: Mapping[str, RepoHost]) -> None:
        """Revoke every cached credential: the broker is stopping."""
        remotes, self._remotes = self._remotes, {}
        for key, remote in remotes.items():
            if key[0] in hosts:
                await _release_quietly(hosts[key[0]], remote)
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)


def _fresh(remote: GitRemote) -> bool:
    if remote.expires_at is None:
        return True
    return remote.expires_at.timestamp() - time.time() > REMOTE_MARGIN


async def _release_quietly(host: RepoHost, remote: GitRemote) -> None:
    try:
        await host.release(remote)
    except Exception:  # it expires by itself anyway
        log.warning("repo.release_failed", backend=host.id, token_id=remote.token_id)
