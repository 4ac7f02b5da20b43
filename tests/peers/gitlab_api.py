"""A GitLab REST API v4 stand-in for the endpoints the broker uses, on loopback.

GitLab cannot run here (it needs several GB and minutes to boot). This aiohttp server
follows the GitLab 17.x REST API documentation (docs.gitlab.com/api: "Project access
tokens API", "Deploy tokens API", "Projects API", "Group and project members API",
"Users API", "REST API" for pagination and errors) where the broker reads it:

- authentication with the `PRIVATE-TOKEN` header; unknown, revoked or expired tokens →
  401 `{"message": "401 Unauthorized"}`; a token that is not at least Maintainer → 403
  `{"message": "403 Forbidden"}`;
- projects addressed by numeric id or URL-encoded full path (`group%2Fsub%2Fproject`);
  an unknown project → 404 `{"message": "404 Project Not Found"}`;
- `GET /projects/:id` → `{id, name, path, path_with_namespace, visibility, default_branch,
  namespace: {id, name, path, kind, full_path}, …}`;
- `POST /projects/:id/access_tokens` `{name, scopes, access_level, expires_at}`:
  `expires_at` is a DATE `YYYY-MM-DD` (400 `{"error": "expires_at is invalid"}`
  otherwise), in the future and at most 365 days ahead; → 201 `{id, name, revoked,
  created_at, scopes, user_id, last_used_at, active, expires_at, access_level, token}`;
  `DELETE /projects/:id/access_tokens/:token_id` → 204 (404 when unknown or revoked);
- `POST /projects/:id/deploy_tokens` `{name, scopes, expires_at (ISO 8601), username}` →
  201 `{id, name, username, expires_at, token, scopes, revoked, expired}`; the deploy
  scopes are read_repository, read_registry, write_registry, read_package_registry,
  write_package_registry; `DELETE /projects/:id/deploy_tokens/:token_id` → 204;
- `GET /users?username=` → a paginated list (`x-page`, `x-per-page`, `x-total`,
  `x-total-pages`, `x-next-page`, `x-prev-page`, and a `Link` header);
- `GET /projects/:id/members/all/:user_id` → `{id, username, name, state, access_level,
  …}`, or 404 `{"message": "404 Not found"}` for a non-member;
- git smart HTTP `GET /{full_path}.git/info/refs?service=…` with HTTP Basic: a project
  access token with any non-empty username, a deploy token with its own username; the
  token needs `read_repository` (`write_repository` for receive-pack). A project access
  token ends at 00:00 UTC of its `expires_at` date.

Every issued token is recorded with the request body that created it, and revocations
are visible (`access_tokens`, `deploy_tokens`).
"""

from __future__ import annotations

import base64
import re
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote

import pytest_asyncio
from aiohttp import web

DEPLOY_SCOPES = {
    "read_repository", "read_registry", "write_registry", "read_package_registry",
    "write_package_registry",
}  # fmt: skip
PAT_SCOPES = {
    "api", "read_api", "read_registry", "write_registry", "read_repository",
    "write_repository", "create_runner", "manage_runner", "ai_features", "k8s_proxy",
}  # fmt: skip
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class GlProject:
    full_path: str  # "group/sub/project" or "user/project"
    namespace_kind: str = "group"  # or "user"
    visibility: str = "private"
    default_branch: str = "main"
    members: dict[int, int] = field(default_factory=dict)  # user id -> access level
    id: int = field(default_factory=lambda: 1000 + secrets.randbelow(10**6))

    @property
    def namespace(self) -> str:
        return self.full_path.rsplit("/", 1)[0]


@dataclass
class ProjectToken:
    id: int
    project_id: int
    name: str
    scopes: list[str]
    access_level: int
    expires_at: date
    token: str
    request: dict[str, Any]
    revoked: bool = False

    def live(self) -> bool:
        return not self.revoked and datetime.now(UTC).date() < self.expires_at


