"""The issuer surface: OpenID Provider / OAuth AS metadata and the JWKS.

The metadata is derived from what this application really serves (its routes and registered
grant types), so it lists exactly what is supported and nothing ahead of time. Both documents
are served from pre-serialised bytes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from aiohttp import web

from broker.keyring import SUPPORTED_ALGORITHMS
from broker.oauth.clients import ASSERTION_ALGORITHMS
from broker.oauth.dpop import PROOF_ALGORITHMS
from broker.oauth.token import GRANTS
from broker.state import services

METADATA_MAX_AGE = 3600
_METADATA: web.AppKey[dict[str, bytes]] = web.AppKey("provider_metadata", dict)
_CLIENT_AUTH = ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]
_ENDPOINTS = {
    "authorization_endpoint": "/oauth/authorize",
    "token_endpoint": "/oauth/token",
    "device_authorization_endpoint": "/oauth/device_authorization",
    "introspection_endpoint": "/oauth/introspect",
    "revocation_endpoint": "/oauth/revoke",
    "userinfo_endpoint": "/oauth/userinfo",
}


def provider_metadata(issuer: str, served_paths: set[str], scopes: set[str]) -> dict[str, Any]:
    """RFC 8414 / OpenID Connect Discovery 1.0 metadata for what `served_paths` offers."""
    meta: dict[str, Any] = {"issuer": issuer}
    for name, path in _ENDPOINTS.items():
        if path in served_paths:
            meta[name] = f"{issuer}{path}"
    meta["jwks_uri"] = f"{issuer}/jwks.json"
    has_authorize = "authorization_endpoint" in meta
    meta["response_types_supported"] = ["code"] if has_authorize else []
    if has_authorize:
        meta["response_modes_supported"] = ["query"]
        meta["code_challenge_methods_supported"] = ["S256"]
        meta["prompt_values_supported"] = ["none", "login", "consent"]
        meta["authorization_response_iss_parameter_supported"] = True
        meta["request_parameter_supported"] = False
        meta["request_uri_parameter_supported"] = False
    meta["grant_types_supported"] = sorted(GRANTS) if "token_endpoint" in meta else []
    meta["subject_types_supported"] = ["public"]
    meta["id_token_signing_alg_values_supported"] = list(SUPPORTED_ALGORITHMS)
    if "token_endpoint" in meta:
        meta["token_endpoint_auth_methods_supported"] = _CLIENT_AUTH
        meta["token_endpoint_auth_signing_alg_values_supported"] = ASSERTION_ALGORITHMS
        meta["dpop_signing_alg_values_supported"] = PROOF_ALGORITHMS
    if "introspection_endpoint" in meta:  # confidential clients only
        meta["introspection_endpoint_auth_methods_supported"] = _CLIENT_AUTH[:3]
    if "revocation_endpoint" in meta:  # public clients may revoke their own tokens
        meta["revocation_endpoint_auth_methods_supported"] = _CLIENT_AUTH
    meta["scopes_supported"] = sorted(scopes)
    meta["claims_supported"] = [
        "iss", "sub", "aud", "exp", "iat", "auth_time", "acr", "jti", "nonce", "azp",
        "name", "preferred_username", "email", "groups", "affiliation",
    ]  # fmt: skip
    meta["service_documentation"] = f"{issuer}/"
    return meta


def _cached_json(request: web.Request, body: bytes, max_age: int) -> web.Response:
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {"Cache-Control": f"public, max-age={max_age}", "ETag": etag}
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type="application/json", headers=headers)


async def discovery(request: web.Request) -> web.Response:
    cache = request.app[_METADATA]
    body = cache.get("body")
    if body is None:
        svc = services(request)
        paths = {r.canonical for r in request.app.router.resources()}
        scopes = {"openid", "profile", "email", "groups", "offline_access"}
        scopes.update(s for c in svc.settings.clients for s in c.scopes)
        meta = provider_metadata(svc.settings.server.public_url, paths, scopes)
        body = json.dumps(meta, separators=(",", ":")).encode()
        cache["body"] = body
    return _cached_json(request, body, METADATA_MAX_AGE)


async def jwks(request: web.Request) -> web.Response:
    svc = services(request)
    return _cached_json(request, svc.keyring.jwks(), svc.settings.keys.jwks_max_age)


def add_routes(app: web.Application) -> None:
    app[_METADATA] = {}  # filled on first request, once every route is registered
    app.router.add_get("/.well-known/openid-configuration", discovery, name="openid_configuration")
    app.router.add_get(
        "/.well-known/oauth-authorization-server", discovery, name="oauth_authorization_server"
    )
    app.router.add_get("/jwks.json", jwks, name="jwks")
