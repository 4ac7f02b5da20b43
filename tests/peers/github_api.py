"""A GitHub REST API stand-in for the GitHub App endpoints the broker uses, on loopback.

GitHub cannot run here. This aiohttp server follows the GitHub REST API documentation,
API version 2022-11-28 (docs.github.com/en/rest, "Apps", "Repositories", "Collaborators"),
and "Generating a JSON Web Token (JWT) for a GitHub App", field for field where the broker
reads them:

- `GET /repos/{owner}/{repo}/installation` (App JWT) → the installation object, or 404;
- `POST /app/installations/{installation_id}/access_tokens` (App JWT) with optional
  `repositories` (names), `repository_ids` and `permissions` → 201 `{token, expires_at,
  permissions, repository_selection, repositories}`; 422 when a repository is outside the
  installation ("There is at least one repository that does not exist or is not accessible
  to the parent installation.") or a permission exceeds what the installation was granted
  ("The permissions requested are not granted to this installation."); tokens last one
  hour and have no fixed length (GitHub warns against assuming 40 characters);
- `DELETE /installation/token` (the installation token itself) → 204;
- `GET /repos/{owner}/{repo}` and `GET /repos/{owner}/{repo}/collaborators/{username}/permission`
  (installation token) → the repository; `{permission, role_name, user}` where `permission`
  is the legacy base role (maintain → write, triage → read); 404 for an unknown user;
- git smart HTTP `GET {git_url}/{owner}/{repo}.git/info/refs?service=…` with HTTP Basic
  `x-access-token:<token>`, which needs `contents` read (write for receive-pack).

The App JWT is verified the way GitHub does: RS256 only, signed by the App's key (the
public half is registered here), `iss` the App id, `iat` an integer not in the future
(`JWT_LEEWAY` seconds of drift allowed), `exp` an integer in the future and at most 10
minutes after `iat`. Failures answer 401 with GitHub's messages, e.g. "'Expiration time'
claim ('exp') is too far in the future". Installation tokens that are unknown, expired or
revoked answer 401 "Bad credentials". Error bodies are GitHub's `{"message",
"documentation_url", "status"}`.

The stand-in records every request (`requests`), every token it issued (`tokens`, with the
request body) and which were revoked, so tests can assert what the broker asked for.
"""

from __future__ import annotations

import base64
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

DOCS = "https://docs.github.com/rest"
JWT_LEEWAY = 30  # seconds of clock drift tolerated on `iat`
JWT_MAX_LIFETIME = 600  # GitHub: exp at most 10 minutes after iat
TOKEN_LIFETIME = 3600

