"""`POST /oauth/token` (RFC 6749 §3.2): authenticate the client, dispatch on `grant_type`.

Grant handlers register themselves with `@grant(...)`; each returns an `Issued` from
`issuance.issue`. Responses carry `Cache-Control: no-store` (RFC 6749 §5.1).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from adapters.base import Principal, Refreshable
from broker.errors import (
    AccessDenied,
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    UnauthorizedClient,
    UnsupportedGrantType,
)
from broker.oauth import dpop
from broker.oauth.clients import Client
from broker.oauth.forms import read_oauth_form
from broker.oauth.issuance import (
    Issued,
    TokenRequest,
    issue,
    load_principal,
    remember_principal,
)
from broker.services import Services
from broker.state import services

CLIENT_CREDENTIALS = "client_credentials"
REFRESH_TOKEN = "refresh_token"


@dataclass(frozen=True, slots=True)
class GrantContext:
    """What every grant handler gets: the authenticated client and the request."""

    svc: Services
    request: web.Request
    form: Mapping[str, str]
    client: Client
    dpop_jkt: str | None


GrantHandler = Callable[[GrantContext], Awaitable[Issued]]
GRANTS: dict[str, GrantHandler] = {}


def grant(grant_type: str) -> Callable[[GrantHandler], GrantHandler]:
    def register(handler: GrantHandler) -> GrantHandler:
        GRANTS[grant_type] = handler
        return handler

    return register


def token_response(body: Mapping[str, object], status: int = 200) -> web.Response:
    return web.json_response(
        dict(body), status=status, dumps=json.dumps,
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )  # fmt: skip


def require(form: Mapping[str, str], name: str) -> str:
    value = form.get(name)
    if not value:
        raise InvalidRequest(f"the parameter {name!r} is required")
    return value


def narrow_audience(client: Client, form: Mapping[str, str]) -> list[str]:
    """`resource` (RFC 8707) / `audience` (RFC 8693) pick from the client's audiences."""
    asked = [v for k in ("resource", "audience") if (v := form.get(k))]
    if not asked:
        return client.default_audience()
    allowed = client.default_audience()
    for value in asked:
        if value not in allowed:
            raise InvalidTarget(f"this client may not ask for the audience {value!r}")
    return list(dict.fromkeys(asked))


async def token_endpoint(request: web.Request) -> web.Response:
    svc = services(request)
    form = await read_oauth_form(request)
    client = await svc.oauth.clients.authenticate(request, form)
    grant_type = require(form, "grant_type")
    handler = GRANTS.get(grant_type)
    if handler is None:
        raise UnsupportedGrantType(f"grant_type {grant_type!r} is not supported")
    if not client.allows_grant(grant_type):
        raise UnauthorizedClient(f"this client may not use grant_type {grant_type!r}")
    jkt = None
    if dpop.has_proof(request):
        jkt = await dpop.verify_proof(
            svc, request, htm="POST", htu=f"{svc.settings.server.public_url}/oauth/token"
        )
    elif client.config.require_dpop:
        raise dpop.InvalidDPoPProof("this client must send a DPoP proof")
    issued = await handler(GrantContext(svc, request, form, client, jkt))
    return token_response(issued.body)


@grant(CLIENT_CREDENTIALS)
async def client_credentials(ctx: GrantContext) -> Issued:
    """RFC 6749 §4.4: the client acts for itself; no refresh token, no ID token."""
    scopes = [s for s in ctx.client.narrow_scopes(ctx.form.get("scope")) if s != "openid"]
    request = TokenRequest(
        grant_type=CLIENT_CREDENTIALS, client=ctx.client, principal=None, scopes=scopes,
        audience=narrow_audience(ctx.client, ctx.form), dpop_jkt=ctx.dpop_jkt,
    )  # fmt: skip
    return await issue(ctx.svc, request)


@grant(REFRESH_TOKEN)
async def refresh_token(ctx: GrantContext) -> Issued:
    """RFC 6749 §6 with rotation and reuse detection; scope can only narrow."""
    used = await ctx.svc.oauth.refresh.use(require(ctx.form, "refresh_token"), ctx.client.id)
    bound = used.grant.get("jkt")
    if bound is not None and bound != ctx.dpop_jkt:
        raise InvalidGrant("this refresh token is bound to a DPoP key; prove possession of it")
    principal = await load_principal(ctx.svc, used.subject)
    if principal is None:
        raise InvalidGrant("the user of this refresh token is no longer known")
    principal = await _refreshed_upstream(ctx.svc, principal, used.family_id)
    granted = list(used.grant.get("scopes", []))
    scopes = granted
    if "scope" in ctx.form:
        scopes = list(dict.fromkeys(ctx.form["scope"].split()))
        if not set(scopes) <= set(granted):
            raise InvalidScope("a refresh can only narrow the scope that was granted")
    request = TokenRequest(
        grant_type=REFRESH_TOKEN, client=ctx.client, principal=principal, scopes=scopes,
        audience=list(used.grant.get("audience", [])) or ctx.client.default_audience(),
        dpop_jkt=ctx.dpop_jkt, refresh=True, refresh_family=used.family_id,
        refresh_expires_at=used.expires_at, extra_audit={"refresh_family": used.family_id},
    )  # fmt: skip
    return await issue(ctx.svc, request)


async def _refreshed_upstream(svc: Services, principal: Principal, family: str) -> Principal:
    """The principal as its upstream sees it now, where the upstream can say (an OpenID
    provider with a kept refresh token): groups stay current, and a person the upstream no
    longer accepts loses the broker's refresh tokens too."""
    upstream = svc.upstreams.get(principal.idp)
    if not isinstance(upstream, Refreshable):
        return principal
    try:
        fresh = await upstream.refresh(principal)
    except AccessDenied as error:
        await svc.oauth.refresh.revoke_family(family)
        await svc.audit.append(
            "token.refresh_refused", outcome="denied", actor=principal.id, idp=principal.idp,
            refresh_family=family, reason=error.log_detail[:300],
        )  # fmt: skip
        raise InvalidGrant(
            f"your sign-in at {principal.idp} has ended; sign in again",
            log_detail=error.log_detail,
        ) from None
    if fresh != principal:
        await remember_principal(svc, fresh)
    return fresh


def add_routes(app: web.Application) -> None:
    app.router.add_post("/oauth/token", token_endpoint, name="oauth_token")
