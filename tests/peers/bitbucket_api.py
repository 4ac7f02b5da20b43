"""A Bitbucket Data Center REST API stand-in for the endpoints the broker uses, on loopback.

Bitbucket Data Center cannot run here (it needs a licence and a JVM with GBs of memory).
This aiohttp server follows the Bitbucket Data Center 8.x REST API reference
(developer.atlassian.com/server/bitbucket/rest/v803: "Access tokens", "Repository",
"Permission Management") and Atlassian's "HTTP access tokens" page, where the broker reads
them:

- the broker authenticates with a service account's HTTP Basic credentials; a repository
  HTTP access token (Bearer only: "In Git and API calls, you can use the project and
  repository level token only with Bearer authentication") may read its repository but may
  not create or delete tokens ("You can't use a token to … create new tokens");
- `GET /rest/api/latest/projects/{projectKey}/repos/{repositorySlug}` → `{slug, id, name,
  scmId, state, forkable, public, project: {key, id, name, public, type, owner?}, links}`;
- `GET …/repos/{slug}/permissions/users?filter=` and
  `GET /rest/api/latest/projects/{projectKey}/permissions/users?filter=` → pages of
  `{user: {name, slug, displayName, …}, permission}`; paging is Bitbucket's
  `{size, limit, isLastPage, start, nextPageStart, values}` with `start`/`limit` parameters;
- `PUT /rest/access-tokens/latest/projects/{projectKey}/repos/{repositorySlug}` with
  `{name, permissions, expiryDays}` → 200 `{id, createdDate, name, permissions,
  expiryDays, expiryDate, user, token}` (ids are numeric strings; dates epoch millis);
  `DELETE …/repos/{repositorySlug}/{tokenId}` → 204;
- git smart HTTP `GET /scm/{projectKey}/{slug}.git/info/refs?service=…` with
  `Authorization: Bearer <token>` (REPO_READ; REPO_WRITE for receive-pack).

Errors are Bitbucket's `{"errors": [{"context", "message", "exceptionName"}]}`: 401
authentication failures, 404 `NoSuchRepositoryException`/`NoSuchProjectException`, 400
validation errors. Issued tokens are recorded with the request body; revocations too.
"""

from __future__ import annotations

import base64
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest_asyncio
from aiohttp import web

