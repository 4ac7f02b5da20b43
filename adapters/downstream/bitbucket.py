"""Bitbucket Data Center repositories, reached with repository HTTP access tokens.

Why Data Center, not Bitbucket Cloud: Cloud's "repository access tokens" can only be made
in its web UI (its REST API 2.0 has no endpoint that creates one), so a broker cannot mint
one per lease there. Data Center's REST API does (Bitbucket Data Center 8.x, "Access
tokens" REST resource):

- `PUT /rest/access-tokens/latest/projects/{projectKey}/repos/{repositorySlug}` with
  `{name, permissions: ["REPO_READ"] | ["REPO_WRITE"], expiryDays}` → `{id, name,
  createdDate, ..., token}`; expiry is whole days, so the broker revokes the token itself
  when its lease ends: `DELETE …/repos/{repositorySlug}/{tokenId}`.
- Git over HTTPS with a project or repository token works "only with Bearer
  authentication" (Atlassian, "HTTP access tokens"): `GitRemote.username` is "" (Bearer).

The broker's own credential (`token`): Bitbucket does not let an HTTP access token create
further tokens ("You can't use a token to perform changes on behalf of a user (for
example, create new tokens…)"), so a service account's `username:password` is what
normally goes here (sent as HTTP Basic; that account needs REPO_ADMIN on the repositories
it serves). A value without a colon is sent as a Bearer token, for instances where that is
allowed.

Facts: `GET /rest/api/latest/projects/{key}/repos/{slug}` (`public`, `project.public`,
`project.type` NORMAL/PERSONAL; a personal project's namespace is its owner's user slug).
A user's permission: the highest of their explicit grants on the repository
(`GET …/repos/{slug}/permissions/users?filter=`) and on its project
(`GET /rest/api/latest/projects/{key}/permissions/users?filter=`), both paged with
`start`/`nextPageStart`. Grants through groups are not seen, which can only make the
answer lower (fail closed). REPO_ADMIN/PROJECT_ADMIN → "admin", REPO_WRITE/PROJECT_WRITE →
"write", REPO_READ/PROJECT_READ → "read", else "none".

`token_id` is `{projectKey}/{slug}/{id}` - no secret. Errors: 404 → NotFound; 401, 403,
400, 5xx and network failures → UpstreamFailed; Bitbucket's own `errors[].message` goes to
`log_detail` only.
"""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import aiohttp

from adapters.base import GitRemote, Permission, RepoFacts
from adapters.downstream.forge_api import Answer, call, check
from adapters.errors import InvalidRequest, NotFound, UpstreamFailed

_PAGE_LIMIT = 100
_MAX_PAGES = 50  # a filter by exact user name should never need more

_RANK: dict[str, tuple[int, Permission]] = {
    "REPO_READ": (1, "read"),
    "PROJECT_READ": (1, "read"),
    "REPO_WRITE": (2, "write"),
    "PROJECT_WRITE": (2, "write"),
    "REPO_ADMIN": (3, "admin"),
    "PROJECT_ADMIN": (3, "admin"),
}


