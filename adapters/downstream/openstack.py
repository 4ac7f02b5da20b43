"""Keystone application credentials for OpenStack clouds (Jetstream2 and the like).

A credential is an application credential of the user's own Keystone user on one project:
it expires (`expires_at` = now + the grant's lifetime, capped by `max_ttl`), carries only
the configured roles that the user actually holds there, the configured access rules, and
`unrestricted = false` (so it cannot mint further credentials). The caller gets it as a
`clouds.yaml` and as `OS_*` variables.

How the broker acts for the user. Keystone creates an application credential only for the
user of the token that asks (a hard-coded check in `keystone/api/users.py`, whatever the
policy says), and refuses trust-, OAuth1- and EC2-derived tokens there, so no service account
can create one *for* someone else. The broker therefore signs the user in to Keystone the
way Jetstream2 signs in Globus users: through Keystone federation. The broker is an OpenID
provider; it signs a one-minute JWT (`sub` = the Keystone user name, `aud` = `audience`) and
presents it as a Bearer token at
`{auth_url}/OS-FEDERATION/identity_providers/{identity_provider}/protocols/{protocol}/auth`,
rescopes the resulting token to the project, creates the credential with it and revokes both
user tokens. The cloud operator configures (once):
- the web front (mod_auth_openidc, `OIDCOAuthVerifyJwksUri {broker}/jwks.json`) to accept
  the broker's JWTs on that path and pass the claims as `OIDC-*` headers;
- an identity provider with `remote_ids = [broker issuer]`, protocol `openid`, and a mapping
  from `OIDC-sub` to an existing local user in `user_domain` (`type: local`);
- a role for the broker's service user (here `credential_broker` on its service project)
  allowed, by a policy override, to get, list and delete application credentials:
  `identity:delete_application_credential: "rule:admin_or_owner or role:credential_broker"`
  (and the same for `get_`/`list_application_credentials`).
The broker's service user (password from Vault) is used for revocation and clean-up only;
it needs no admin role. Secrets never leave this module except in `Credential.secret`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import aiohttp

from adapters.base import Credential, Grant, Principal, TokenSigner
from adapters.errors import AccessDenied, ConfigurationError, InvalidRequest, UpstreamFailed

UserNameField = Literal["email", "subject", "preferred_username"]

_TIMEOUT = aiohttp.ClientTimeout(total=20)
_TOKEN_MARGIN = 120.0  # renew the service token this many seconds before Keystone expires it
_ASSERTION_TTL = 60  # the federation JWT is used once, at once


class _Response:
    """What is kept of a Keystone answer: never logged whole (a create answer has the secret)."""

    def __init__(self, status: int, body: Any, subject_token: str | None, bearer: bool) -> None:
        self.status = status
        self.body = body
        self.subject_token = subject_token
        self.bearer_challenge = bearer

    def message(self) -> str:
        """Keystone's error message (safe to log: Keystone never echoes secrets in errors)."""
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return str(self.body["error"].get("message", ""))[:300]
        return ""