_LEVEL = {"REPO_READ": 1, "REPO_WRITE": 2, "REPO_ADMIN": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _errors(
    status: int, message: str, exception: str | None = None, context: Any = None
) -> web.Response:
    body = {"errors": [{"context": context, "message": message, "exceptionName": exception}]}
    return web.json_response(body, status=status)


@dataclass
class BbRepo:
    project: str  # project key, "~USER" for a personal project
    slug: str
    public: bool = False
    users: dict[str, str] = field(default_factory=dict)  # username -> REPO_* permission
    id: int = field(default_factory=lambda: secrets.randbelow(10**6))


@dataclass
class BbProject:
    key: str
    public: bool = False
    personal_owner: str | None = None  # user slug for a PERSONAL project
    users: dict[str, str] = field(default_factory=dict)  # username -> PROJECT_* permission
    id: int = field(default_factory=lambda: secrets.randbelow(10**6))


@dataclass
class BbToken:
    id: str
    project: str
    slug: str
    name: str
    permissions: list[str]
    expiry_days: int | None
    created: int  # epoch millis
    token: str
    request: dict[str, Any]
    revoked: bool = False

    def live(self) -> bool:
        if self.revoked:
            return False
        if self.expiry_days is None:
            return True
        return time.time() * 1000 < self.created + self.expiry_days * 86_400_000


@dataclass
class BitbucketApi:
    """Start with `await BitbucketApi.start()`; `await stop()`."""

    service_user: str = "binder-broker"
    service_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    port: int = 0
    projects: dict[str, BbProject] = field(default_factory=dict)
    repos: dict[tuple[str, str], BbRepo] = field(default_factory=dict)
    people: set[str] = field(default_factory=set)
    tokens: dict[str, BbToken] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, auth
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    async def start(cls) -> BitbucketApi:
        api = cls(port=free_port())
        app = web.Application()
        r = app.router
        base = "/rest/api/latest/projects/{key}"
        r.add_get(base + "/repos/{slug}", api._repo)
        r.add_get(base + "/repos/{slug}/permissions/users", api._repo_users)
        r.add_get(base + "/permissions/users", api._project_users)
        tokens = "/rest/access-tokens/latest/projects/{key}/repos/{slug}"
        r.add_put(tokens, api._create_token)
        r.add_delete(tokens + "/{token_id}", api._delete_token)
        r.add_get("/scm/{key}/{slug}.git/info/refs", api._info_refs)
        api._runner = web.AppRunner(app, access_log=None)
        await api._runner.setup()
        await web.TCPSite(api._runner, "127.0.0.1", api.port).start()
        return api

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def add_project(self, project: BbProject) -> BbProject:
        self.projects[project.key.upper()] = project
        return project

    def add_repo(self, repo: BbRepo) -> BbRepo:
        self.repos[(repo.project.upper(), repo.slug.lower())] = repo
        return repo

    # -- helpers -------------------------------------------------------------------------
    def _auth(self, request: web.Request) -> str | BbToken | None:
        """ "service" for the service account (Basic), a live token (Bearer), or None."""
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        self.requests.append((request.method, request.path, scheme))
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value).decode().partition(":")
            except ValueError:
                return None
            if user == self.service_user and secrets.compare_digest(
                password, self.service_password
            ):
                return "service"
            return None
        if scheme.lower() == "bearer":
            token = next((t for t in self.tokens.values() if t.token == value), None)
            return token if token is not None and token.live() else None
        return None

    @staticmethod
    def _unauthorized() -> web.Response:
        return _errors(
            401, "Authentication failed. Please check your credentials and try again.",
            "com.atlassian.bitbucket.auth.IncorrectPasswordAuthenticationException",
        )  # fmt: skip

    def _find(self, request: web.Request) -> BbRepo | web.Response:
        key, slug = request.match_info["key"].upper(), request.match_info["slug"].lower()
        if key not in self.projects:
            return _errors(
                404, f"Project {key} does not exist.",
                "com.atlassian.bitbucket.project.NoSuchProjectException",
            )  # fmt: skip
        repo = self.repos.get((key, slug))
        if repo is None:
            return _errors(
                404, f"Repository {key}/{slug} does not exist.",
                "com.atlassian.bitbucket.repository.NoSuchRepositoryException",
            )  # fmt: skip
        return repo

    def _page(self, request: web.Request, values: list[dict[str, Any]]) -> web.Response:
        start = int(request.query.get("start", "0"))
        limit = min(1000, int(request.query.get("limit", "25")))
        chunk = values[start : start + limit]
        last = start + limit >= len(values)
        page: dict[str, Any] = {
            "size": len(chunk), "limit": limit, "isLastPage": last, "start": start,
            "values": chunk,
        }  # fmt: skip
        if not last:
            page["nextPageStart"] = start + limit
        return web.json_response(page)

    def _user_json(self, name: str) -> dict[str, Any]:
        return {
            "name": name, "slug": name.lower(), "displayName": name.title(),
            "emailAddress": f"{name}@example.org", "active": True, "type": "NORMAL",
            "id": abs(hash(name)) % 10**6,
        }  # fmt: skip

    def _grants(self, request: web.Request, grants: dict[str, str]) -> web.Response:
        wanted = request.query.get("filter", "").lower()
        values = [
            {"user": self._user_json(name), "permission": permission}
            for name, permission in sorted(grants.items())
            if wanted in name.lower() or wanted in name.title().lower()
        ]
        return self._page(request, values)

    # -- endpoints -----------------------------------------------------------------------
    async def _repo(self, request: web.Request) -> web.Response:
        caller = self._auth(request)
        if caller is None:
            return self._unauthorized()
        repo = self._find(request)
        if isinstance(repo, web.Response):
            return repo
        if isinstance(caller, BbToken) and (caller.project, caller.slug) != (
            repo.project.upper(),
            repo.slug.lower(),
        ):
            return self._unauthorized()
        project = self.projects[repo.project.upper()]
        project_json: dict[str, Any] = {
            "key": project.key, "id": project.id, "name": project.key.title(),
            "public": project.public, "type": "PERSONAL" if project.personal_owner else "NORMAL",
        }  # fmt: skip
        if project.personal_owner:
            project_json["owner"] = self._user_json(project.personal_owner)
        clone = f"{self.url}/scm/{project.key.lower()}/{repo.slug}.git"
        browse = f"{self.url}/projects/{project.key}/repos/{repo.slug}/browse"
        return web.json_response({
            "slug": repo.slug, "id": repo.id, "name": repo.slug, "hierarchyId": "abc",
            "scmId": "git", "state": "AVAILABLE", "statusMessage": "Available",
            "forkable": True, "public": repo.public, "archived": False, "project": project_json,
            "links": {"clone": [{"href": clone, "name": "http"}],
                      "self": [{"href": browse}]},
        })  # fmt: skip

    async def _repo_users(self, request: web.Request) -> web.Response:
        if self._auth(request) != "service":
            return self._unauthorized()
        repo = self._find(request)
        if isinstance(repo, web.Response):
            return repo
        return self._grants(request, repo.users)

    async def _project_users(self, request: web.Request) -> web.Response:
        if self._auth(request) != "service":
            return self._unauthorized()
        project = self.projects.get(request.match_info["key"].upper())
        if project is None:
            return _errors(
                404, "Project does not exist.",
                "com.atlassian.bitbucket.project.NoSuchProjectException",
            )  # fmt: skip
        return self._grants(request, project.users)

    async def _create_token(self, request: web.Request) -> web.Response:
        caller = self._auth(request)
        if caller is None:
            return self._unauthorized()
        if caller != "service":  # a token may not create tokens
            return _errors(
                403, "You are not permitted to access this resource",
                "com.atlassian.bitbucket.AuthorisationException",
            )  # fmt: skip
        repo = self._find(request)
        if isinstance(repo, web.Response):
            return repo
        try:
            body = await request.json()
        except ValueError:
            return _errors(400, "The request body is not valid JSON.")
        name, permissions = body.get("name"), body.get("permissions")
        if not isinstance(name, str) or not name.strip():
            return _errors(400, "A name must be provided for the token.", None, "name")
        if (
            not isinstance(permissions, list) or not permissions
            or any(p not in _LEVEL for p in permissions)
        ):  # fmt: skip
            return _errors(
                400, "Repository tokens may only hold REPO_READ, REPO_WRITE or REPO_ADMIN.",
                None, "permissions",
            )  # fmt: skip
        days = body.get("expiryDays")
        if days is not None and (not isinstance(days, int) or days < 1):
            return _errors(400, "expiryDays must be a positive number of days.", None, "expiryDays")
        tid = str(secrets.randbelow(10**12))
        created = int(time.time() * 1000)
        secret = base64.b64encode(f"{tid}:".encode() + secrets.token_bytes(24)).decode()
        token = BbToken(
            id=tid, project=repo.project.upper(), slug=repo.slug.lower(), name=name,
            permissions=list(permissions), expiry_days=days, created=created,
            token=secret.rstrip("="),
            request=body,
        )  # fmt: skip
        self.tokens[tid] = token
        answer: dict[str, Any] = {
            "id": tid, "createdDate": created, "name": name, "permissions": token.permissions,
            "user": {"name": f"bot-{tid}", "slug": f"bot-{tid}", "type": "SERVICE",
                     "displayName": name, "active": True},
            "token": token.token,
        }  # fmt: skip
        if days is not None:
            answer["expiryDays"] = days
            answer["expiryDate"] = created + days * 86_400_000
        return web.json_response(answer)

    async def _delete_token(self, request: web.Request) -> web.Response:
        caller = self._auth(request)
        if caller is None:
            return self._unauthorized()
        if caller != "service":
            return _errors(
                403, "You are not permitted to access this resource",
                "com.atlassian.bitbucket.AuthorisationException",
            )  # fmt: skip
        repo = self._find(request)
        if isinstance(repo, web.Response):
            return repo
        token = self.tokens.get(request.match_info["token_id"])
        if (
            token is None
            or token.revoked
            or (token.project, token.slug) != (repo.project.upper(), repo.slug.lower())
        ):
            return _errors(
                404, "No access token exists with the given ID.",
                "com.atlassian.bitbucket.auth.NoSuchAccessTokenException",
            )  # fmt: skip
        token.revoked = True
        return web.Response(status=204)

    async def _info_refs(self, request: web.Request) -> web.Response:
        caller = self._auth(request)
        key, slug = request.match_info["key"].upper(), request.match_info["slug"].lower()
        challenge = {"WWW-Authenticate": 'Basic realm="Atlassian Bitbucket"'}
        if not isinstance(caller, BbToken) or (caller.project, caller.slug) != (key, slug):
            return web.Response(status=401, text="Authentication failed", headers=challenge)
        service = request.query.get("service", "")
        need = 2 if service == "git-receive-pack" else 1
        if max(_LEVEL[p] for p in caller.permissions) < need:
            return web.Response(status=403, text="Permission denied")
        line = f"# service={service}\n"
        return web.Response(
            body=f"{len(line) + 4:04x}{line}0000".encode(),
            content_type=f"application/x-{service}-advertisement",
        )


@pytest_asyncio.fixture
async def bitbucket_api() -> AsyncIterator[BitbucketApi]:
    """A fresh Bitbucket Data Center stand-in for one test."""
    api = await BitbucketApi.start()
    try:
        yield api
    finally:
        await api.stop()
