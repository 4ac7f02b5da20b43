"""A stand-in Globus Auth (and Groups) service on loopback, for globus-sdk to talk to.

Globus Auth cannot run here. This server follows the Globus Auth API reference
(https://docs.globus.org/api/auth/reference/, API v2: `/v2/oauth2/authorize`,
`/v2/oauth2/token` with the authorization_code, refresh_token and
`urn:globus:auth:grant_type:dependent_token` grants, `/v2/oauth2/token/introspect` with
`include=session_info`, `/v2/oauth2/userinfo`, `/v2/api/identities`, `/jwk.json`,
`/.well-known/openid-configuration`), the Groups API v2 (`GET /v2/groups/my_groups`), and the
Globus Auth Requirements Error format (`code` + `authorization_parameters`). Response bodies
are built from the response fixtures shipped in `globus_sdk.testing` (token, dependent-token,
introspection, identities and my_groups shapes, the `invalid_grant` error) with this test's
values put in, rather than from invented shapes.

globus-sdk is pointed here with `GLOBUS_SDK_SERVICE_URL_AUTH` and `GLOBUS_SDK_SERVICE_URL_GROUPS`
(set by the `globus_auth` fixture with monkeypatch, before the broker builds its clients).

Scripting: `login_as(account)` chooses who "signs in" at the next authorize request (the login
page is skipped: authorize redirects straight back with a code); `require_mfa_for_dependent`
makes the dependent-token grant answer 403 with a session requirement (MFA) until the user has
signed in with MFA (an authorize request with `session_required_mfa=true`); `authorize_error`,
`token_error`, `id_token_overrides`, `sign_with_rogue_key`, `unsigned_id_token` and
`mfa_never_satisfied` produce hostile or unhelpful answers.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from globus_sdk.testing import get_response_set

CLIENT_ID = "5a2e1f64-7bd8-4c1e-9a63-2f1f0c7e0b11"
CLIENT_SECRET = "globus-client-secret-0123456789"
RESOURCE_SCOPE = f"https://auth.globus.org/scopes/{CLIENT_ID}/launch"
TRANSFER_RS = "transfer.api.globus.org"
TRANSFER_SCOPE = "urn:globus:auth:scope:transfer.api.globus.org:all"
COLLECTION_ID = "543aade1-db97-4a4b-9bdf-0b58e78dfa69"
DATA_ACCESS_SCOPE = f"https://auth.globus.org/scopes/{COLLECTION_ID}/data_access"
GROUPS_RS = "groups.api.globus.org"
GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"
IDENTITY_SET_SCOPE = "urn:globus:auth:scope:auth.globus.org:view_identity_set"
DEPENDENT_GRANT = "urn:globus:auth:grant_type:dependent_token"
ACCESS_IDP = "0dcf5063-bffd-40f7-b403-24f97e32fa47"  # ACCESS CI (XSEDE) at Globus
CAMPUS_IDP = "8e3a5b1f-2d4c-4c6b-9f3e-7a1b2c3d4e5f"


def _fixture(name: str, case: str) -> Any:
    return copy.deepcopy(get_response_set(name).lookup(case).json)


@dataclass
class Identity:
    """One Globus identity, in the field names of `GET /v2/api/identities`."""

    id: str
    username: str
    name: str
    email: str
    organization: str
    identity_provider: str
    identity_provider_display_name: str

    def api(self) -> dict[str, Any]:
        # The fixture's identity shape, with our values.
        shape = _fixture("auth.get_identities", "sirosen")["identities"][0]
        shape.update(
            id=self.id, username=self.username, name=self.name, email=self.email,
            organization=self.organization, identity_provider=self.identity_provider,
            status="used",
        )  # fmt: skip
        return dict(shape)

    def claim(self) -> dict[str, Any]:
        """As an entry of the `identity_set` claim (ID token / userinfo)."""
        return {
            "sub": self.id, "username": self.username, "name": self.name, "email": self.email,
            "organization": self.organization, "identity_provider": self.identity_provider,
            "identity_provider_display_name": self.identity_provider_display_name,
            "last_authentication": int(time.time()),
        }  # fmt: skip


@dataclass
class Account:
    """A Globus user: a primary identity and the identities linked to it, and their groups."""

    primary: Identity
    linked: list[Identity]
    groups: list[dict[str, Any]]

    @property
    def identities(self) -> list[Identity]:
        return [self.primary, *self.linked]


def ada() -> Account:
    """An ACCESS identity (primary) linked with a campus one, in the fixtures' groups."""
    access = Identity(
        str(uuid.uuid4()), "ada@access-ci.org", "Ada Lovelace", "ada@access-ci.org",
        "ACCESS", ACCESS_IDP, "ACCESS CI (XSEDE)",
    )  # fmt: skip
    campus = Identity(
        str(uuid.uuid4()), "alovelace@uchicago.edu", "Ada Lovelace", "alovelace@uchicago.edu",
        "University of Chicago", CAMPUS_IDP, "University of Chicago",
    )  # fmt: skip
    groups = _fixture("groups.get_my_groups", "default")[:3]
    for group in groups:
        for membership in group["my_memberships"]:
            membership.update(identity_id=access.id, username=access.username)
    groups[2]["my_memberships"][0]["status"] = "invited"  # not active: no group
    return Account(access, [campus], groups)


