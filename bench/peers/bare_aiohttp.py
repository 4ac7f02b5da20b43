"""Baseline (a) for bench/token_endpoint.py: the least an aiohttp token endpoint can do.

`POST /token` parses the same form and Basic header the broker's `/oauth/token` gets, checks the
secret the way the broker's *cached* path does (an HMAC compare; no scrypt: steady state pays
that once per client), signs the claims the broker puts in a `client_credentials` access token
with a parsed ES256 key object through PyJWT, and answers the same JSON shape and headers.
`POST /introspect` is the bare counterpart of `/oauth/introspect`: the same client check, then
`jwt.decode` with the public key object, answering RFC 7662 JSON.

No middleware, no logging, no audit, no policy: the ratio broker / this is what the broker adds.

    BENCH_CLIENT_SECRET=... python bench/peers/bare_aiohttp.py PORT CLIENT_ID ISSUER

The secret comes from the environment so `ps` does not show it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import sys
import time
from typing import Any
from urllib.parse import unquote_plus

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def build_app(client_id: str, client_secret: str, issuer: str) -> web.Application:
    private_key = ec.generate_private_key(ec.SECP256R1())
    public_key = private_key.public_key()
    kid = secrets.token_urlsafe(8)
    mac_key = secrets.token_bytes(32)
    expected = hmac.new(mac_key, f"{client_id}\x00{client_secret}".encode(), "sha256").digest()

    def authenticate(request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        if header[:6].lower() != "basic ":
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        cid, _, secret = decoded.partition(":")
        cid, secret = unquote_plus(cid), unquote_plus(secret)
        mac = hmac.new(mac_key, f"{cid}\x00{secret}".encode(), hashlib.sha256).digest()
        return cid if cid == client_id and hmac.compare_digest(mac, expected) else None

    def error(status: int, code: str) -> web.Response:
        return web.json_response({"error": code}, status=status, headers=_NO_STORE)

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        cid = authenticate(request)
        if cid is None:
            return error(401, "invalid_client")
        if form.get("grant_type") != "client_credentials":
            return error(400, "unsupported_grant_type")
        scope = str(form.get("scope", ""))
        audience = str(form.get("resource", cid))
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": issuer, "sub": cid, "aud": [audience], "iat": now, "exp": now + 600,
            "jti": secrets.token_urlsafe(18), "auth_time": now, "client_id": cid, "scope": scope,
        }  # fmt: skip
        access = jwt.encode(
            claims, private_key, algorithm="ES256", headers={"kid": kid, "typ": "at+jwt"}
        )
        body = {"access_token": access, "token_type": "Bearer", "expires_in": 600, "scope": scope}
        return web.json_response(body, headers=_NO_STORE, dumps=json.dumps)

    async def introspect(request: web.Request) -> web.Response:
        form = await request.post()
        cid = authenticate(request)
        if cid is None:
            return error(401, "invalid_client")
        try:
            claims = jwt.decode(
                str(form.get("token", "")), public_key, algorithms=["ES256"], issuer=issuer,
                options={"require": ["iss", "sub", "aud", "exp", "iat", "jti", "client_id"],
                         "verify_aud": False},
            )  # fmt: skip
        except jwt.PyJWTError:
            return web.json_response({"active": False}, headers=_NO_STORE)
        body = {"active": True, "token_type": "Bearer", **claims}
        return web.json_response(body, headers=_NO_STORE, dumps=json.dumps)

    app = web.Application()
    app.router.add_post("/token", token)
    app.router.add_post("/introspect", introspect)
    return app


if __name__ == "__main__":
    port, client_id, issuer = sys.argv[1:4]
    web.run_app(
        build_app(client_id, os.environ["BENCH_CLIENT_SECRET"], issuer),
        host="127.0.0.1", port=int(port), access_log=None, print=None,
    )  # fmt: skip
