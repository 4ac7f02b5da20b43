"""The issuer surface: OpenID Provider / OAuth AS metadata and the JWKS.

The metadata lists exactly what this broker serves today; endpoints are added here as they
are built, never advertised ahead of time.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from aiohttp import web

from broker.keyring import SUPPORTED_ALGORITHMS
from broker.state import services

METADATA_MAX_AGE = 3600


def provider_metadata(issuer: str) -> dict[str, Any]:
    """RFC 8414 / OpenID Connect Discovery 1.0 metadata for what exists now."""
    return {
        "issuer": issuer,
        "jwks_uri": f"{issuer}/jwks.json",
        "response_types_supported": [],
        "grant_types_supported": [],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": list(SUPPORTED_ALGORITHMS),
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "acr", "jti"],
        "service_documentation": f"{issuer}/",
    }


def _cached_json(request: web.Request, body: bytes, max_age: int) -> web.Response:
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {"Cache-Control": f"public, max-age={max_age}", "ETag": etag}
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type="application/json", headers=headers)


async def discovery(request: web.Request) -> web.Response:
    issuer = services(request).settings.server.public_url
    body = json.dumps(provider_metadata(issuer), separators=(",", ":")).encode()
    return _cached_json(request, body, METADATA_MAX_AGE)


async def jwks(request: web.Request) -> web.Response:
    svc = services(request)
    return _cached_json(request, svc.keyring.jwks(), svc.settings.keys.jwks_max_age)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/.well-known/openid-configuration", discovery, name="openid_configuration")
    app.router.add_get(
        "/.well-known/oauth-authorization-server", discovery, name="oauth_authorization_server"
    )
    app.router.add_get("/jwks.json", jwks, name="jwks")