@dataclass
class _Session:
    account: Account
    mfa: bool
    auth_time: int
    scopes: list[str]


@dataclass
class _Token:
    resource_server: str
    scope: str
    session: _Session
    expires_at: int
    refresh_token: str | None = None


@dataclass
class GlobusAuthStandIn:
    """The server's state; tests script it and read what it was asked."""

    base: str = ""
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    rogue_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    redirect_uris: list[str] = field(default_factory=list)
    account: Account | None = None
    require_mfa_for_dependent: bool = False
    authorize_error: str | None = None
    token_error: tuple[int, dict[str, Any]] | None = None
    id_token_overrides: dict[str, Any] = field(default_factory=dict)
    id_token_without_identity_set: bool = False
    sign_with_rogue_key: bool = False
    unsigned_id_token: bool = False  # alg "none"
    mfa_never_satisfied: bool = False  # the user cannot complete the second factor
    dependent_ttl: int = 172800
    authorize_requests: list[dict[str, str]] = field(default_factory=list)
    callbacks: list[str] = field(default_factory=list)  # every redirect back, with its code
    grants: list[str] = field(default_factory=list)
    issued: dict[str, _Token] = field(default_factory=dict)
    _codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    _refresh: dict[str, _Token] = field(default_factory=dict)
    _mfa_done: bool = False

    @property
    def issuer(self) -> str:
        return self.base

    def login_as(self, account: Account) -> None:
        self.account = account

    # -- helpers ---------------------------------------------------------------------------

    def _token(
        self, rs: str, scope: str, session: _Session, ttl: int, refresh: bool
    ) -> dict[str, Any]:
        value = secrets.token_urlsafe(32)
        refresh_token = secrets.token_urlsafe(32) if refresh else None
        record = _Token(rs, scope, session, int(time.time()) + ttl, refresh_token)
        self.issued[value] = record
        if refresh_token:
            self._refresh[refresh_token] = record
        # The shape of `auth.oauth2_exchange_code_for_tokens` (one token of a response).
        shape = _fixture("auth.oauth2_exchange_code_for_tokens", "default")
        shape.update(access_token=value, scope=scope, expires_in=ttl, resource_server=rs)
        shape.pop("state", None)
        shape.pop("other_tokens", None)
        if refresh_token:
            shape["refresh_token"] = refresh_token
        return dict(shape)

    def _id_token(self, session: _Session, at_hash_of: str) -> str:
        account = session.account
        digest = hashlib.sha512(at_hash_of.encode()).digest()
        claims: dict[str, Any] = {
            "iss": self.issuer, "aud": CLIENT_ID, "sub": account.primary.id,
            "iat": int(time.time()), "exp": int(time.time()) + 172800,
            "at_hash": base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode(),
            "name": account.primary.name, "email": account.primary.email,
            "preferred_username": account.primary.username,
            "organization": account.primary.organization,
            "identity_provider": account.primary.identity_provider,
            "identity_provider_display_name": account.primary.identity_provider_display_name,
            "last_authentication": session.auth_time,
        }  # fmt: skip
        if not self.id_token_without_identity_set:
            claims["identity_set"] = [i.claim() for i in account.identities]
        claims.update(self.id_token_overrides)
        if self.unsigned_id_token:
            return jwt.encode(claims, None, algorithm="none")
        key = self.rogue_key if self.sign_with_rogue_key else self.key
        return jwt.encode(claims, key, algorithm="RS512", headers={"kid": "globus-standin"})

    def _client_ok(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        pair = base64.b64decode(header[6:]).decode()
        return pair == f"{CLIENT_ID}:{CLIENT_SECRET}"

    def _bearer(self, request: web.Request, rs: str) -> _Token | None:
        header = request.headers.get("Authorization", "")
        token = self.issued.get(header.removeprefix("Bearer "))
        if token is None or token.resource_server != rs or token.expires_at < time.time():
            return None
        return token

    # -- handlers --------------------------------------------------------------------------

    async def openid_configuration(self, request: web.Request) -> web.Response:
        return web.json_response({
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.base}/v2/oauth2/authorize",
            "token_endpoint": f"{self.base}/v2/oauth2/token",
            "userinfo_endpoint": f"{self.base}/v2/oauth2/userinfo",
            "jwks_uri": f"{self.base}/jwk.json",
            "response_types_supported": ["code", "token", "token id_token", "id_token"],
            "id_token_signing_alg_values_supported": ["RS512"],
            "scopes_supported": ["openid", "email", "profile"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            "claims_supported": ["at_hash", "aud", "email", "exp", "name", "nonce",
                                 "preferred_username", "iat", "iss", "sub"],
            "subject_types_supported": ["public"],
        })  # fmt: skip

    async def jwk(self, request: web.Request) -> web.Response:
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        public.update(alg="RS512", use="sig", kid="globus-standin")
        return web.json_response({"keys": [public]})

    async def authorize(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        self.authorize_requests.append(query)
        redirect = query.get("redirect_uri", "")
        if query.get("client_id") != CLIENT_ID or redirect not in self.redirect_uris:
            return web.Response(status=400, text="unknown client or redirect_uri")
        if query.get("response_type") != "code":
            return web.Response(status=400, text="response_type must be code")
        state = query.get("state", "")
        if self.authorize_error:
            params = {"error": self.authorize_error, "state": state}
            raise web.HTTPFound(f"{redirect}?{urlencode(params)}")
        assert self.account is not None, "call login_as() first"
        if query.get("session_required_mfa", "").lower() == "true" and not (
            self.mfa_never_satisfied
        ):
            self._mfa_done = True  # the user went through the second factor
        session = _Session(self.account, self._mfa_done, int(time.time()),
                           query.get("scope", "").split())  # fmt: skip
        code = secrets.token_urlsafe(24)
        self._codes[code] = {
            "redirect_uri": redirect, "session": session,
            "challenge": query.get("code_challenge"), "method": query.get("code_challenge_method"),
        }  # fmt: skip
        back = f"{redirect}?{urlencode({'code': code, 'state': state})}"
        self.callbacks.append(back)
        raise web.HTTPFound(back)

    async def token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        grant = str(form.get("grant_type", ""))
        self.grants.append(grant)
        if not self._client_ok(request):
            return web.json_response({"error": "invalid_client"}, status=401)
        if self.token_error is not None:
            status, body = self.token_error
            return web.json_response(body, status=status)
        invalid = _fixture("auth.oauth2_exchange_code_for_tokens", "invalid_grant")
        if grant == "authorization_code":
            record = self._codes.pop(str(form.get("code", "")), None)
            if record is None or record["redirect_uri"] != form.get("redirect_uri"):
                return web.json_response(invalid, status=401)
            if record["challenge"] is not None:
                verifier = str(form.get("code_verifier", ""))
                digest = hashlib.sha256(verifier.encode()).digest()
                expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
                if record["method"] != "S256" or expected != record["challenge"]:
                    return web.json_response(invalid, status=401)
            session: _Session = record["session"]
            auth_scopes = [s for s in session.scopes if s in
                           ("openid", "profile", "email", IDENTITY_SET_SCOPE)]  # fmt: skip
            top = self._token("auth.globus.org", " ".join(auth_scopes), session, 172800, False)
            top["id_token"] = self._id_token(session, top["access_token"])
            others = []
            if GROUPS_SCOPE in session.scopes:
                others.append(self._token(GROUPS_RS, GROUPS_SCOPE, session, 172800, False))
            if RESOURCE_SCOPE in session.scopes:
                others.append(self._token(CLIENT_ID, RESOURCE_SCOPE, session, 172800, False))
            top["other_tokens"] = others
            top["state"] = "_default"
            return web.json_response(top)
        if grant == "refresh_token":
            found = self._refresh.get(str(form.get("refresh_token", "")))
            if found is None:
                return web.json_response(invalid, status=401)
            fresh = self._token(found.resource_server, found.scope, found.session,
                                self.dependent_ttl, False)  # fmt: skip
            fresh["refresh_token"] = form["refresh_token"]
            fresh["other_tokens"] = []
            return web.json_response(fresh)
        if grant == DEPENDENT_GRANT:
            own = self.issued.get(str(form.get("token", "")))
            if own is None or own.resource_server != CLIENT_ID:
                return web.json_response(invalid, status=401)
            if self.require_mfa_for_dependent and not own.session.mfa:
                error_id = str(uuid.uuid4())
                return web.json_response({
                    "errors": [{"status": "403", "id": error_id, "code": "FORBIDDEN",
                                "detail": "A session with MFA is required.",
                                "title": "Forbidden"}],
                    "error": "forbidden", "error_description": "MFA required",
                    "code": "AuthorizationRequired",
                    "authorization_parameters": {
                        "session_message": "The collection requires multi-factor sign-in.",
                        "session_required_mfa": True,
                    },
                }, status=403)  # fmt: skip
            offline = form.get("access_type") == "offline"
            wanted = str(form.get("scope", "")).split()
            out = []
            for scope in wanted:
                rs = {TRANSFER_SCOPE: TRANSFER_RS, DATA_ACCESS_SCOPE: COLLECTION_ID}.get(scope)
                if rs is None:
                    continue
                item = self._token(rs, scope, own.session, self.dependent_ttl, offline)
                out.append(item)
            # The shape of `auth.oauth2_get_dependent_tokens` (a JSON list of tokens).
            assert isinstance(
                _fixture("auth.oauth2_get_dependent_tokens", "groups_with_refresh_token"), list
            )
            return web.json_response(out)
        return web.json_response({"error": "unsupported_grant_type"}, status=400)

    async def introspect(self, request: web.Request) -> web.Response:
        if not self._client_ok(request):
            return web.json_response({"error": "invalid_client"}, status=401)
        form = dict(await request.post())
        found = self.issued.get(str(form.get("token", "")))
        if found is None or found.resource_server != CLIENT_ID:
            return web.json_response({"active": False})
        body = _fixture("auth.oauth2_token_introspect", "default")
        account = found.session.account
        body.update(
            scope=found.scope, client_id=CLIENT_ID, username=account.primary.username,
            name=account.primary.name, email=account.primary.email, sub=account.primary.id,
            exp=found.expires_at, iat=int(time.time()), nbf=int(time.time()),
            aud=[CLIENT_ID], iss=self.issuer,
        )  # fmt: skip
        if "session_info" in str(form.get("include", "")):
            body["session_info"] = {
                "session_id": str(uuid.uuid4()),
                "authentications": {
                    account.primary.id: {
                        "acr": None, "amr": ["mfa"] if found.session.mfa else None,
                        "auth_time": found.session.auth_time,
                        "idp": account.primary.identity_provider, "custom_claims": {},
                    }
                },
            }  # fmt: skip
        return web.json_response(body)

    async def userinfo(self, request: web.Request) -> web.Response:
        found = self._bearer(request, "auth.globus.org")
        if found is None:
            return web.json_response(_fixture("auth.userinfo", "unauthorized"), status=401)
        account = found.session.account
        return web.json_response({
            "sub": account.primary.id, "name": account.primary.name,
            "email": account.primary.email, "preferred_username": account.primary.username,
            "organization": account.primary.organization,
            "identity_provider": account.primary.identity_provider,
            "identity_provider_display_name": account.primary.identity_provider_display_name,
            # Linked identities listed by id only, as when a user has not consented to show
            # the details: the broker looks them up with GET /v2/api/identities.
            "identity_set": [account.primary.claim()]
            + [{"sub": i.id} for i in account.linked],
        })  # fmt: skip

    async def identities(self, request: web.Request) -> web.Response:
        found = self._bearer(request, "auth.globus.org")
        if found is None:
            return web.json_response(_fixture("auth.get_identities", "unauthorized"), status=401)
        ids = request.query.get("ids", "").split(",")
        known = {i.id: i for i in found.session.account.identities}
        return web.json_response({"identities": [known[i].api() for i in ids if i in known]})

    async def my_groups(self, request: web.Request) -> web.Response:
        found = self._bearer(request, GROUPS_RS)
        if found is None:
            return web.json_response({"code": "AUTHENTICATION_ERROR"}, status=401)
        return web.json_response(found.session.account.groups)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.openid_configuration)
        app.router.add_get("/jwk.json", self.jwk)
        app.router.add_get("/v2/oauth2/authorize", self.authorize)
        app.router.add_post("/v2/oauth2/token", self.token)
        app.router.add_post("/v2/oauth2/token/introspect", self.introspect)
        app.router.add_get("/v2/oauth2/userinfo", self.userinfo)
        app.router.add_get("/v2/api/identities", self.identities)
        app.router.add_get("/v2/groups/my_groups", self.my_groups)
        return app


@pytest_asyncio.fixture
async def globus_auth(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[GlobusAuthStandIn]:
    """The stand-in on a free loopback port; globus-sdk is pointed at it for this test."""
    standin = GlobusAuthStandIn()
    runner = web.AppRunner(standin.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    standin.base = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", f"{standin.base}/")
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_GROUPS", f"{standin.base}/")
    try:
        yield standin
    finally:
        await runner.cleanup()