@dataclass
class DeployToken:
    id: int
    project_id: int
    name: str
    username: str
    scopes: list[str]
    expires_at: datetime | None
    token: str
    request: dict[str, Any]
    revoked: bool = False

    def live(self) -> bool:
        expired = self.expires_at is not None and self.expires_at <= datetime.now(UTC)
        return not self.revoked and not expired


@dataclass
class GitLabApi:
    """Start with `await GitLabApi.start()`; `await stop()`."""

    admin_token: str = field(default_factory=lambda: f"glpat-{secrets.token_urlsafe(15)}")
    admin_user_id: int = 1
    port: int = 0
    projects: dict[str, GlProject] = field(default_factory=dict)  # full path -> project
    users: dict[int, str] = field(default_factory=dict)  # id -> username
    access_tokens: dict[int, ProjectToken] = field(default_factory=dict)
    deploy_tokens: dict[int, DeployToken] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    _next_id: int = 40
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    async def start(cls) -> GitLabApi:
        api = cls(port=free_port())
        api.users[api.admin_user_id] = "broker-bot"
        app = web.Application()
        app.router.add_route("*", "/api/v4/{tail:.*}", api._api)
        app.router.add_get("/{repo:.+}.git/info/refs", api._info_refs)
        api._runner = web.AppRunner(app, access_log=None)
        await api._runner.setup()
        await web.TCPSite(api._runner, "127.0.0.1", api.port).start()
        return api

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def add_project(self, project: GlProject, *, broker_level: int = 40) -> GlProject:
        self.projects[project.full_path.lower()] = project
        project.members.setdefault(self.admin_user_id, broker_level)
        return project

    def add_user(self, username: str) -> int:
        uid = 100 + len(self.users)
        self.users[uid] = username
        return uid

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def _message(status: int, message: Any) -> web.Response:
        return web.json_response({"message": message}, status=status)

    def _project(self, ident: str) -> GlProject | None:
        ident = unquote(ident)
        if ident.isdigit():
            return next((p for p in self.projects.values() if p.id == int(ident)), None)
        return self.projects.get(ident.lower())

    def _caller(self, request: web.Request) -> str | ProjectToken | None:
        """ "admin" for the broker's token, a live project access token, or None."""
        value = request.headers.get("PRIVATE-TOKEN", "")
        if value and secrets.compare_digest(value, self.admin_token):
            return "admin"
        return next((t for t in self.access_tokens.values() if t.token == value and t.live()), None)

    def _project_json(self, p: GlProject) -> dict[str, Any]:
        namespace = p.namespace
        return {
            "id": p.id, "name": p.full_path.rsplit("/", 1)[1],
            "path": p.full_path.rsplit("/", 1)[1], "path_with_namespace": p.full_path,
            "name_with_namespace": p.full_path.replace("/", " / "),
            "visibility": p.visibility, "default_branch": p.default_branch,
            "http_url_to_repo": f"{self.url}/{p.full_path}.git",
            "web_url": f"{self.url}/{p.full_path}",
            "namespace": {
                "id": abs(hash(namespace)) % 10**6, "name": namespace.rsplit("/", 1)[-1],
                "path": namespace.rsplit("/", 1)[-1], "kind": p.namespace_kind,
                "full_path": namespace,
            },
        }  # fmt: skip

    # -- API dispatcher ------------------------------------------------------------------
    async def _api(self, request: web.Request) -> web.Response:
        # The raw path keeps `%2F` inside a project id encoded.
        raw = request.rel_url.raw_path.removeprefix("/api/v4/")
        parts = raw.split("/")
        self.requests.append((request.method, "/" + raw))
        caller = self._caller(request)
        if caller is None:
            return self._message(401, "401 Unauthorized")
        method = request.method
        if parts == ["users"] and method == "GET":
            return self._users(request)
        if len(parts) < 2 or parts[0] != "projects":
            return self._message(404, "404 Not Found")
        project = self._project(parts[1])
        if project is None:
            return self._message(404, "404 Project Not Found")
        if isinstance(caller, ProjectToken) and caller.project_id != project.id:
            return self._message(404, "404 Project Not Found")
        rest = parts[2:]
        if rest == [] and method == "GET":
            return web.json_response(self._project_json(project))
        if len(rest) == 3 and rest[:2] == ["members", "all"] and method == "GET":
            uid = int(rest[2]) if rest[2].isdigit() else -1
            level = project.members.get(uid)
            if level is None or uid not in self.users:
                return self._message(404, "404 Not found")
            return web.json_response({
                "id": uid, "username": self.users[uid], "name": self.users[uid].title(),
                "state": "active", "access_level": level, "expires_at": None,
                "created_at": "2024-01-01T00:00:00.000Z",
                "web_url": f"{self.url}/{self.users[uid]}",
            })  # fmt: skip
        # Token management needs the Maintainer role (40) or more.
        if caller != "admin" or project.members.get(self.admin_user_id, 0) < 40:
            return self._message(403, "403 Forbidden")
        if rest == ["access_tokens"] and method == "POST":
            return await self._create_pat(request, project)
        if rest == ["deploy_tokens"] and method == "POST":
            return await self._create_deploy(request, project)
        if len(rest) == 2 and method == "DELETE" and rest[1].isdigit():
            store: dict[int, Any] = {
                "access_tokens": self.access_tokens, "deploy_tokens": self.deploy_tokens,
            }.get(rest[0], {})  # fmt: skip
            token = store.get(int(rest[1]))
            if token is None or token.project_id != project.id or token.revoked:
                return self._message(404, "404 Not Found")
            token.revoked = True
            return web.Response(status=204)
        return self._message(404, "404 Not Found")

    def _users(self, request: web.Request) -> web.Response:
        wanted = request.query.get("username")
        found = [
            {"id": uid, "username": name, "name": name.title(), "state": "active",
             "locked": False, "avatar_url": None, "web_url": f"{self.url}/{name}"}
            for uid, name in sorted(self.users.items())
            if wanted is None or name.lower() == wanted.lower()
        ]  # fmt: skip
        page = max(1, int(request.query.get("page", "1")))
        per_page = min(100, max(1, int(request.query.get("per_page", "20"))))
        pages = max(1, -(-len(found) // per_page))
        chunk = found[(page - 1) * per_page : page * per_page]
        base = f"{self.url}/api/v4/users?per_page={per_page}"
        if wanted is not None:
            base += f"&username={quote(wanted)}"
        links = [f'<{base}&page=1>; rel="first"', f'<{base}&page={pages}>; rel="last"']
        if page < pages:
            links.insert(0, f'<{base}&page={page + 1}>; rel="next"')
        headers = {
            "x-page": str(page), "x-per-page": str(per_page), "x-total": str(len(found)),
            "x-total-pages": str(pages), "x-next-page": str(page + 1) if page < pages else "",
            "x-prev-page": str(page - 1) if page > 1 else "", "Link": ", ".join(links),
        }  # fmt: skip
        return web.json_response(chunk, headers=headers)

    async def _create_pat(self, request: web.Request, project: GlProject) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "400 Bad Request"}, status=400)
        name, scopes = body.get("name"), body.get("scopes")
        if not isinstance(name, str) or not name:
            return web.json_response({"error": "name is missing"}, status=400)
        if not isinstance(scopes, list) or not scopes or not set(scopes) <= PAT_SCOPES:
            return web.json_response({"error": "scopes does not have a valid value"}, status=400)
        level = body.get("access_level", 40)
        if level not in (10, 20, 30, 40, 50):
            return web.json_response(
                {"error": "access_level does not have a valid value"}, status=400
            )
        expires = body.get("expires_at")
        if not isinstance(expires, str) or not _DATE.match(expires):
            return web.json_response({"error": "expires_at is invalid"}, status=400)
        day = date.fromisoformat(expires)
        today = datetime.now(UTC).date()
        if day <= today:
            return self._message(400, {"expires_at": ["must be in the future"]})
        if day > today + timedelta(days=365):
            return self._message(
                400, {"expires_at": ["must be before " + str(today + timedelta(days=365))]}
            )
        token = ProjectToken(
            id=self._new_id(), project_id=project.id, name=name, scopes=list(scopes),
            access_level=level, expires_at=day, token=f"glpat-{secrets.token_urlsafe(15)}",
            request=body,
        )  # fmt: skip
        self.access_tokens[token.id] = token
        return web.json_response(
            {
                "id": token.id, "name": name, "revoked": False,
                "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "scopes": token.scopes, "user_id": 9000 + token.id, "last_used_at": None,
                "active": True, "expires_at": expires, "access_level": level,
                "token": token.token,
            },
            status=201,
        )  # fmt: skip

    async def _create_deploy(self, request: web.Request, project: GlProject) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "400 Bad Request"}, status=400)
        name, scopes = body.get("name"), body.get("scopes")
        if not isinstance(name, str) or not name:
            return web.json_response({"error": "name is missing"}, status=400)
        if not isinstance(scopes, list) or not scopes or not set(scopes) <= DEPLOY_SCOPES:
            return web.json_response({"error": "scopes does not have a valid value"}, status=400)
        expires_at: datetime | None = None
        if body.get("expires_at"):
            try:
                expires_at = datetime.fromisoformat(str(body["expires_at"]).replace("Z", "+00:00"))
            except ValueError:
                return web.json_response({"error": "expires_at is invalid"}, status=400)
            if expires_at.tzinfo is None:
                expires_at = expires_at.replace(tzinfo=UTC)
        tid = self._new_id()
        username = body.get("username") or f"gitlab+deploy-token-{tid}"
        token = DeployToken(
            id=tid, project_id=project.id, name=name, username=username, scopes=list(scopes),
            expires_at=expires_at, token=f"gldt-{secrets.token_urlsafe(15)}", request=body,
        )  # fmt: skip
        self.deploy_tokens[tid] = token
        return web.json_response(
            {
                "id": tid, "name": name, "username": username,
                "expires_at": expires_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
                if expires_at else None,
                "token": token.token, "scopes": token.scopes, "revoked": False, "expired": False,
            },
            status=201,
        )  # fmt: skip

    async def _info_refs(self, request: web.Request) -> web.Response:
        project = self.projects.get(request.match_info["repo"].lower())
        challenge = {"WWW-Authenticate": 'Basic realm="GitLab"'}
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        user, password = "", ""
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(encoded).decode().partition(":")
            except ValueError:
                pass
        scopes: list[str] | None = None
        if project is not None and user:
            for pat in self.access_tokens.values():
                if pat.token == password and pat.live() and pat.project_id == project.id:
                    scopes = pat.scopes
            for dt in self.deploy_tokens.values():
                if dt.token == password and dt.live() and dt.project_id == project.id:
                    scopes = dt.scopes if dt.username == user else None
        if project is None or scopes is None:
            return web.Response(status=401, text="HTTP Basic: Access denied", headers=challenge)
        service = request.query.get("service", "")
        need = "write_repository" if service == "git-receive-pack" else "read_repository"
        if need not in scopes and not (need == "read_repository" and "write_repository" in scopes):
            return web.Response(status=403, text="You are not allowed to push code")
        line = f"# service={service}\n"
        return web.Response(
            body=f"{len(line) + 4:04x}{line}0000".encode(),
            content_type=f"application/x-{service}-advertisement",
        )


@pytest_asyncio.fixture
async def gitlab_api() -> AsyncIterator[GitLabApi]:
    """A fresh GitLab stand-in for one test."""
    api = await GitLabApi.start()
    try:
        yield api
    finally:
        await api.stop()
