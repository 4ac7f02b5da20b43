"""The credentials API: `/v1/credentials`.

Callers present a broker access token (Bearer or DPoP) that stands for a user, is addressed
to this broker (its `aud` holds the broker's public URL) and carries the scope
`launch:<backend>` for the backend asked for. Errors are RFC 6749-style JSON with
`Cache-Control: no-store`; nothing secret is ever logged or audited.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from adapters.base import Principal
from broker.credentials import (
    CredentialRequest,
    issue_credential,
    lease_view,
    live_leases,
    revoke_lease,
)
from broker.errors import AccessDenied, InvalidTarget
from broker.oauth import bearer
from broker.oauth.forms import parse_model, read_json_object
from broker.oauth.issuance import load_principal
from broker.oauth.userinfo import InsufficientScope
from broker.services import Services
from broker.state import services

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def launch_scope(backend: str) -> str:
    return f"launch:{backend}"


async def caller(svc: Services, request: web.Request) -> tuple[Principal, dict[str, Any]]:
    """The user the token stands for, and its claims; 401 for a bad token or another
    audience, 403 for a token without a user."""
    claims = await bearer.access_token_claims(svc, request, audience=svc.settings.server.public_url)
    principal = await load_principal(svc, str(claims["sub"]))
    if principal is None:
        raise AccessDenied("Launch credentials are for a signed-in user, not a client.")
    return principal, claims


async def _request_body(request: web.Request) -> CredentialRequest:
    return parse_model(CredentialRequest, await read_json_object(request, "the request"))


async def create(request: web.Request) -> web.Response:
    """POST /v1/credentials: a short-lived credential for one launch."""
    svc = services(request)
    principal, claims = await caller(svc, request)
    body = await _request_body(request)
    if body.backend not in svc.backends:
        raise InvalidTarget(f"there is no backend {body.backend!r}")
    if launch_scope(body.backend) not in str(claims.get("scope", "")).split():
        scope = launch_scope(body.backend)
        error = InsufficientScope(f"the token does not carry the scope {scope}")
        error.headers["WWW-Authenticate"] = (
            f'Bearer realm="binder-broker", error="insufficient_scope", scope="{scope}"'
        )
        raise error
    issued = await issue_credential(svc, principal, str(claims.get("client_id")), body)
    return web.json_response(issued.body(), status=201, dumps=json.dumps, headers=_NO_STORE)


async def list_leases(request: web.Request) -> web.Response:
    """GET /v1/credentials: the caller's live leases, without secrets."""
    svc = services(request)
    principal, _claims = await caller(svc, request)
    leases = [lease_view(r) for r in await live_leases(svc, principal.id)]
    return web.json_response({"leases": leases}, dumps=json.dumps, headers=_NO_STORE)


async def delete(request: web.Request) -> web.Response:
    """DELETE /v1/credentials/{lease_id}: end a lease; the backend revokes where it can."""
    svc = services(request)
    principal, _claims = await caller(svc, request)
    upstream = await revoke_lease(svc, principal.id, request.match_info["lease_id"])
    return web.json_response(
        {"lease_id": request.match_info["lease_id"], "revoked_by_backend": upstream},
        dumps=json.dumps,
        headers=_NO_STORE,
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/credentials", create, name="credentials_create")
    app.router.add_get("/v1/credentials", list_leases, name="credentials_list")
    app.router.add_delete("/v1/credentials/{lease_id}", delete, name="credentials_delete")
