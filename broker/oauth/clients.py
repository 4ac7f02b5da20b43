"""OAuth clients: where they are registered and how they authenticate.

Clients come from settings and from the admin API (SQL). Client secrets exist only as scrypt
hashes; a verified secret is remembered in memory for a few minutes as an HMAC under a
per-process key, so the slow hash is paid once, not on every token request.
Authentication follows RFC 6749 §2.3 (`client_secret_basic`, `client_secret_post`),
RFC 7523 §2.2 / §3 (`private_key_jwt`, with a `jti` replay cache) and public clients.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

import aiohttp
import jwt
from aiohttp import web
from pydantic import ValidationError
from sqlalchemy import delete, select

from broker.cache import Cache
from broker.errors import (
    Conflict,
    InvalidClient,
    InvalidRequest,
    InvalidScope,
    NotFound,
    UpstreamFailed,
)
from broker.settings import SECRET_HASH_PREFIX, ClientConfig, format_validation_error
from broker.storage import Database, OAuthClientRecord

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGORITHMS = ["ES256", "ES384", "RS256", "PS256", "EdDSA"]
ASSERTION_MAX_LIFETIME = 3600  # authlib signs exp = iat + 1 h by default; the jti cache covers it
_SCRYPT = {"n": 2**15, "r": 8, "p": 1}
_VERIFIED_FOR = 300.0
CLI_CLIENT_ID = "broker-cli"


def hash_secret(secret: str) -> str:
    """A scrypt hash of a client secret, in the form settings and the admin API store."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, maxmem=2**26, dklen=32, **_SCRYPT)
    b64 = base64.urlsafe_b64encode
    return (
        f"{SECRET_HASH_PREFIX}{_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}$"
        f"{b64(salt).decode()}${b64(digest).decode()}"
    )


def check_secret(secret: str, stored: str) -> bool:
    """Constant-time check of `secret` against a `hash_secret` value."""
    try:
        _, n, r, p, salt, digest = stored.split("$")
        expected = base64.urlsafe_b64decode(digest)
        actual = hashlib.scrypt(
            secret.encode(), salt=base64.urlsafe_b64decode(salt), n=int(n), r=int(r), p=int(p),
            maxmem=2**26, dklen=len(expected),
        )  # fmt: skip
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


@dataclass(frozen=True, slots=True)
class Client:
    """A registered client as the authorization server uses it."""

    config: ClientConfig
    source: str  # "settings", "admin" or "builtin"

    @property
    def id(self) -> str:
        return self.config.client_id

    @property
    def public(self) -> bool:
        return self.config.auth_method == "none"

    def allows_grant(self, grant_type: str) -> bool:
        return grant_type in self.config.grant_types

    def default_audience(self) -> list[str]:
        return list(self.config.audiences) or [self.config.client_id]

    def narrow_scopes(self, requested: str | None) -> list[str]:
        """Requested scopes, all of which the client may ask for; None → every allowed one."""
        allowed = list(dict.fromkeys(self.config.scopes))
        if requested is None:
            return allowed
        asked = list(dict.fromkeys(requested.split()))
        refused = [s for s in asked if s not in allowed]
        if refused:
            raise InvalidScope(f"this client may not ask for: {' '.join(refused)}")
        return asked


def builtin_clients(
    cli_client: bool, *, issuer: str = "", backends: Sequence[str] = ()
) -> list[ClientConfig]:
    """`broker-cli`: the public client the `broker login` command uses (device flow). Its
    tokens are addressed to the broker itself and may carry `launch:<backend>` for every
    configured backend, so `broker credentials` can call `/v1/credentials` with them, and
    `repo:read` for `broker git-credential` (the git gateway), `grants` and `secrets` for
    `/v1/grants` and `/v1/secrets`."""
    if not cli_client:
        return []
    return [
        ClientConfig(
            client_id=CLI_CLIENT_ID,
            name="binder-broker command line",
            auth_method="none",
            grant_types=["urn:ietf:params:oauth:grant-type:device_code", "refresh_token"],
            scopes=["openid", "profile", "email", "groups", "offline_access", "repo:read"]
            + ["grants", "secrets"]
            + [f"launch:{backend}" for backend in backends],
            audiences=[issuer] if issuer else [],
            first_party=True,
        )
    ]


