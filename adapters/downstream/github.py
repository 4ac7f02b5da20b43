"""GitHub repositories through a GitHub App (github.com or GitHub Enterprise Server).

The broker authenticates as the App with a JWT it signs itself (RS256 with the App's key,
read once from Vault and held as a key object; `iat` 60 s in the past against clock drift,
`exp` 9 min ahead - GitHub refuses more than 10 - and `iss` the App id), finds the
installation that covers the repository (`GET /repos/{owner}/{repo}/installation`, cached
for `INSTALLATION_TTL` seconds) and mints installation access tokens with
`POST /app/installations/{id}/access_tokens`, always narrowed to that ONE repository:

- for git (`remote`): `permissions: {contents: read}` (`write` only when asked);
- for the API look-ups (`repo_facts`, `user_permission`): `permissions: {metadata: read}`,
  cached per repository until `TOKEN_MARGIN` seconds before GitHub's `expires_at` and
  revoked at `close`.

Tokens are opaque strings: no length or prefix is assumed (GitHub is moving to a longer,
stateless format). `release` revokes early with `DELETE /installation/token`, authenticated
by the token itself. Git uses HTTP Basic with the username `x-access-token`.

Forge roles map to the broker's words as follows (GitHub's `role_name`; the legacy
`permission` field when `role_name` is absent): `admin` and `maintain` → "admin" (both
manage the repository, which is what the policy's "admin" means: may grant reviewers);
`write` → "write" (push); `triage` and `read` → "read" (neither may push); anything else,
or a user GitHub does not know (404) → "none". Custom repository roles carry the base role
in `permission`, which is used when `role_name` is not one of the above.

Errors: 404 → NotFound; 401, 403, 422, 5xx and network failures → UpstreamFailed with a
clear description; GitHub's own `message` goes to `log_detail` (it never holds a token).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from adapters.base import GitRemote, Permission, RepoFacts
from adapters.downstream.forge_api import Answer, call, check
from adapters.errors import ConfigurationError, NotFound, UpstreamFailed

JWT_BACKDATE = 60  # GitHub's advice: iat 60 s in the past against clock drift
JWT_LIFETIME = 540  # exp = now + 9 min: GitHub refuses exp more than 10 min after iat
INSTALLATION_TTL = 300.0  # seconds an installation id is trusted before looking again
TOKEN_MARGIN = 300.0  # an API token is replaced this many seconds before it expires
_API_VERSION = "2022-11-28"

_ROLES: dict[str, Permission] = {
    "admin": "admin",
    "maintain": "admin",
    "write": "write",
    "triage": "read",
    "read": "read",
}


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    expires_at: datetime


class GitHubAppHost:
    """Repositories reachable through one GitHub App (see the module docstring)."""

    def __init__(
        self,
        *,
        id: str,
        app_id: str,
        private_key_pem: str,
        api_url: str,
        git_url: str,
        http: aiohttp.ClientSession,
    ) -> None:
        self.id = id
        self._app_id = app_id
        self._key = _load_key(id, private_key_pem)
        self._api = api_url.rstrip("/")
        self._git = git_url.rstrip("/")
        self._http = http
        self._installations: dict[tuple[str, str], tuple[int, float]] = {}
        self._api_tokens: dict[tuple[str, str], _Token] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"GitHubAppHost(id={self.id!r}, app_id={self._app_id!r}, api_url={self._api!r})"

    # -- Lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Nothing to do before the first request."""

    async def close(self) -> None:
        """Revoke the cached API tokens (git tokens are the RemoteCache's to release)."""
        tokens, self._api_tokens = self._api_tokens, {}
        for token in tokens.values():
            try:
                await self._revoke(token.value)
            except UpstreamFailed:
                pass  # it expires within the hour anyway

    # -- RepoHost ------------------------------------------------------------------------
    async def repo_facts(self, owner: str, name: str) -> RepoFacts:
        answer = await self._call(
            "GET", _repo_path(owner, name), token=await self._api_token(owner, name)
        )
        self._check(answer, f"{owner}/{name}")
        body = answer.body
        account = body.get("owner") or {}
        visibility = body.get("visibility") or ("private" if body.get("private") else "public")
        login = str(account.get("login") or owner)
        return RepoFacts(
            namespace=login,
            visibility=str(visibility),
            organisation=login if account.get("type") == "Organization" else None,
            default_branch=body.get("default_branch"),
        )

    async def user_permission(self, owner: str, name: str, account: str | None) -> Permission:
        if not account:
            return "none"
        path = f"{_repo_path(owner, name)}/collaborators/{quote(account, safe='')}/permission"
        answer = await self._call("GET", path, token=await self._api_token(owner, name))
        if answer.status == 404:
            return "none"  # GitHub knows no such user (the repo itself was found above)
        self._check(answer, f"{owner}/{name}")
        role = answer.body.get("role_name")
        if isinstance(role, str) and role in _ROLES:
            return _ROLES[role]
        legacy = answer.body.get("permission")
        return _ROLES.get(legacy, "none") if isinstance(legacy, str) else "none"

    async def remote(
        self, owner: str, name: str, *, write: bool, principal_id: str, ttl: int
    ) -> GitRemote:
        """A `contents` token for this one repository; GitHub fixes its lifetime (one hour),
        so `ttl` only bounds how long the broker keeps it (RemoteCache, `release`)."""
        token = await self._mint(owner, name, {"contents": "write" if write else "read"})
        return GitRemote(
            url=f"{self._git}/{quote(owner)}/{quote(name)}.git",
            username="x-access-token",
            password=token.value,
            expires_at=token.expires_at,
            token_id=f"github-installation-token:{owner}/{name}",
            write=write,
        )

    async def release(self, remote: GitRemote) -> None:
        await self._revoke(remote.password)

    # -- GitHub App mechanics ------------------------------------------------------------
    def app_jwt(self) -> str:
        """The App's own JWT (RS256, iat now-60 s, exp now+9 min, iss the App id)."""
        now = int(time.time())
        claims = {"iat": now - JWT_BACKDATE, "exp": now + JWT_LIFETIME, "iss": self._app_id}
        return jwt.encode(claims, self._key, algorithm="RS256")

    async def _installation(self, owner: str, name: str) -> int:
        key = (owner.lower(), name.lower())
        cached = self._installations.get(key)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        answer = await self._call("GET", f"{_repo_path(owner, name)}/installation", app=True)
        self._check(answer, f"{owner}/{name}")
        installation = answer.body.get("id")
        if not isinstance(installation, int):
            raise UpstreamFailed(
                "GitHub answered without an installation id",
                log_detail=f"backend {self.id}: installation of {owner}/{name}",
            )
        self._installations[key] = (installation, time.monotonic() + INSTALLATION_TTL)
        return installation

    async def _mint(self, owner: str, name: str, permissions: dict[str, str]) -> _Token:
        """An installation token for `owner/name` only, with exactly `permissions`."""
        body = {"repositories": [name], "permissions": permissions}
        for attempt in (1, 2):
            installation = await self._installation(owner, name)
            answer = await self._call(
                "POST", f"/app/installations/{installation}/access_tokens", app=True, json=body
            )
            if answer.status == 404 and attempt == 1:
                # The App was uninstalled or reinstalled since the id was cached: look again.
                self._installations.pop((owner.lower(), name.lower()), None)
                continue
            if answer.status == 422:
                verb = "write to" if permissions.get("contents") == "write" else "read"
                raise UpstreamFailed(
                    f"the GitHub App may not {verb} {owner}/{name}",
                    log_detail=f"backend {self.id}: 422 {answer.message}",
                )
            self._check(answer, f"{owner}/{name}")
            return _parse_token(self.id, answer.body)
        raise NotFound(f"{owner}/{name} is not known at {self.id}")  # pragma: no cover

    async def _api_token(self, owner: str, name: str) -> str:
        key = (owner.lower(), name.lower())
        async with self._locks.setdefault(key, asyncio.Lock()):
            cached = self._api_tokens.get(key)
            if cached is not None and cached.expires_at.timestamp() - time.time() > TOKEN_MARGIN:
                return cached.value
            fresh = await self._mint(owner, name, {"metadata": "read"})
            self._api_tokens[key] = fresh
        if cached is not None:
            try:
                await self._revoke(cached.value)
            except UpstreamFailed:
                pass  # it expires by itself within minutes
        return fresh.value

    async def _revoke(self, token: str) -> None:
        answer = await self._call("DELETE", "/installation/token", token=token)
        if answer.status in (204, 401, 404):
            return  # 401: already revoked or expired - gone either way
        self._check(answer, "installation token")

    # -- HTTP ----------------------------------------------------------------------------
    async def _call(
        self,
        method: str,
        path: str,
        *,
        app: bool = False,
        token: str | None = None,
        json: Any = None,
    ) -> Answer:
        headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": _API_VERSION}
        if app:
            headers["Authorization"] = f"Bearer {self.app_jwt()}"
        elif token is not None:
            headers["Authorization"] = f"token {token}"
        answer = await call(
            self._http, method, f"{self._api}{path}", headers=headers, json=json,
            forge="GitHub", backend=self.id,
        )  # fmt: skip
        return answer if answer.body is not None else Answer(answer.status, {})

    def _check(self, answer: Answer, what: str) -> None:
        """Raise the broker error for a non-2xx answer."""
        check(answer, what, forge="GitHub", backend=self.id, refusals={
            401: "GitHub refused the broker's App credentials",
            403: "GitHub refused the request (permissions or rate limit)",
        })  # fmt: skip


def _repo_path(owner: str, name: str) -> str:
    return f"/repos/{quote(owner, safe='')}/{quote(name, safe='')}"


def _load_key(backend: str, pem: str) -> RSAPrivateKey:
    """Parse the App key once: PyJWT would re-parse a PEM string on every signature."""
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise ConfigurationError(
            f"backend {backend}: the GitHub App private key is not a PEM key"
        ) from None
    if not isinstance(key, RSAPrivateKey):
        raise ConfigurationError(f"backend {backend}: a GitHub App key is an RSA key")
    return key


def _parse_token(backend: str, body: dict[str, Any]) -> _Token:
    token, expires = body.get("token"), body.get("expires_at")
    if not isinstance(token, str) or not token or not isinstance(expires, str):
        raise UpstreamFailed(
            "GitHub answered without a token", log_detail=f"backend {backend}: access_tokens"
        )
    try:
        expires_at = datetime.fromisoformat(expires.replace("Z", "+00:00"))
    except ValueError:
        raise UpstreamFailed(
            "GitHub answered with an unreadable expiry", log_detail=f"backend {backend}"
        ) from None
    if expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=UTC)
    return _Token(token, expires_at)