class BitbucketHost:
    """Repositories of one Bitbucket Data Center instance (see the module docstring)."""

    def __init__(
        self, *, id: str, url: str, token: str, http: aiohttp.ClientSession,
        username: str | None = None,
    ) -> None:  # fmt: skip
        """`token` with `username`: a service account's password (HTTP Basic), since an
        HTTP access token cannot create tokens; without: a Bearer token."""
        self.id = id
        self._url = url.rstrip("/")
        self._http = http
        if username:
            basic = base64.b64encode(f"{username}:{token}".encode()).decode()
            self._authorization = f"Basic {basic}"
        else:
            self._authorization = f"Bearer {token}"

    def __repr__(self) -> str:
        return f"BitbucketHost(id={self.id!r}, url={self._url!r})"

    # -- RepoHost ------------------------------------------------------------------------
    async def repo_facts(self, owner: str, name: str) -> RepoFacts:
        answer = await self._call("GET", f"/rest/api/latest{_repo(owner, name)}")
        self._check(answer, f"{owner}/{name}")
        project = answer.body.get("project") or {}
        public = bool(answer.body.get("public")) or bool(project.get("public"))
        key = str(project.get("key") or owner)
        if project.get("type") == "PERSONAL":
            person = project.get("owner") or {}
            namespace = str(person.get("slug") or person.get("name") or key.lstrip("~"))
            organisation = None
        else:
            namespace = organisation = key
        return RepoFacts(
            namespace=namespace,
            visibility="public" if public else "private",
            organisation=organisation,
        )

    async def user_permission(self, owner: str, name: str, account: str | None) -> Permission:
        if not account:
            return "none"
        what = f"{owner}/{name}"
        grants = await self._pages(
            f"/rest/api/latest{_repo(owner, name)}/permissions/users", {"filter": account}, what
        )
        try:
            grants += await self._pages(
                f"/rest/api/latest/projects/{_key(owner)}/permissions/users",
                {"filter": account},
                what,
            )
        except NotFound:
            pass  # a personal project has no project-level grants to list
        best: tuple[int, Permission] = (0, "none")
        for grant in grants:
            user = grant.get("user") or {}
            names = {str(user.get("name", "")).lower(), str(user.get("slug", "")).lower()}
            if account.lower() in names:
                best = max(best, _RANK.get(str(grant.get("permission")), (0, "none")))
        return best[1]

    async def remote(
        self, owner: str, name: str, *, write: bool, principal_id: str, ttl: int
    ) -> GitRemote:
        if ttl <= 0:
            raise InvalidRequest("a repository credential needs a positive lifetime")
        lease_end = datetime.now(UTC) + timedelta(seconds=ttl)
        body = {
            "name": f"binder-broker-{secrets.token_hex(4)}",
            "permissions": ["REPO_WRITE" if write else "REPO_READ"],
            "expiryDays": max(1, -(-ttl // 86400)),  # whole days, rounded up
        }
        answer = await self._call(
            "PUT", f"/rest/access-tokens/latest{_repo(owner, name)}", json=body
        )
        self._check(answer, f"{owner}/{name}")
        token, token_id = answer.body.get("token"), answer.body.get("id")
        if not isinstance(token, str) or not token or token_id is None:
            raise UpstreamFailed("Bitbucket answered without an access token")
        return GitRemote(
            url=f"{self._url}/scm/{_key(owner).lower()}/{quote(name, safe='')}.git",
            username="",  # repository tokens work with Bearer only
            password=token,
            expires_at=lease_end,
            token_id=f"{owner}/{name}/{token_id}",
            write=write,
        )

    async def release(self, remote: GitRemote) -> None:
        parts = (remote.token_id or "").split("/")
        if len(parts) != 3 or not all(parts):
            raise InvalidRequest("not a Bitbucket token of this broker")
        owner, name, token_id = parts
        answer = await self._call(
            "DELETE", f"/rest/access-tokens/latest{_repo(owner, name)}/{quote(token_id)}"
        )
        if answer.status in (204, 200, 404):
            return  # 404: already gone
        self._check(answer, "the token", require_body=False)

    # -- HTTP ----------------------------------------------------------------------------
    async def _pages(self, path: str, params: dict[str, str], what: str) -> list[dict[str, Any]]:
        """Every value of a paged Bitbucket collection (`isLastPage`, `nextPageStart`)."""
        values: list[dict[str, Any]] = []
        start = 0
        for _ in range(_MAX_PAGES):
            query = {**params, "start": str(start), "limit": str(_PAGE_LIMIT)}
            answer = await self._call("GET", path, params=query)
            self._check(answer, what)
            values.extend(v for v in answer.body.get("values", []) if isinstance(v, dict))
            following = answer.body.get("nextPageStart")
            if answer.body.get("isLastPage", True) or not isinstance(following, int):
                break
            start = following
        return values

    async def _call(
        self, method: str, path: str, *, params: dict[str, str] | None = None, json: Any = None
    ) -> Answer:
        return await call(
            self._http, method, f"{self._url}{path}", params=params, json=json,
            headers={"Authorization": self._authorization, "Accept": "application/json"},
            forge="Bitbucket", backend=self.id,
        )  # fmt: skip

    def _check(self, answer: Answer, what: str, *, require_body: bool = True) -> None:
        check(
            answer, what, forge="Bitbucket", backend=self.id,
            body_type=dict if require_body else None, refusals={
                401: "Bitbucket refused the broker's credentials",
                403: "Bitbucket refused the broker's request (its permission on the repository)",
            },
        )  # fmt: skip


def _key(owner: str) -> str:
    return quote(owner, safe="~")


def _repo(owner: str, name: str) -> str:
    return f"/projects/{_key(owner)}/repos/{quote(name, safe='')}"
