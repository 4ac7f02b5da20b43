"""GitLab repositories (gitlab.com or self-managed), REST API v4.

The broker holds one token of its own (`PRIVATE-TOKEN`; a Maintainer on the projects it
serves, able to create project access tokens or deploy tokens) and, for each lease, creates
a token for that ONE project:

- `project_access_token` (default): `POST /projects/:id/access_tokens` with
  `scopes: [read_repository]` (plus `write_repository` when asked), `access_level` 20
  (Reporter: may pull) or 30 (Developer: may push). GitLab's `expires_at` is a DATE (the
  token ends at 00:00 UTC of that day), so the broker asks for the day after the lease
  ends and revokes the token itself when the lease ends (`release`,
  `DELETE /projects/:id/access_tokens/:token_id`). Git authenticates with HTTP Basic; GitLab
  documents that "you can use any non-empty value" as the username, since only the token
  counts: the broker sends the token's name.
- `deploy_token`: `POST /projects/:id/deploy_tokens` with `scopes: [read_repository]` and
  `expires_at` the lease's end (deploy tokens take an ISO 8601 time); Basic with the
  `username` GitLab returns. Deploy tokens cannot push (GitLab has no `write_repository`
  deploy scope), so a write request is refused. `release` deletes it
  (`DELETE /projects/:id/deploy_tokens/:token_id`).

`GitRemote.expires_at` is the broker's own lease end (now + ttl), never GitLab's date.
`token_id` is `project_access_token:<url-encoded project path>:<id>` or
`deploy_token:<path>:<id>` - no secret.

Projects are addressed by their URL-encoded full path (`group%2Fsub%2Fproject`). Facts come
from `GET /projects/:id` (`visibility`, `namespace.kind`/`full_path`, `default_branch`);
a user's permission from `GET /users?username=` then `GET /projects/:id/members/all/:user_id`
(inherited membership included): access level 50 (Owner) and 40 (Maintainer) → "admin",
30 (Developer) → "write", 20 (Reporter) and 10 (Guest) → "read", anything else or no
membership → "none". Guests cannot read the code of private projects, but the policy
decides; the forge's own check still applies to anything the user does upstream.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote

import aiohttp

from adapters.base import GitRemote, Permission, RepoFacts
from adapters.downstream.forge_api import Answer, call, check
from adapters.errors import AccessDenied, InvalidRequest, UpstreamFailed

TokenKind = Literal["project_access_token", "deploy_token"]

_READ_LEVEL, _WRITE_LEVEL = 20, 30  # Reporter may pull, Developer may push


class GitLabHost:
    """Repositories of one GitLab instance (see the module docstring)."""

    def __init__(
        self,
        *,
        id: str,
        url: str,
        token: str,
        token_kind: TokenKind = "project_access_token",  # noqa: S107 - a kind, not a secret
        http: aiohttp.ClientSession,
    ) -> None:
        self.id = id
        self._url = url.rstrip("/")
        self._api = f"{self._url}/api/v4"
        self._token = token
        self._kind: TokenKind = token_kind
        self._http = http

    def __repr__(self) -> str:
        return f"GitLabHost(id={self.id!r}, url={self._url!r}, token_kind={self._kind!r})"

    # -- RepoHost ------------------------------------------------------------------------
    async def repo_facts(self, owner: str, name: str) -> RepoFacts:
        answer = await self._call("GET", f"/projects/{_project(owner, name)}")
        self._check(answer, f"{owner}/{name}")
        namespace = answer.body.get("namespace") or {}
        full_path = str(namespace.get("full_path") or owner)
        return RepoFacts(
            namespace=full_path,
            visibility=str(answer.body.get("visibility") or "private"),
            organisation=full_path if namespace.get("kind") == "group" else None,
            default_branch=answer.body.get("default_branch"),
        )

    async def user_permission(self, owner: str, name: str, account: str | None) -> Permission:
        if not account:
            return "none"
        users = await self._call("GET", "/users", params={"username": account})
        self._check(users, "user search", body_type=list)
        match = [
            u.get("id")
            for u in users.body
            if isinstance(u, dict) and str(u.get("username", "")).lower() == account.lower()
        ]
        if not match or not isinstance(match[0], int):
            return "none"
        user_id = match[0]
        member = await self._call("GET", f"/projects/{_project(owner, name)}/members/all/{user_id}")
        if member.status == 404 and "project" not in member.message.lower():
            return "none"  # "404 Not found": a user who is no member
        self._check(member, f"{owner}/{name}")
        level = member.body.get("access_level")
        if not isinstance(level, int):
            return "none"
        if level >= 40:
            return "admin"
        if level >= 30:
            return "write"
        if level >= 10:
            return "read"
        return "none"

    async def remote(
        self, owner: str, name: str, *, write: bool, principal_id: str, ttl: int
    ) -> GitRemote:
        if ttl <= 0:
            raise InvalidRequest("a repository credential needs a positive lifetime")
        project = _project(owner, name)
        now = datetime.now(UTC)
        lease_end = now + timedelta(seconds=ttl)
        label = f"binder-broker-{secrets.token_hex(4)}"
        url = f"{self._url}/{quote(owner)}/{quote(name)}.git"
        if self._kind == "deploy_token":
            if write:
                raise AccessDenied(
                    f"backend {self.id} hands out GitLab deploy tokens, which cannot push"
                )
            body: dict[str, Any] = {
                "name": label,
                "scopes": ["read_repository"],
                "expires_at": lease_end.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            answer = await self._call("POST", f"/projects/{project}/deploy_tokens", json=body)
            self._check(answer, f"{owner}/{name}")
            token, username = answer.body.get("token"), answer.body.get("username")
            if not isinstance(token, str) or not isinstance(username, str):
                raise UpstreamFailed("GitLab answered without a deploy token")
            return GitRemote(
                url=url, username=username, password=token, expires_at=lease_end,
                token_id=f"deploy_token:{project}:{answer.body.get('id')}", write=False,
            )  # fmt: skip
        # A project access token lives until 00:00 UTC of its expiry date: ask for the day
        # after the lease ends, so GitLab never ends it early; the broker revokes it itself.
        expires = (lease_end + timedelta(days=1)).date().isoformat()
        scopes = ["read_repository", "write_repository"] if write else ["read_repository"]
        body = {
            "name": label,
            "scopes": scopes,
            "access_level": _WRITE_LEVEL if write else _READ_LEVEL,
            "expires_at": expires,
        }
        answer = await self._call("POST", f"/projects/{project}/access_tokens", json=body)
        self._check(answer, f"{owner}/{name}")
        token = answer.body.get("token")
        if not isinstance(token, str) or not token:
            raise UpstreamFailed("GitLab answered without a project access token")
        return GitRemote(
            url=url, username=str(answer.body.get("name") or label), password=token,
            expires_at=lease_end,
            token_id=f"project_access_token:{project}:{answer.body.get('id')}", write=write,
        )  # fmt: skip

    async def release(self, remote: GitRemote) -> None:
        kind, project, token_id = _split_token_id(remote.token_id)
        path = "access_tokens" if kind == "project_access_token" else "deploy_tokens"
        answer = await self._call("DELETE", f"/projects/{project}/{path}/{token_id}")
        if answer.status in (204, 404):
            return  # 404: already gone (revoked, expired and cleaned up, project deleted)
        self._check(answer, "the token", body_type=None)

    # -- HTTP ----------------------------------------------------------------------------
    async def _call(
        self, method: str, path: str, *, params: dict[str, str] | None = None, json: Any = None
    ) -> Answer:
        return await call(
            self._http, method, f"{self._api}{path}", params=params, json=json,
            headers={"PRIVATE-TOKEN": self._token, "Accept": "application/json"},
            forge="GitLab", backend=self.id,
        )  # fmt: skip

    def _check(self, answer: Answer, what: str, *, body_type: type | None = dict) -> None:
        check(answer, what, forge="GitLab", backend=self.id, body_type=body_type, refusals={
            400: "GitLab refused the token request",
            401: "GitLab refused the broker's token",
            403: "GitLab refused the broker's request (its role on the project)",
        })  # fmt: skip


def _project(owner: str, name: str) -> str:
    """GitLab's project id: the URL-encoded full path (`group%2Fsub%2Fproject`)."""
    return quote(f"{owner}/{name}", safe="")


def _split_token_id(token_id: str | None) -> tuple[str, str, str]:
    parts = (token_id or "").split(":")
    if len(parts) != 3 or parts[0] not in ("project_access_token", "deploy_token"):
        raise InvalidRequest("not a GitLab token of this broker")
    kind, project, number = parts
    if not number.isdigit() or not project or "/" in project:
        raise InvalidRequest("not a GitLab token of this broker")
    return kind, project, number
