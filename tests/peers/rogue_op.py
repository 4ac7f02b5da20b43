"""A hostile OpenID provider on loopback, for the attacks a certified OP will not perform.

node oidc-provider (tests/peers/oidc_op) is OpenID Certified: it will not sign an ID token
with `alg=none`, MAC one with its public key, send another issuer's `iss`, the wrong `aud` or
an expired token. This in-process aiohttp server does, on request of the test. Its endpoints
follow OpenID Connect Discovery 1.0 (§4 provider metadata at
`/.well-known/openid-configuration`, `jwks_uri`) and OpenID Connect Core 1.0 (§3.1.2 the
authorization endpoint of the code flow, which redirects straight back with a code - there is
no user to authenticate; §3.1.3 the token endpoint with client_secret_basic or a public
client, PKCE S256 per RFC 7636; §5.3 userinfo), plus RFC 9207 `iss` in authorization
responses when `iss_parameter` is set.

Each test shapes the answer through `RogueOp.craft`: a function from the honest ID-token
claims and header (already carrying the request's nonce) to the compact token to return.
`sign`, `unsigned` and `hs256_with_public_key` build the usual forgeries.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

Craft = Callable[[dict[str, Any], dict[str, Any]], str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class _Request:
    client_id: str
    redirect_uri: str
    nonce: str | None
    challenge: str


@dataclass
class RogueOp:
    """Start with `await RogueOp.start(client_id, secret, redirect_uris)`; `await stop()`."""

    client_id: str
    client_secret: str | None
    redirect_uris: list[str]
    port: int = 0
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    kid: str = "rogue-rs256"
    # An RSA key that is NOT in the JWKS, for "unknown kid" and "wrong key" forgeries.
    stray_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    iss_parameter: bool = True  # RFC 9207: advertised and sent
    craft: Craft | None = None
    error: str | None = None  # answer the authorization request with this error code
    subject: str = "rogue-user-1"
    extra_claims: dict[str, Any] = field(default_factory=dict)
    codes: dict[str, _Request] = field(default_factory=dict)
    access_tokens: dict[str, str] = field(default_factory=dict)  # token -> sub
    issued_id_tokens: list[str] = field(default_factory=list)
    jwks_hits: int = 0
    _runner: web.AppRunner | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    async def start(
        cls, client_id: str, client_secret: str | None, redirect_uris: list[str]
    ) -> RogueOp:
        op = cls(client_id, client_secret, redirect_uris, port=free_port())
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", op._discovery)
        app.router.add_get("/jwks", op._jwks)
        app.router.add_get("/authorize", op._authorize)
        app.router.add_post("/token", op._token)
        app.router.add_get("/userinfo", op._userinfo)
        op._runner = web.AppRunner(app, access_log=None)
        await op._runner.setup()
        await web.TCPSite(op._runner, "127.0.0.1", op.port).start()
        return op

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def reset(self) -> None:
        self.craft = None
        self.error = None
        self.iss_parameter = True
        self.extra_claims = {}

    # -- forgeries -----------------------------------------------------------------------

    def sign(
        self,
        claims: dict[str, Any],
        *,
        alg: str = "RS256",
        kid: str | None = None,
        key: Any = None,
    ) -> str:
        """A JWS over `claims` with this OP's published key (or `key`)."""
        return jwt.encode(claims, key or self.key, algorithm=alg, headers={"kid": kid or self.kid})

    @staticmethod
    def unsigned(claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
        """`alg=none` with an empty signature (RFC 7519 §6), built by hand."""
        head = {"alg": "none", "typ": "JWT", **(header or {})}
        return f"{b64url(json.dumps(head).encode())}.{b64url(json.dumps(claims).encode())}."

    def hs256_with_public_key(self, claims: dict[str, Any]) -> str:
        """The key-confusion forgery: HMAC-SHA256 keyed with the OP's public key PEM, as a
        verifier that trusts the token's `alg` would check it. Built by hand because PyJWT
        refuses to use a PEM as an HMAC secret."""
        pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": self.kid}).encode())
        body = b64url(json.dumps(claims).encode())
        mac = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{b64url(mac)}"

    # -- endpoints -----------------------------------------------------------------------

    async def _discovery(self, request: web.Request) -> web.Response:
        doc: dict[str, Any] = {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "userinfo_endpoint": f"{self.issuer}/userinfo",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
        }
        if self.iss_parameter:
            doc["authorization_response_iss_parameter_supported"] = True
        return web.json_response(doc)

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_hits += 1
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return web.json_response({"keys": [jwk]}, headers={"Cache-Control": "max-age=300"})

    async def _authorize(self, request: web.Request) -> web.Response:
        q = request.query
        if q.get("client_id") != self.client_id or q.get("redirect_uri") not in self.redirect_uris:
            return web.Response(status=400, text="unknown client or redirect_uri")
        if q.get("response_type") != "code" or q.get("code_challenge_method") != "S256":
            return web.Response(status=400, text="code flow with PKCE S256 only")
        answer: dict[str, str] = {"state": q.get("state", "")}
        if self.error:
            answer.update(error=self.error, error_description="refused by the rogue OP")
        else:
            code = secrets.token_urlsafe(24)
            self.codes[code] = _Request(
                self.client_id, q["redirect_uri"], q.get("nonce"), q.get("code_challenge", "")
            )
            answer["code"] = code
        if self.iss_parameter:
            answer["iss"] = self.issuer
        raise web.HTTPFound(f"{q['redirect_uri']}?{urlencode(answer)}")

    def _client_ok(self, request: web.Request, form: Any) -> bool:
        if self.client_secret is None:
            return bool(form.get("client_id") == self.client_id)
        expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        return request.headers.get("Authorization") == f"Basic {expected}"

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if not self._client_ok(request, form):
            return web.json_response({"error": "invalid_client"}, status=401)
        pending = self.codes.pop(str(form.get("code", "")), None)
        if pending is None or form.get("redirect_uri") != pending.redirect_uri:
            return web.json_response({"error": "invalid_grant"}, status=400)
        verifier = str(form.get("code_verifier", ""))
        if b64url(hashlib.sha256(verifier.encode()).digest()) != pending.challenge:
            return web.json_response({"error": "invalid_grant"}, status=400)
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": self.subject,
            "aud": self.client_id,
            "iat": now,
            "exp": now + 300,
            "auth_time": now,
            "name": "Rogue User",
            "email": "rogue@example.org",
            **({"nonce": pending.nonce} if pending.nonce else {}),
            **self.extra_claims,
        }
        header = {"alg": "RS256", "kid": self.kid}
        id_token = self.craft(claims, header) if self.craft else self.sign(claims)
        self.issued_id_tokens.append(id_token)
        access = secrets.token_urlsafe(24)
        self.access_tokens[access] = self.subject
        return web.json_response(
            {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": 300,
                "id_token": id_token,
            },
            headers={"Cache-Control": "no-store"},
        )

    async def _userinfo(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        sub = self.access_tokens.get(token)
        if sub is None:
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response({"sub": sub, "groups": ["rogue-group"]})
