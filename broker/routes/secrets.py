"""`/v1/secrets`: store a secret for a backend in Vault; it is never readable back.

- a `vault_secret` backend: the caller's own secret (any flat JSON object of strings), which
  that backend hands to the caller's launches;
- a generic `git` host: `{username?, password}` the broker uses to reach the host's repos
  through the gateway: the caller's own (`scope = "user"`), or, with the `admin` policy, an
  organisation's (`scope = "organisation"`, `organisation` = the repo owner on the host).

The caller's token must carry the scope `secrets`. Every write and delete is audited (never
the value). `GET /v1/secrets` lists which of the caller's own secrets exist.
"""

from __future__ import annotations

import json
from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from adapters.base import Principal
from adapters.downstream.git_host import GitSecretHost, org_secret_path, user_secret_path
from adapters.downstream.secrets import VaultSecretBackend
from broker.errors import AccessDenied, InvalidRequest, InvalidTarget
from broker.oauth.forms import parse_model, read_json_object
from broker.oauth.userinfo import InsufficientScope
from broker.routes.credentials import caller
from broker.services import Services
from broker.state import services
from policies.engine import Resource

SCOPE = "secrets"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_Text = Field(min_length=1, max_length=4096)


class GitSecret(BaseModel):
    """The body of `PUT /v1/secrets/{backend}` for a git host."""

    model_config = ConfigDict(extra="forbid", strict=True)

    username: str = Field(default="", max_length=256)
    password: str = _Text
    scope: Literal["user", "organisation"] = "user"
    organisation: str | None = Field(default=None, min_length=1, max_length=256)


async def _authorised(svc: Services, request: web.Request) -> Principal:
    """The user the request's token stands for, if it carries the scope `secrets`."""
    principal, claims = await caller(svc, request)
    if SCOPE not in str(claims.get("scope", "")).split():
        error = InsufficientScope(f"the token does not carry the scope {SCOPE}")
        error.headers["WWW-Authenticate"] = (
            f'Bearer realm="binder-broker", error="insufficient_scope", scope="{SCOPE}"'
        )
        raise error
    return principal


def _path_for(svc: Services, backend_id: str, principal_id: str, organisation: str | None) -> str:
    """The Vault path of the caller's secret for this backend, or of an organisation's."""
    backend = svc.backends.get(backend_id)
    if isinstance(backend, VaultSecretBackend) and organisation is None:
        return backend.path_for(principal_id)
    host = svc.repo_hosts.get(backend_id)
    if not isinstance(host, GitSecretHost):
        raise InvalidTarget(f"backend {backend_id!r} does not keep such secrets")
    prefix = svc.settings.vault.prefix
    if organisation is None:
        return user_secret_path(prefix, backend_id, principal_id)
    return org_secret_path(prefix, backend_id, organisation)


async def _check_organisation(
    svc: Services, principal: Principal, backend_id: str, organisation: str | None
) -> None:
    """Only a broker administrator (Cedar `admin`) stores or deletes an organisation's."""
    if organisation is None:
        return
    decision = svc.policy.decide(principal, "admin", Resource("Broker", "broker"))
    if not decision.allowed:
        await svc.audit.append(
            "secret.denied", outcome="denied", actor=principal.id, backend=backend_id,
            organisation=organisation, policies=list(decision.reasons),
        )  # fmt: skip
        raise AccessDenied("Only a broker administrator may store an organisation's secret.")


async def store(request: web.Request) -> web.Response:
    """PUT /v1/secrets/{backend}: store (replace) a secret; 204, nothing echoed back."""
    svc = services(request)
    principal = await _authorised(svc, request)
    principal_id = principal.id
    document = await read_json_object(request, "the secret")
    backend_id = request.match_info["backend"]
    organisation = None
    if backend_id in svc.repo_hosts:
        body = parse_model(GitSecret, document, "the secret")
        if body.scope == "organisation":
            if body.organisation is None:
                raise InvalidRequest("name the organisation (the repo owner on the host)")
            organisation = body.organisation
        await _check_organisation(svc, principal, backend_id, organisation)
        data: dict[str, str] = {"username": body.username, "password": body.password}
    else:
        if (
            not document
            or len(document) > 32
            or not all(isinstance(v, str) and 0 < len(v) <= 4096 for v in document.values())
        ):
            raise InvalidRequest("send the secret as a flat JSON object of up to 32 strings")
        data = {str(k): str(v) for k, v in document.items()}
    path = _path_for(svc, backend_id, principal_id, organisation)
    await svc.vault.kv_write(path, data)
    await svc.audit.append(
        "secret.stored", outcome="success", actor=principal_id, backend=backend_id,
        organisation=organisation,
    )  # fmt: skip
    return web.Response(status=204, headers=_NO_STORE)


async def remove(request: web.Request) -> web.Response:
    """DELETE /v1/secrets/{backend}[?organisation=…]: delete the caller's (or, for an
    administrator, an organisation's) secret; 204 even if there was none."""
    svc = services(request)
    principal = await _authorised(svc, request)
    principal_id = principal.id
    organisation = request.query.get("organisation") or None
    backend_id = request.match_info["backend"]
    await _check_organisation(svc, principal, backend_id, organisation)
    path = _path_for(svc, backend_id, principal_id, organisation)
    await svc.vault.kv_delete(path)
    await svc.audit.append(
        "secret.deleted", outcome="success", actor=principal_id, backend=backend_id,
        organisation=organisation,
    )  # fmt: skip
    return web.Response(status=204, headers=_NO_STORE)


async def list_own(request: web.Request) -> web.Response:
    """GET /v1/secrets: which backends hold a secret of the caller's (names only)."""
    svc = services(request)
    principal_id = (await _authorised(svc, request)).id
    prefix = svc.settings.vault.prefix
    stored = []
    for backend_id, backend in svc.backends.items():
        if isinstance(backend, VaultSecretBackend):
            if await svc.vault.kv_read(backend.path_for(principal_id)) is not None:
                stored.append({"backend": backend_id, "scope": "user"})
    for backend_id, host in svc.repo_hosts.items():
        if isinstance(host, GitSecretHost):
            path = user_secret_path(prefix, backend_id, principal_id)
            if await svc.vault.kv_read(path) is not None:
                stored.append({"backend": backend_id, "scope": "user"})
    return web.json_response({"secrets": stored}, dumps=json.dumps, headers=_NO_STORE)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/secrets", list_own, name="secrets_list")
    app.router.add_put("/v1/secrets/{backend}", store, name="secrets_store")
    app.router.add_delete("/v1/secrets/{backend}", remove, name="secrets_delete")