class OpenStackBackend:
    """Issues and revokes Keystone application credentials (see the module docstring)."""

    def __init__(
        self,
        *,
        id: str,
        auth_url: str,
        region: str | None,
        interface: str,
        service_user: str,
        service_password: str,
        service_user_domain: str,
        service_project: str,
        service_project_domain: str,
        user_domain: str,
        user_name: UserNameField,
        projects: Mapping[str, str],
        default_project: str | None,
        roles: Sequence[str],
        access_rules: Sequence[Mapping[str, str]],
        max_ttl: int,
        http: aiohttp.ClientSession,
        signer: TokenSigner | None = None,
        identity_provider: str = "binder-broker",
        protocol: str = "openid",
        audience: str | None = None,
    ) -> None:
        if max_ttl <= 0:
            raise ConfigurationError(f"backend {id}: max_ttl must be positive")
        self.id = id
        self._auth_url = _v3(auth_url)
        self._base = self._auth_url.removesuffix("/v3")
        self._region = region
        self._interface = interface
        self._service_user = service_user
        self._service_password = service_password
        self._service_user_domain = service_user_domain
        self._service_project = service_project
        self._service_project_domain = service_project_domain
        self._user_domain = user_domain
        self._user_name = user_name
        self._projects = dict(projects)
        self._default_project = default_project
        self._roles = tuple(roles)
        self._access_rules = [dict(rule) for rule in access_rules]
        self._max_ttl = max_ttl
        self._http = http
        self._signer = signer
        self._idp = identity_provider
        self._protocol = protocol
        self._audience = audience or self._auth_url
        self._service_token: tuple[str, float] | None = None  # (token, monotonic renew-by)
        self._token_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"OpenStackBackend(id={self.id!r}, auth_url={self._auth_url!r})"

    # -- issue ---------------------------------------------------------------------------
    async def issue(self, grant: Grant) -> Credential:
        """Create an application credential for the grant's principal.

        InvalidRequest: unknown or missing project. AccessDenied: no Keystone user for the
        principal, no role on the project, or none of the configured roles. UpstreamFailed:
        Keystone unreachable, failing, or refusing the broker's sign-in.
        """
        if self._signer is None:
            raise ConfigurationError(
                "this OpenStack backend cannot sign users in",
                log_detail=f"backend {self.id}: no TokenSigner given for Keystone federation",
            )
        project_id = self._project_for(grant.project)
        user_name = self._keystone_user_name(grant.principal)
        bounds = (grant.ttl, grant.limits.max_ttl or 0, self._max_ttl)
        lifetime = min(t for t in bounds if t > 0)
        expires_at = (datetime.now(UTC) + timedelta(seconds=lifetime)).replace(microsecond=0)
        lease_id = f"lease-{secrets.token_urlsafe(12)}"

        unscoped = await self._federated_token(self._signer, user_name, grant.principal)
        try:
            scoped, token_body = await self._scope(unscoped, project_id)
            try:
                user = token_body.get("user", {})
                self._check_domain(user)
                held = {str(r.get("name")) for r in token_body.get("roles", [])}
                roles = [r for r in self._roles if r in held]
                if not roles:
                    raise AccessDenied(
                        "you hold none of the OpenStack roles this service hands out on that "
                        "project",
                        log_detail=f"backend {self.id}: user {user.get('id')} on {project_id} "
                        f"holds {sorted(held)}, configured {list(self._roles)}",
                    )
                created = await self._create(
                    scoped, str(user["id"]), lease_id, grant, roles, expires_at
                )
            finally:
                await self._revoke_token(scoped)
        finally:
            await self._revoke_token(unscoped)

        cred_id = str(created["id"])
        secret = str(created["secret"])
        return Credential(
            backend=self.id,
            kind="openstack",
            secret=self._secret(cred_id, secret),
            expires_at=expires_at,
            lease_id=lease_id,
            handle={"user_id": str(user["id"]), "application_credential_id": cred_id},
            details={
                "roles": [str(r.get("name")) for r in created.get("roles", [])],
                "access_rules": [
                    {k: str(v) for k, v in rule.items() if k in ("service", "method", "path")}
                    for rule in created.get("access_rules", [])
                ],
                "project_id": str(created.get("project_id", project_id)),
                "name": str(created.get("name", "")),
            },
        )

    def _project_for(self, requested: str | None) -> str:
        if requested is not None:
            if requested not in self._projects:
                raise InvalidRequest(f"unknown project {requested!r} for backend {self.id!r}")
            return self._projects[requested]
        if self._default_project is None:
            raise InvalidRequest(f"backend {self.id!r} needs a project")
        return self._default_project

    def _keystone_user_name(self, principal: Principal) -> str:
        value: object
        if self._user_name == "email":
            value = principal.email
        elif self._user_name == "subject":
            value = principal.subject
        else:
            value = principal.claims.get("preferred_username")
        if not isinstance(value, str) or not value:
            raise AccessDenied(
                f"your account has no {self._user_name.replace('_', ' ')} to find your "
                "OpenStack user by",
                log_detail=f"backend {self.id}: principal {principal.id} lacks {self._user_name}",
            )
        return value

    def _check_domain(self, user: Mapping[str, Any]) -> None:
        domain = user.get("domain", {})
        if self._user_domain not in (domain.get("name"), domain.get("id")):
            # The operator's mapping put the user somewhere this backend was not told about.
            raise ConfigurationError(
                "the OpenStack user mapping does not match this backend",
                log_detail=f"backend {self.id}: mapped user {user.get('id')} is in domain "
                f"{domain.get('id')}, expected {self._user_domain}",
            )

    async def _federated_token(
        self, signer: TokenSigner, user_name: str, principal: Principal
    ) -> str:
        claims: dict[str, Any] = {"sub": user_name, "broker_principal": principal.id}
        if principal.email:
            claims["email"] = principal.email
        if principal.display_name:
            claims["name"] = principal.display_name
        assertion = await signer.sign(claims, audience=self._audience, ttl=_ASSERTION_TTL)
        path = (
            f"/v3/OS-FEDERATION/identity_providers/{quote(self._idp, safe='')}"
            f"/protocols/{quote(self._protocol, safe='')}/auth"
        )
        resp = await self._call("POST", path, headers={"Authorization": f"Bearer {assertion}"})
        if resp.status == 201 and resp.subject_token:
            return resp.subject_token
        if resp.status == 401 and resp.bearer_challenge:
            # The front did not accept the broker's signature: the cloud refuses the broker.
            raise UpstreamFailed(
                "OpenStack did not accept the broker's sign-in",
                log_detail=f"backend {self.id}: federation front rejected the broker JWT "
                f"(issuer {signer.issuer}, audience {self._audience})",
            )
        if resp.status in (401, 403, 404):
            raise AccessDenied(
                "you have no OpenStack account on this cloud",
                log_detail=f"backend {self.id}: federation for {principal.id} answered "
                f"{resp.status}: {resp.message()}",
            )
        raise self._failed("federated sign-in", resp)

    async def _scope(self, unscoped: str, project_id: str) -> tuple[str, dict[str, Any]]:
        body = {
            "auth": {
                "identity": {"methods": ["token"], "token": {"id": unscoped}},
                "scope": {"project": {"id": project_id}},
            }
        }
        resp = await self._call("POST", "/v3/auth/tokens", json_body=body)
        if resp.status == 201 and resp.subject_token and isinstance(resp.body, dict):
            return resp.subject_token, dict(resp.body.get("token", {}))
        if resp.status in (401, 403, 404):
            raise AccessDenied(
                "you have no role on that OpenStack project",
                log_detail=f"backend {self.id}: scoping to {project_id} answered "
                f"{resp.status}: {resp.message()}",
            )
        raise self._failed("project scoping", resp)

    async def _create(
        self,
        token: str,
        user_id: str,
        lease_id: str,
        grant: Grant,
        roles: Sequence[str],
        expires_at: datetime,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "application_credential": {
                "name": f"binder-broker-{lease_id}",
                "description": f"binder-broker {self.id} lease {lease_id} for "
                f"{grant.principal.id}" + (f" via {grant.client}" if grant.client else ""),
                "expires_at": expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "roles": [{"name": r} for r in roles],
                "unrestricted": False,
            }
        }
        if self._access_rules:
            body["application_credential"]["access_rules"] = self._access_rules
        resp = await self._call(
            "POST",
            f"/v3/users/{quote(user_id, safe='')}/application_credentials",
            token=token,
            json_body=body,
        )
        if resp.status == 201 and isinstance(resp.body, dict):
            created = resp.body.get("application_credential")
            if isinstance(created, dict) and created.get("id") and created.get("secret"):
                return created
        if resp.status == 403:
            raise AccessDenied(
                "OpenStack does not let you create application credentials on that project",
                log_detail=f"backend {self.id}: create for {user_id} answered 403: "
                f"{resp.message()}",
            )
        raise self._failed("application credential creation", resp)

    def _secret(self, cred_id: str, secret: str) -> dict[str, Any]:
        env = {
            "OS_AUTH_TYPE": "v3applicationcredential",
            "OS_AUTH_URL": self._auth_url,
            "OS_APPLICATION_CREDENTIAL_ID": cred_id,
            "OS_APPLICATION_CREDENTIAL_SECRET": secret,
            "OS_INTERFACE": self._interface,
            "OS_IDENTITY_API_VERSION": "3",
        }
        if self._region:
            env["OS_REGION_NAME"] = self._region
        return {
            "application_credential_id": cred_id,
            "application_credential_secret": secret,
            "auth_url": self._auth_url,
            "region_name": self._region,
            "clouds_yaml": self._clouds_yaml(cred_id, secret),
            "env": env,
        }

    def _clouds_yaml(self, cred_id: str, secret: str) -> str:
        # JSON strings are valid YAML double-quoted scalars: no YAML library needed.
        q = json.dumps
        lines = [
            "clouds:",
            f"  {q(self.id)}:",
            '    auth_type: "v3applicationcredential"',
            "    auth:",
            f"      auth_url: {q(self._auth_url)}",
            f"      application_credential_id: {q(cred_id)}",
            f"      application_credential_secret: {q(secret)}",
        ]
        if self._region:
            lines.append(f"    region_name: {q(self._region)}")
        lines += [f"    interface: {q(self._interface)}", "    identity_api_version: 3", ""]
        return "\n".join(lines)

    # -- revoke --------------------------------------------------------------------------
    async def revoke(self, lease_id: str, handle: Mapping[str, str]) -> None:
        """Delete the lease's application credential (expired or not); a credential that is
        already gone counts as revoked."""
        user_id = handle.get("user_id")
        cred_id = handle.get("application_credential_id")
        if not user_id or not cred_id:
            raise InvalidRequest(f"lease {lease_id} has no application credential to revoke")
        user, cred = quote(user_id, safe=""), quote(cred_id, safe="")
        path = f"/v3/users/{user}/application_credentials/{cred}"
        for attempt in range(2):
            token = await self._service()
            resp = await self._call("DELETE", path, token=token)
            if resp.status in (204, 404):
                return
            if resp.status == 401 and attempt == 0:
                self._service_token = None  # revoked or rotated keys: sign in again
                continue
            break
        if resp.status == 403:
            raise UpstreamFailed(
                "OpenStack refuses to let the broker revoke credentials",
                log_detail=f"backend {self.id}: delete {cred_id} answered 403 "
                f"(policy for role of {self._service_user}?): {resp.message()}",
            )
        raise self._failed(f"revocation of {cred_id}", resp)

    async def _service(self) -> str:
        async with self._token_lock:
            cached = self._service_token
            if cached is not None and time.monotonic() < cached[1]:
                return cached[0]
            body = {
                "auth": {
                    "identity": {
                        "methods": ["password"],
                        "password": {
                            "user": {
                                "name": self._service_user,
                                "domain": _domain_ref(self._service_user_domain),
                                "password": self._service_password,
                            }
                        },
                    },
                    "scope": {
                        "project": {
                            "name": self._service_project,
                            "domain": _domain_ref(self._service_project_domain),
                        }
                    },
                }
            }
            resp = await self._call("POST", "/v3/auth/tokens", json_body=body)
            if resp.status != 201 or not resp.subject_token:
                if resp.status in (401, 403, 404):
                    raise UpstreamFailed(
                        "OpenStack refuses the broker's service account",
                        log_detail=f"backend {self.id}: service sign-in as "
                        f"{self._service_user} answered {resp.status}: {resp.message()}",
                    )
                raise self._failed("service sign-in", resp)
            lifetime = 3600.0
            expires = resp.body.get("token", {}).get("expires_at") if resp.body else None
            if isinstance(expires, str):
                try:
                    parsed = datetime.fromisoformat(expires.replace("Z", "+00:00"))
                    lifetime = (parsed - datetime.now(UTC)).total_seconds()
                except ValueError:
                    pass
            renew_by = time.monotonic() + max(0.0, lifetime - _TOKEN_MARGIN)
            self._service_token = (resp.subject_token, renew_by)
            return resp.subject_token

    # -- HTTP ----------------------------------------------------------------------------
    async def _revoke_token(self, token: str) -> None:
        """End a user token the broker no longer needs; Keystone lets a token revoke itself."""
        try:
            await self._call(
                "DELETE", "/v3/auth/tokens", token=token, headers={"X-Subject-Token": token}
            )
        except UpstreamFailed:
            pass  # it expires within the hour anyway; the credential matters more

    async def _call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json_body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> _Response:
        send = {"Accept": "application/json", **(headers or {})}
        if token is not None:
            send["X-Auth-Token"] = token
        for attempt in range(2):
            try:
                async with self._http.request(
                    method,
                    self._base + path,
                    json=json_body,
                    headers=send,
                    timeout=_TIMEOUT,
                    allow_redirects=False,
                ) as resp:
                    raw = await resp.read()
                    try:
                        body: Any = json.loads(raw) if raw else {}
                    except ValueError:
                        body = {}
                    challenge = resp.headers.get("WWW-Authenticate", "").lower()
                    return _Response(
                        resp.status,
                        body,
                        resp.headers.get("X-Subject-Token"),
                        challenge.startswith("bearer"),
                    )
            except aiohttp.ServerDisconnectedError:
                # A pooled keep-alive connection the server had already closed: the request
                # never reached Keystone, so one retry on a fresh connection is safe (and a
                # repeated create would collide on the lease's unique name, not duplicate).
                if attempt == 0:
                    continue
                error: Exception = aiohttp.ServerDisconnectedError()
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = exc
            raise UpstreamFailed(
                "OpenStack Keystone is unreachable",
                log_detail=f"backend {self.id}: {method} {urlsplit(self._base).netloc}"
                f"{path.split('?')[0]}: {type(error).__name__}",
            )
        raise AssertionError("unreachable")  # the loop always returns or raises

    def _failed(self, what: str, resp: _Response) -> UpstreamFailed:
        return UpstreamFailed(
            "OpenStack Keystone failed",
            log_detail=f"backend {self.id}: {what} answered {resp.status}: {resp.message()}",
        )


def _v3(auth_url: str) -> str:
    url = str(auth_url).rstrip("/")
    return url if url.endswith("/v3") else url + "/v3"


def _domain_ref(domain: str) -> dict[str, str]:
    # "default" is the id Keystone gives its built-in domain; anything else is a name.
    return {"id": domain} if domain == "default" else {"name": domain}