class ClientRegistry:
    """Finds clients and authenticates them at the token, introspection and revocation endpoints."""

    def __init__(
        self,
        configs: Sequence[ClientConfig],
        *,
        db: Database,
        cache: Cache,
        http: aiohttp.ClientSession,
        issuer: str,
        token_endpoint: str,
        clock_skew: int,
        cli_client: bool = True,
        backends: Sequence[str] = (),
    ) -> None:
        self._static: dict[str, Client] = {
            c.client_id: Client(c, "builtin")
            for c in builtin_clients(cli_client, issuer=issuer, backends=backends)
        }
        self._static.update({c.client_id: Client(c, "settings") for c in configs})
        self._db = db
        self._cache = cache
        self._http = http
        self._audiences = {issuer, token_endpoint}
        self._skew = clock_skew
        self._mac_key = secrets.token_bytes(32)
        self._verified: dict[str, tuple[bytes, float]] = {}
        self._checking: dict[bytes, asyncio.Future[bool]] = {}
        self._jwks: dict[str, tuple[float, dict[str, Any]]] = {}

    # --- lookup and admin ---------------------------------------------------------------

    async def get(self, client_id: str) -> Client | None:
        client = self._static.get(client_id)
        if client is not None:
            return client
        async with self._db.sessions() as session:
            record = await session.get(OAuthClientRecord, client_id)
        if record is None:
            return None
        return Client(ClientConfig.model_validate(record.document), "admin")

    async def list(self) -> list[Client]:
        async with self._db.sessions() as session:
            records = (await session.execute(select(OAuthClientRecord))).scalars().all()
        stored = [Client(ClientConfig.model_validate(r.document), "admin") for r in records]
        return [*self._static.values(), *stored]

    async def register(self, document: Mapping[str, Any], *, actor: str) -> Client:
        """Validate and store a client; its secret, if any, is already a hash."""
        try:
            config = ClientConfig.model_validate(document)
        except ValidationError as error:
            raise InvalidRequest("; ".join(format_validation_error(error))) from None
        if config.client_id in self._static or await self.get(config.client_id) is not None:
            raise Conflict(f"a client {config.client_id!r} already exists")
        record = OAuthClientRecord(
            client_id=config.client_id,
            document=_stored_document(config),
            created_at=datetime.now(UTC),
            created_by=actor,
        )
        async with self._db.sessions() as session, session.begin():
            session.add(record)
        return Client(config, "admin")

    async def remove(self, client_id: str) -> None:
        if client_id in self._static:
            raise Conflict("clients from the settings file are removed there")
        async with self._db.sessions() as session, session.begin():
            result = await session.execute(
                delete(OAuthClientRecord).where(OAuthClientRecord.client_id == client_id)
            )
        if getattr(result, "rowcount", 0) == 0:
            raise NotFound(f"no client {client_id!r}")

    # --- authentication -----------------------------------------------------------------

    async def authenticate(self, request: web.Request, form: Mapping[str, str]) -> Client:
        """The client this request authenticates as, by exactly one method; else InvalidClient."""
        header = request.headers.get("Authorization", "")
        used_basic = header[:6].lower() == "basic "
        used_post = "client_secret" in form
        used_assertion = "client_assertion" in form or "client_assertion_type" in form
        if used_basic + used_post + used_assertion > 1:
            raise InvalidRequest("use exactly one client authentication method")
        try:
            if not (used_basic or used_post or used_assertion):
                return await self._public(form)
            if used_basic:
                client_id, secret = _basic_credentials(header)
                if "client_id" in form and form["client_id"] != client_id:
                    raise InvalidClient("client_id does not match the authenticated client")
                return await self._with_secret(client_id, secret, "client_secret_basic")
            if used_post:
                return await self._with_secret(
                    form.get("client_id", ""), form["client_secret"], "client_secret_post"
                )
            return await self._with_assertion(form)
        except InvalidClient as error:
            if used_basic:
                error.headers["WWW-Authenticate"] = 'Basic realm="binder-broker"'
            raise

    async def _public(self, form: Mapping[str, str]) -> Client:
        client = await self.get(form.get("client_id", ""))
        if client is None or not client.public:
            raise InvalidClient("client authentication is required")
        return client

    async def _with_secret(self, client_id: str, secret: str, method: str) -> Client:
        client = await self.get(client_id)
        if (
            client is None
            or client.config.auth_method != method
            or client.config.secret_hash is None
        ):
            raise InvalidClient("unknown client or wrong authentication method")
        mac = hmac.digest(self._mac_key, f"{client_id}\x00{secret}".encode(), "sha256")
        remembered = self._verified.get(client_id)
        if (
            remembered
            and hmac.compare_digest(remembered[0], mac)
            and remembered[1] > time.monotonic()
        ):
            return client
        stored = client.config.secret_hash.get_secret_value()
        # Single flight: a burst of requests with the same credentials pays scrypt once.
        pending = self._checking.get(mac)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(check_secret, secret, stored))
            self._checking[mac] = pending
            pending.add_done_callback(lambda _: self._checking.pop(mac, None))
        if not await asyncio.shield(pending):
            raise InvalidClient("client authentication failed")
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[client_id] = (mac, time.monotonic() + _VERIFIED_FOR)
        return client

    async def _with_assertion(self, form: Mapping[str, str]) -> Client:
        if form.get("client_assertion_type") != ASSERTION_TYPE or "client_assertion" not in form:
            raise InvalidClient(f"client_assertion_type must be {ASSERTION_TYPE}")
        assertion = form["client_assertion"]
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            raise InvalidClient("the client assertion is not a JWT") from None
        client_id = str(unverified.get("iss", ""))
        if "client_id" in form and form["client_id"] != client_id:
            raise InvalidClient("client_id does not match the assertion")
        client = await self.get(client_id)
        if client is None or client.config.auth_method != "private_key_jwt":
            raise InvalidClient("unknown client or wrong authentication method")
        if header.get("alg") not in ASSERTION_ALGORITHMS:
            raise InvalidClient("the assertion's algorithm is not accepted")
        key = await self._assertion_key(client, header.get("kid"), str(header.get("alg")))
        try:
            claims = jwt.decode(
                assertion, key, algorithms=[str(header["alg"])], audience=list(self._audiences),
                issuer=client_id, leeway=self._skew,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )  # fmt: skip
        except jwt.PyJWTError as error:
            raise InvalidClient(
                "the client assertion is not valid", log_detail=type(error).__name__
            ) from None
        if claims["sub"] != client_id:
            raise InvalidClient("the assertion's sub must be the client_id")
        remaining = float(claims["exp"]) - time.time()
        if remaining > ASSERTION_MAX_LIFETIME:
            raise InvalidClient("the client assertion lives too long (at most one hour)")
        fresh = await self._cache.add(
            f"assertion-jti:{client_id}:{claims['jti']}", "1", max(remaining, 0) + self._skew + 1
        )
        if not fresh:
            raise InvalidClient("the client assertion was already used")
        return client

    async def _assertion_key(self, client: Client, kid: object, alg: str) -> Any:
        jwks = client.config.jwks or await self._fetch_jwks(client, force=False)
        key = _select_key(jwks, kid, alg)
        if key is None and client.config.jwks_uri:
            key = _select_key(await self._fetch_jwks(client, force=True), kid, alg)
        if key is None:
            raise InvalidClient("no key of the client matches the assertion")
        return key

    async def _fetch_jwks(self, client: Client, *, force: bool) -> dict[str, Any]:
        uri = client.config.jwks_uri or ""
        cached = self._jwks.get(uri)
        # Keys are cached for 5 minutes; an unknown kid refetches, at most once a minute.
        if cached is not None and time.monotonic() - cached[0] < (60 if force else 300):
            return cached[1]
        try:
            async with self._http.get(uri, timeout=aiohttp.ClientTimeout(total=5)) as response:
                response.raise_for_status()
                document: dict[str, Any] = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise UpstreamFailed(
                "the client's keys could not be fetched", log_detail=f"{uri}: {error!r}"
            ) from None
        self._jwks[uri] = (time.monotonic(), document)
        return document


def _stored_document(config: ClientConfig) -> dict[str, Any]:
    """The client as stored in SQL; the secret *hash* must survive (pydantic masks it)."""
    document = config.model_dump(mode="json", exclude_none=True)
    if config.secret_hash is not None:
        document["secret_hash"] = config.secret_hash.get_secret_value()
    return document


def _basic_credentials(header: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise InvalidClient("malformed Basic credentials") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise InvalidClient("malformed Basic credentials")
    # RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
    return unquote_plus(client_id), unquote_plus(secret)


def _select_key(jwks: Mapping[str, Any], kid: object, alg: str) -> Any:
    for entry in jwks.get("keys", []):
        if kid is not None and entry.get("kid") != kid:
            continue
        if entry.get("alg") not in (None, alg):
            continue
        try:
            return jwt.PyJWK(entry, algorithm=alg).key
        except jwt.PyJWTError:
            continue
    return None
