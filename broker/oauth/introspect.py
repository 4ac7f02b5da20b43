"""Token introspection (RFC 7662) and revocation (RFC 7009).

Both endpoints authenticate the calling client. Introspection answers only about tokens the
caller is entitled to see: access tokens issued to it or meant for one of its audiences, and
refresh tokens issued to it. Anything else, valid or not, is `{"active": false}` with nothing
more (RFC 7662 §2.2, §4), so the endpoint cannot be used to probe other clients' tokens.
Revocation answers 200 with an empty body for a revoked, unknown or invalid token (RFC 7009
§2.2) and refuses, changing nothing, a valid token of another client (§2.1). Broker access
tokens are JWTs and refresh tokens are opaque strings without dots, so the kind is told from
the token itself; `token_type_hint` is accepted but not needed (RFC 7662 §2.1, RFC 7009 §2.1
let the server search all kinds).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NoReturn

from aiohttp import web

from broker.errors import InvalidClient, InvalidToken, UnauthorizedClient
from broker.oauth import bearer
from broker.oauth.clients import Client
from broker.oauth.forms import read_oauth_form
from broker.oauth.token import require, token_response
from broker.services import Services
from broker.state import services

INACTIVE: Mapping[str, Any] = {"active": False}
# What an introspection response may repeat from an access token (RFC 7662 §2.2, RFC 9068).
_ACCESS_FIELDS = ("scope", "client_id", "sub", "aud", "iss", "exp", "iat", "jti", "cnf", "act")


def _looks_like_jwt(token: str) -> bool:
    # Refresh tokens are "rt_" + URL-safe base64, which never contains a dot.
    return token.count(".") == 2


def _audiences(claims: Mapping[str, Any]) -> list[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    return [str(a) for a in aud] if isinstance(aud, list) else []


async def _access_claims(svc: Services, token: str) -> dict[str, Any] | None:
    """The claims of a valid, unrevoked broker access token; None for anything else."""
    try:
        claims = svc.tokens.verify(token)
    except InvalidToken:
        return None
    if await bearer.is_revoked(svc, str(claims["jti"])):
        return None
    return claims


def _entitled(client: Client, claims: Mapping[str, Any]) -> bool:
    """The caller is the client the token was issued to, or one of its audiences."""
    if claims.get("client_id") == client.id:
        return True
    return not set(_audiences(claims)).isdisjoint(client.default_audience())


async def _describe_access(svc: Services, client: Client, token: str) -> dict[str, Any]:
    claims = await _access_claims(svc, token)
    if claims is None or not _entitled(client, claims):
        return dict(INACTIVE)
    body: dict[str, Any] = {"active": True}
    body.update({k: claims[k] for k in _ACCESS_FIELDS if k in claims})
    bound = isinstance(claims.get("cnf"), dict) and "jkt" in claims["cnf"]
    body["token_type"] = "DPoP" if bound else "Bearer"
    return body


async def _describe_refresh(svc: Services, client: Client, token: str) -> dict[str, Any]:
    record = await svc.oauth.refresh.lookup(token)
    if (
        record is None
        or record.client_id != client.id
        or record.revoked
        or record.used_at is not None
        or record.expires_at <= datetime.now(UTC)
    ):
        return dict(INACTIVE)
    return {
        "active": True,
        "client_id": record.client_id,
        "sub": record.subject,
        "scope": " ".join(str(s) for s in record.grant.get("scopes", [])),
        "iat": int(record.created_at.timestamp()),
        "exp": int(record.expires_at.timestamp()),
        "token_type": "refresh_token",
    }


async def introspect(request: web.Request) -> web.Response:
    """POST /oauth/introspect (RFC 7662 §2): the state of a token, for an entitled caller."""
    svc = services(request)
    form = await read_oauth_form(request)
    client = await svc.oauth.clients.authenticate(request, form)
    if client.public:
        # A public client proves nothing about who is asking (RFC 7662 §2.1 requires
        # authorization to stop token scanning).
        raise InvalidClient("introspection is for confidential clients")
    token = require(form, "token")
    if _looks_like_jwt(token):
        body = await _describe_access(svc, client, token)
    else:
        body = await _describe_refresh(svc, client, token)
    return token_response(body)


async def _refuse(svc: Services, client: Client, *, kind: str, **token_id: str) -> NoReturn:
    """RFC 7009 §2.1: a token issued to another client is not revoked, and the request is
    refused (with an audit record naming the token by its id, never the token)."""
    await svc.audit.append(
        "token.revoke_refused", outcome="denied", actor=client.id, client=client.id,
        kind=kind, **token_id,
    )  # fmt: skip
    raise UnauthorizedClient("this token was not issued to this client; it was not revoked")


async def _revoke_access(svc: Services, client: Client, token: str) -> None:
    claims = await _access_claims(svc, token)
    if claims is None:
        return  # invalid or already revoked: 200, nothing changes (RFC 7009 §2.2)
    jti = str(claims["jti"])
    if claims.get("client_id") != client.id:
        await _refuse(svc, client, kind="access_token", token_jti=jti)
    await bearer.revoke_access_token(svc, jti, float(claims["exp"]))
    await svc.audit.append(
        "token.revoked", outcome="success", actor=client.id, client=client.id,
        token_jti=jti, subject=str(claims.get("sub", "")), kind="access_token",
    )  # fmt: skip


async def _revoke_refresh(svc: Services, client: Client, token: str) -> None:
    record = await svc.oauth.refresh.lookup(token)
    if record is None or record.revoked:
        return
    if record.client_id != client.id:
        await _refuse(svc, client, kind="refresh_token", refresh_family=record.family_id)
    # RFC 7009 §2.1: revoking a refresh token may revoke related tokens; a rotated family
    # is one grant, so every token of it goes.
    revoked = await svc.oauth.refresh.revoke_family(record.family_id)
    await svc.audit.append(
        "token.revoked", outcome="success", actor=client.id, client=client.id,
        refresh_family=record.family_id, subject=record.subject, kind="refresh_token",
        revoked_count=revoked,
    )  # fmt: skip


async def revoke(request: web.Request) -> web.Response:
    """POST /oauth/revoke (RFC 7009 §2): 200 with an empty body once the token is revoked, or
    when it is unknown, invalid or already revoked; 400 `unauthorized_client` for a token
    issued to another client, which stays valid (§2.1)."""
    svc = services(request)
    form = await read_oauth_form(request)
    client = await svc.oauth.clients.authenticate(request, form)
    token = require(form, "token")
    if _looks_like_jwt(token):
        await _revoke_access(svc, client, token)
    else:
        await _revoke_refresh(svc, client, token)
    return web.Response(status=200, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/oauth/introspect", introspect, name="oauth_introspect")
    app.router.add_post("/oauth/revoke", revoke, name="oauth_revoke")
