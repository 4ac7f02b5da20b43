"""Globus access tokens for a launch: the dependent tokens the Globus upstream keeps in Vault.

Contracts:
- The credential is an access token for one Globus resource server (Transfer, a collection's
  `data_access`, ...), as the user's Globus sign-in obtained it with the dependent-token grant
  (`adapters.upstream.globus`). `Grant.role` names the resource server as Globus does
  (`transfer.api.globus.org`, a collection id); without it the backend's default, or the only
  configured one, is used.
- The token is refreshed with its refresh token when it is about to expire. Globus chooses a
  token's lifetime (hours) and cannot shorten it, so the credential's `expires_at` is the
  earlier of the token's expiry and the grant's `ttl`; `details.token_expires_at` says when
  Globus itself stops honouring it.
- A user who did not sign in with the linked Globus upstream gets `AccessDenied`.
- The backend is built before the upstreams; `link_upstreams` connects it at start-up.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from adapters.base import Credential, Grant
from adapters.errors import ConfigurationError, InvalidRequest, UpstreamFailed
from adapters.upstream.globus import GlobusUpstream

__all__ = ["GlobusBackend", "link_upstreams"]


class GlobusBackend:
    """Issues the signed-in user's Globus token for one resource server (kind `globus_token`)."""

    def __init__(self, id: str, *, upstream: str, default_resource_server: str | None) -> None:
        self.id = id
        self.upstream_id = upstream
        self._default = default_resource_server
        self._upstream: GlobusUpstream | None = None

    def __repr__(self) -> str:
        return f"GlobusBackend(id={self.id!r}, upstream={self.upstream_id!r})"

    def link(self, upstream: GlobusUpstream) -> None:
        if self._default is not None and self._default not in upstream.resource_servers:
            raise ConfigurationError(
                f"backend {self.id}: default_resource_server {self._default!r} is not one of "
                f"upstream {upstream.id}'s dependent_scopes {list(upstream.resource_servers)}"
            )
        self._upstream = upstream

    async def issue(self, grant: Grant) -> Credential:
        upstream = self._upstream
        if upstream is None:
            raise UpstreamFailed(
                "Globus sign-in is not available in this process.",
                log_detail=f"backend {self.id} is not linked to upstream {self.upstream_id!r}",
            )
        servers = upstream.resource_servers
        resource_server = grant.role or self._default or (servers[0] if len(servers) == 1 else "")
        if not resource_server:
            raise InvalidRequest(
                f"name the Globus resource server as `role`: one of {sorted(servers)}"
            )
        token = await upstream.dependent_token(grant.principal, resource_server)
        now = datetime.now(UTC)
        token_expires = datetime.fromtimestamp(token.expires_at, UTC)
        expires_at = (
            min(token_expires, now + timedelta(seconds=grant.ttl)) if grant.ttl else (token_expires)
        )
        details: dict[str, Any] = {
            "resource_server": resource_server,
            "scope": token.scope,
            "token_expires_at": token_expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        return Credential(
            backend=self.id,
            kind="globus_token",
            secret={
                "access_token": token.access_token,
                "token_type": "Bearer",
                "resource_server": resource_server,
                "scope": token.scope,
            },
            expires_at=expires_at,
            lease_id=f"lease-{secrets.token_urlsafe(12)}",
            details=details,
        )


def link_upstreams(backends: Mapping[str, object], upstreams: Mapping[str, object]) -> None:
    """Connect every Globus backend to its Globus upstream; `ConfigurationError` when the
    named upstream is missing or is not a Globus one."""
    for backend in backends.values():
        if not isinstance(backend, GlobusBackend):
            continue
        upstream = upstreams.get(backend.upstream_id)
        if not isinstance(upstream, GlobusUpstream):
            raise ConfigurationError(
                f"backend {backend.id}: upstream {backend.upstream_id!r} is not a Globus upstream"
            )
        backend.link(upstream)
