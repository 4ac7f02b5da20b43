"""The admin API for OAuth clients: `/v1/admin/clients`.

Callers present a broker access token (Bearer or DPoP) of a user the policy allows `admin`
on `Broker::"broker"` (by default: group broker-admins, with MFA). The token must have been
issued to a first-party client, so a launcher or resource server that receives an admin's
token for its own use cannot replay it here.

Client secrets are stored only as scrypt hashes. A secret the server generates is shown once,
in the creation response (RFC 7591 §3.2.1 style); a secret the admin supplied is never echoed,
and no response ever holds a hash.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

from aiohttp import web
from sqlalchemy import update

from broker.errors import AccessDenied, InvalidRequest
from broker.oauth import bearer
from broker.oauth.clients import Client, hash_secret
from broker.oauth.forms import read_json_object
from broker.oauth.issuance import load_principal
from broker.services import Services
from broker.state import services
from broker.storage import RefreshTokenRecord
from policies.engine import Resource

ADMIN_RESOURCE = Resource("Broker", "broker")
MIN_SECRET_LENGTH = 32
_SECRET_METHODS = ("client_secret_basic", "client_secret_post")
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


async def require_admin(svc: Services, request: web.Request) -> str:
    """The id of the admin making this request; InvalidToken (401) or AccessDenied (403)."""
    claims = await bearer.access_token_claims(svc, request)
    client = await svc.oauth.clients.get(str(claims.get("client_id", "")))
    principal = await load_principal(svc, str(claims["sub"]))
    if client is None or not client.config.first_party:
        reasons: tuple[str, ...] = ()
        problem = "the admin API needs a token issued to a first-party client"
    elif principal is None:
        reasons, problem = (), "the admin API needs a user's token"
    else:
        decision = svc.policy.decide(principal, "admin", ADMIN_RESOURCE)
        if decision.allowed:
            return principal.id
        reasons = tuple(decision.reasons)
        problem = "the policy does not let you administer this broker"
    svc.metrics.denials.labels(action="admin").inc()
    await svc.audit.append(
        "admin.denied", outcome="denied", actor=str(claims["sub"]), path=request.path,
        method=request.method, client=str(claims.get("client_id", "")), token_jti=claims["jti"],
        policies=list(reasons),
    )  # fmt: skip
    raise AccessDenied(problem, reasons=reasons)


def public_document(client: Client) -> dict[str, Any]:
    """What the API shows of a client: its settings without the secret hash, and its source."""
    document: dict[str, Any] = client.config.model_dump(
        mode="json", exclude={"secret_hash"}, exclude_none=True
    )
    document["source"] = client.source
    return document


async def list_clients(request: web.Request) -> web.Response:
    """GET /v1/admin/clients."""
    svc = services(request)
    await require_admin(svc, request)
    clients = [public_document(c) for c in await svc.oauth.clients.list()]
    return web.json_response({"clients": clients}, dumps=json.dumps, headers=_NO_STORE)


async def create_client(request: web.Request) -> web.Response:
    """POST /v1/admin/clients: register a client; 201 with its document (and a new secret)."""
    svc = services(request)
    actor = await require_admin(svc, request)
    document = await read_json_object(request, "the client")
    plain = document.pop("client_secret", None)
    generated = False
    if plain is not None:
        if "secret_hash" in document:
            raise InvalidRequest("give either client_secret or secret_hash, not both")
        if not isinstance(plain, str) or len(plain) < MIN_SECRET_LENGTH:
            raise InvalidRequest(
                f"client_secret must be a string of at least {MIN_SECRET_LENGTH} characters"
            )
    elif (
        document.get("auth_method", "client_secret_basic") in _SECRET_METHODS
        and "secret_hash" not in document
    ):
        plain, generated = secrets.token_urlsafe(32), True
    if plain is not None:
        # scrypt takes a noticeable time: keep it off the event loop.
        document["secret_hash"] = await asyncio.to_thread(hash_secret, plain)
    client = await svc.oauth.clients.register(document, actor=actor)
    await svc.audit.append(
        "admin.client_created", outcome="success", actor=actor, client=client.id,
        auth_method=client.config.auth_method, grant_types=list(client.config.grant_types),
        audiences=list(client.config.audiences), generated_credential=generated,
    )  # fmt: skip
    body = public_document(client)
    if generated:
        body["client_secret"] = plain
        body["client_secret_expires_at"] = 0  # RFC 7591 §3.2.1: 0 = does not expire
    return web.json_response(body, status=201, dumps=json.dumps, headers=_NO_STORE)


async def delete_client(request: web.Request) -> web.Response:
    """DELETE /v1/admin/clients/{client_id}: 204; its refresh tokens are revoked too."""
    svc = services(request)
    actor = await require_admin(svc, request)
    client_id = request.match_info["client_id"]
    await svc.oauth.clients.remove(client_id)
    # A client registered later under the same id must not inherit these grants.
    async with svc.db.sessions() as session, session.begin():
        result = await session.execute(
            update(RefreshTokenRecord)
            .where(RefreshTokenRecord.client_id == client_id)
            .values(revoked=True)
        )
    await svc.audit.append(
        "admin.client_deleted", outcome="success", actor=actor, client=client_id,
        revoked_refresh_count=int(getattr(result, "rowcount", 0)),
    )  # fmt: skip
    return web.Response(status=204, headers=_NO_STORE)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/admin/clients", list_clients, name="admin_clients")
    app.router.add_post("/v1/admin/clients", create_client, name="admin_clients_create")
    app.router.add_delete(
        "/v1/admin/clients/{client_id}", delete_client, name="admin_clients_delete"
    )