_LEGACY = {"admin": "admin", "maintain": "write", "write": "write", "triage": "read"}
_LEVEL = {"read": 1, "write": 2, "admin": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class GhRepo:
    owner: str
    name: str
    installation_id: int
    private: bool = True
    owner_type: str = "Organization"  # or "User"
    default_branch: str = "main"
    collaborators: dict[str, str] = field(default_factory=dict)  # login -> role_name
    id: int = field(default_factory=lambda: secrets.randbelow(10**9))


@dataclass
class IssuedToken:
    value: str
    installation_id: int
    repositories: list[str] | None  # repo names; None = every repo of the installation
    permissions: dict[str, str]
    expires_at: datetime
    request: dict[str, Any]
    revoked: bool = False


@dataclass
class Recorded:
    method: str
    path: str
    authorization: str | None
    body: Any


@dataclass
class GitHubApi:
    """Start with `await GitHubApi.start()`; `await stop()`. Add repos with `add_repo`."""

    app_id: int = 424242
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    port: int = 0
    repos: dict[tuple[str, str], GhRepo] = field(default_factory=dict)
    # installation id -> (account login, account type, granted permissions)
    installations: dict[int, tuple[str, str, dict[str, str]]] = field(default_factory=dict)
    users: set[str] = field(default_factory=set)
    tokens: dict[str, IssuedToken] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/v3"

    @property
    def git_url(self) -> str:
        return f"{self.url}/git"

    @property
    def private_key_pem(self) -> str:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ).decode()

    @classmethod
    async def start(cls) -> GitHubApi:
        api = cls(port=free_port())
        app = web.Application()
        r = app.router
        r.add_get("/api/v3/repos/{owner}/{repo}/installation", api._installation)
        r.add_post("/api/v3/app/installations/{iid}/access_tokens", api._access_tokens)
        r.add_delete("/api/v3/installation/token", api._revoke)
        r.add_get("/api/v3/repos/{owner}/{repo}", api._repo)
        r.add_get("/api/v3/repos/{owner}/{repo}/collaborators/{user}/permission", api._permission)
        r.add_get("/git/{owner}/{repo}.git/info/refs", api._info_refs)
        api._runner = web.AppRunner(app, access_log=None)
        await api._runner.setup()
        await web.TCPSite(api._runner, "127.0.0.1", api.port).start()
        return api

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- set-up --------------------------------------------------------------------------
    def add_installation(
        self, iid: int, account: str, *, kind: str = "Organization",
        permissions: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        # Every GitHub App holds metadata:read; it cannot be withdrawn.
        granted = {"metadata": "read", **(permissions or {"contents": "write"})}
        self.installations[iid] = (account, kind, granted)

    def add_repo(self, repo: GhRepo) -> GhRepo:
        self.repos[(repo.owner.lower(), repo.name.lower())] = repo
        return repo

    def app_jwt(self, **overrides: Any) -> str:
        """A JWT as a correct App would sign it, with `overrides` applied (tests)."""
        now = int(time.time())
        claims: dict[str, Any] = {"iat": now - 60, "exp": now + 540, "iss": str(self.app_id)}
        claims.update(overrides)
        return jwt.encode(claims, self.key, algorithm="RS256")

    # -- views for tests -----------------------------------------------------------------
    def live(self, value: str) -> IssuedToken | None:
        token = self.tokens.get(value)
        if token is None or token.revoked or token.expires_at <= datetime.now(UTC):
            return None
        return token

    def issued_bodies(self) -> list[dict[str, Any]]:
        return [t.request for t in self.tokens.values()]

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def _error(status: int, message: str, docs: str = DOCS) -> web.Response:
        body = {"message": message, "documentation_url": docs, "status": str(status)}
        return web.json_response(body, status=status)

    def _record(self, request: web.Request, body: Any = None) -> None:
        self.requests.append(
            Recorded(request.method, request.path, request.headers.get("Authorization"), body)
        )

    def _check_jwt(self, request: web.Request) -> web.Response | None:
        """None when the request carries a valid App JWT, else GitHub's 401 answer."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            return self._error(401, "Requires authentication")
        if scheme.lower() != "bearer" or token.count(".") != 2:
            return self._error(401, "A JSON web token could not be decoded")
        try:
            unverified = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return self._error(401, "A JSON web token could not be decoded")
        if unverified.get("alg") != "RS256":
            return self._error(401, "A JSON web token could not be decoded")
        iss = claims.get("iss")
        if not str(iss).isdigit():
            return self._error(401, "'Issuer' claim ('iss') must be an Integer")
        if int(str(iss)) != self.app_id:
            return self._error(401, "Integration not found")
        try:
            jwt.decode(
                token, self.key.public_key(), algorithms=["RS256"],
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )  # fmt: skip
        except jwt.PyJWTError:
            return self._error(401, "A JSON web token could not be decoded")
        now = int(time.time())
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or iat > now + JWT_LEEWAY:
            return self._error(
                401,
                "'Issued at' claim ('iat') must be an Integer representing the time that "
                "the assertion was issued",
            )
        if not isinstance(exp, int) or exp <= now:
            return self._error(
                401,
                "'Expiration time' claim ('exp') must be a numeric value representing the "
                "future time at which the assertion expires",
            )
        if exp - iat > JWT_MAX_LIFETIME or exp > now + JWT_MAX_LIFETIME + JWT_LEEWAY:
            return self._error(401, "'Expiration time' claim ('exp') is too far in the future")
        return None

    def _installation_token(self, request: web.Request) -> IssuedToken | web.Response:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() not in ("token", "bearer") or not value:
            return self._error(401, "Requires authentication")
        token = self.live(value)
        if token is None:
            return self._error(401, "Bad credentials")
        return token

    def _covers(self, token: IssuedToken, repo: GhRepo) -> bool:
        if repo.installation_id != token.installation_id:
            return False
        return token.repositories is None or repo.name.lower() in token.repositories

    def _repo_json(self, repo: GhRepo) -> dict[str, Any]:
        account, kind = repo.owner, repo.owner_type
        return {
            "id": repo.id, "node_id": f"R_{repo.id}", "name": repo.name,
            "full_name": f"{repo.owner}/{repo.name}", "private": repo.private,
            "owner": {"login": account, "id": abs(hash(account)) % 10**8, "type": kind,
                      "site_admin": False},
            "html_url": f"{self.git_url}/{repo.owner}/{repo.name}",
            "url": f"{self.api_url}/repos/{repo.owner}/{repo.name}", "fork": False,
            "default_branch": repo.default_branch,
            "visibility": "private" if repo.private else "public",
        }  # fmt: skip

    # -- endpoints -----------------------------------------------------------------------
    async def _installation(self, request: web.Request) -> web.Response:
        self._record(request)
        refused = self._check_jwt(request)
        if refused is not None:
            return refused
        repo = self.repos.get(
            (request.match_info["owner"].lower(), request.match_info["repo"].lower())
        )
        if repo is None or repo.installation_id not in self.installations:
            return self._error(
                404, "Not Found",
                f"{DOCS}/apps/apps#get-a-repository-installation-for-the-authenticated-app",
            )  # fmt: skip
        account, kind, granted = self.installations[repo.installation_id]
        iid = repo.installation_id
        return web.json_response({
            "id": iid, "app_id": self.app_id, "target_type": kind,
            "account": {"login": account, "type": kind},
            "repository_selection": "selected", "permissions": granted, "events": [],
            "access_tokens_url": f"{self.api_url}/app/installations/{iid}/access_tokens",
            "repositories_url": f"{self.api_url}/installation/repositories",
            "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z",
            "single_file_name": None,
        })  # fmt: skip

    async def _access_tokens(self, request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            body = None
        self._record(request, body)
        refused = self._check_jwt(request)
        if refused is not None:
            return refused
        iid = int(request.match_info["iid"])
        if iid not in self.installations:
            return self._error(404, "Not Found")
        if not isinstance(body, dict):
            return self._error(400, "Problems parsing JSON")
        granted = self.installations[iid][2]
        members = {r.name.lower(): r for r in self.repos.values() if r.installation_id == iid}
        by_id = {r.id: r for r in members.values()}
        names: list[str] | None = None
        if "repositories" in body or "repository_ids" in body:
            wanted = [str(n).lower() for n in body.get("repositories") or []]
            ids = body.get("repository_ids") or []
            if any(n not in members for n in wanted) or any(i not in by_id for i in ids):
                return self._error(
                    422,
                    "There is at least one repository that does not exist or is not "
                    "accessible to the parent installation.",
                )
            names = sorted(set(wanted) | {by_id[i].name.lower() for i in ids})
        permissions = body.get("permissions") or dict(granted)
        for scope, level in permissions.items():
            if _LEVEL.get(level, 9) > _LEVEL.get(granted.get(scope, ""), 0):
                return self._error(
                    422, "The permissions requested are not granted to this installation."
                )
        # GitHub's formats vary (ghs_ + 36 characters, or the longer stateless format).
        value = f"ghs_{secrets.token_urlsafe(secrets.choice([27, 45, 90]))}"
        expires = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=TOKEN_LIFETIME)
        self.tokens[value] = IssuedToken(value, iid, names, dict(permissions), expires, body)
        repositories = [self._repo_json(members[n]) for n in names or sorted(members)]
        return web.json_response(
            {
                "token": value,
                "expires_at": _iso(expires),
                "permissions": permissions,
                "repository_selection": "selected" if names is not None else "all",
                "repositories": repositories,
            },
            status=201,
        )

    async def _revoke(self, request: web.Request) -> web.Response:
        self._record(request)
        token = self._installation_token(request)
        if isinstance(token, web.Response):
            return token
        token.revoked = True
        return web.Response(status=204)

    async def _repo(self, request: web.Request) -> web.Response:
        self._record(request)
        token = self._installation_token(request)
        if isinstance(token, web.Response):
            return token
        repo = self.repos.get(
            (request.match_info["owner"].lower(), request.match_info["repo"].lower())
        )
        if repo is None or not self._covers(token, repo):
            return self._error(404, "Not Found", f"{DOCS}/repos/repos#get-a-repository")
        return web.json_response(self._repo_json(repo))

    async def _permission(self, request: web.Request) -> web.Response:
        self._record(request)
        token = self._installation_token(request)
        if isinstance(token, web.Response):
            return token
        repo = self.repos.get(
            (request.match_info["owner"].lower(), request.match_info["repo"].lower())
        )
        docs = f"{DOCS}/collaborators/collaborators#get-repository-permissions-for-a-user"
        if repo is None or not self._covers(token, repo):
            return self._error(404, "Not Found", docs)
        login = request.match_info["user"]
        if login.lower() not in {u.lower() for u in self.users}:
            return self._error(404, "Not Found", docs)
        role = repo.collaborators.get(login.lower())
        if role is None:
            role = "none" if repo.private else "read"
        permission = _LEGACY.get(role, role)
        return web.json_response({
            "permission": permission, "role_name": role,
            "user": {"login": login, "type": "User", "site_admin": False, "role_name": role},
        })  # fmt: skip

    async def _info_refs(self, request: web.Request) -> web.Response:
        """Git smart HTTP ref advertisement, behind GitHub's Basic auth for app tokens."""
        self._record(request)
        challenge = {"WWW-Authenticate": 'Basic realm="GitHub"'}
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        user, password = "", ""
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(encoded).decode().partition(":")
            except ValueError:
                pass
        token = self.live(password) if user == "x-access-token" else None
        repo = self.repos.get(
            (request.match_info["owner"].lower(), request.match_info["repo"].lower())
        )
        if token is None or repo is None or not self._covers(token, repo):
            return web.Response(status=401, text="Invalid username or token.", headers=challenge)
        service = request.query.get("service", "")
        need = "write" if service == "git-receive-pack" else "read"
        if _LEVEL.get(token.permissions.get("contents", ""), 0) < _LEVEL[need]:
            return web.Response(status=403, text="Permission denied")
        line = f"# service={service}\n"
        advert = f"{len(line) + 4:04x}{line}0000".encode()
        return web.Response(body=advert, content_type=f"application/x-{service}-advertisement")


@pytest_asyncio.fixture
async def github_api() -> AsyncIterator[GitHubApi]:
    """A fresh GitHub stand-in for one test (its state is the test's own)."""
    api = await GitHubApi.start()
    try:
        yield api
    finally:
        await api.stop()
