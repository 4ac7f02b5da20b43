"""The OpenID Connect UserInfo endpoint (OIDC Core §5.3).

GET and POST, the access token in the Authorization header (Bearer, or DPoP for a bound
token; RFC 6750 §2.1). The token must carry the `openid` scope; the answer is `sub` plus the
claims its scopes allow (§5.4), read from the latest profile the broker keeps for that user.
Errors follow RFC 6750 §3.1 with a `WWW-Authenticate` challenge.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from aiohttp import web

from broker.errors import BrokerError, InvalidToken
from broker.oauth import bearer
from broker.oauth.issuance import load_principal, profile_claims
from broker.state import services


class InsufficientScope(BrokerError):
    """RFC 6750 §3.1: the token is valid but lacks a scope this resource needs."""

    error: ClassVar[str] = "insufficient_scope"
    status: ClassVar[int] = 403
    title: ClassVar[str] = "The token does not carry the scope this needs"


def scheme_of(claims: Mapping[str, Any]) -> str:
    """The authorization scheme a client uses with this token (RFC 9449 §7.1)."""
    cnf = claims.get("cnf")
    return "DPoP" if isinstance(cnf, dict) and "jkt" in cnf else "Bearer"


async def userinfo(request: web.Request) -> web.Response:
    svc = services(request)
    claims = await bearer.access_token_claims(svc, request)
    scheme = scheme_of(claims)
    scopes = str(claims.get("scope", "")).split()
    if "openid" not in scopes:
        # Also the answer for client_credentials tokens, which never carry `openid`.
        error = InsufficientScope("the token was not issued with the openid scope")
        error.headers["WWW-Authenticate"] = (
            f'{scheme} realm="binder-broker", error="insufficient_scope", scope="openid"'
        )
        raise error
    principal = await load_principal(svc, str(claims["sub"]))
    if principal is None:
        invalid = InvalidToken("the token does not stand for a user this broker knows")
        invalid.headers["WWW-Authenticate"] = (
            f'{scheme} realm="binder-broker", error="invalid_token"'
        )
        raise invalid
    # `sub` comes from the token so it matches the ID token's exactly (OIDC Core §5.3.2).
    body = {"sub": str(claims["sub"])} | profile_claims(principal, scopes)
    return web.json_response(
        body, dumps=json.dumps, headers={"Cache-Control": "no-store", "Pragma": "no-cache"}
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/oauth/userinfo", userinfo, name="oauth_userinfo")
    app.router.add_post("/oauth/userinfo", userinfo, name="oauth_userinfo_post")
