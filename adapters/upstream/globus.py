"""Sign-in with Globus Auth: ACCESS, campus and other linked identities, Globus groups and
dependent tokens for Globus services (Globus Auth API v2, through globus-sdk).

Contracts:
- Every Globus call goes through globus-sdk (synchronous, so inside `asyncio.to_thread`). The
  service URLs are the SDK's: production by default, `GLOBUS_SDK_ENVIRONMENT` or
  `GLOBUS_SDK_SERVICE_URL_AUTH` / `..._GROUPS` to point it elsewhere.
- `begin`: the authorization code flow of a confidential client (`ConfidentialAppAuthClient`),
  `state` = the broker's flow id, PKCE S256 (the SDK's confidential flow manager has no PKCE of
  its own, so the challenge goes in as an extra authorize parameter and the verifier into the
  token request); the verifier is kept in the shared cache under `{id}:flow:{flow id}`.
- `complete` consumes that record (a callback is answered once), then checks, in order: state,
  Globus's error response, the code exchange, and the ID token: RSA alg, signature by Globus
  Auth's published key (the SDK's `IDTokenDecoder`), `aud` = our client id, `exp`/`iat`, and
  `iss` = the issuer of Globus Auth's OpenID configuration (which must be the Auth base URL).
- Mapping: subject = the primary identity id (`sub`); `claims` carry `identity_provider`,
  `identity_provider_display_name`, `preferred_username`, `organization` and every linked
  identity of the identity set (`linked_identities`, `linked_usernames`; from the ID token,
  else userinfo; `get_identities` fills in identities the set lists without a username);
  groups are `globus:<group id>` and `globus:<group name>` for each active membership the
  Groups API returns to the user's groups token (only when the user consented to that scope).
- Session requirements: a Globus answer carrying authorization parameters (a GARE, e.g.
  `session_required_mfa`), or a session that does not meet the configured `require_mfa` /
  `required_domains` (read from token introspection `session_info`), ends the attempt with
  `ReauthenticationRequired` (a `SignInAgain`): a 303 back to Globus, same flow, audited as
  `sign_in` outcome `step_up`, with `session_required_*` and
  `prompt=login`, at most `MAX_REAUTH` times per flow.
- Dependent tokens (`urn:globus:auth:grant_type:dependent_token`, with refresh tokens) for the
  configured resource servers are obtained with the token of the broker's own `resource_scope`
  and kept ONLY in Vault KV at `{vault_prefix}/upstream-tokens/{id}/{principal id}`; never in
  `Principal.claims`, errors, logs or audit. `dependent_token()` hands one out (refreshing it
  with its refresh token when it is about to expire) for the `globus` backend.
- Only `adapters.errors` types escape; `log_detail` names the failed check, never a token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import globus_sdk
import jwt
import structlog
from authlib.common.security import generate_token  # type: ignore[import-untyped]
from authlib.oauth2.rfc7636 import create_s256_code_challenge  # type: ignore[import-untyped]
from globus_sdk.gare import GlobusAuthorizationParameters, to_gare
from globus_sdk.services.auth import GlobusAuthorizationCodeFlowManager, IDTokenDecoder
from globus_sdk.services.auth.response import OAuthAuthorizationCodeResponse
from globus_sdk.transport import RequestsTransport, RetryConfig

from adapters.base import LoginFlow, Principal, Redirect, ReplayCache, SignInAgain
from adapters.errors import (
    AccessDenied,
    BrokerError,
    ConfigurationError,
    InvalidRequest,
    UpstreamFailed,
)
from adapters.vault import VaultClient

__all__ = [
    "DEPENDENT_TOKEN_GRANT",
    "GROUPS_SCOPE",
    "DependentToken",
    "GlobusUpstream",
    "ReauthenticationRequired",
    "map_identity_set",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

FLOW_TTL: Final = 600
MAX_REAUTH: Final = 2
GROUPS_SCOPE: Final = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"
GROUPS_RESOURCE_SERVER: Final = "groups.api.globus.org"
AUTH_RESOURCE_SERVER: Final = "auth.globus.org"
DEPENDENT_TOKEN_GRANT: Final = "urn:globus:auth:grant_type:dependent_token"
# Globus Auth signs ID tokens with RSA (its JWK is an RSA key; the SDK decodes only those).
_RSA_ALGS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
JWK_REFETCH_INTERVAL: Final = 300.0
# A dependent token handed out must live at least this long, else it is refreshed first.
MIN_REMAINING: Final = 120
_ERROR_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_UUID = re.compile(r"^[0-9a-fA-F-]{36}$")
_MAX_CLAIM_CHARS: Final = 512
_MAX_IDENTITIES: Final = 50
_MAX_GROUPS: Final = 500
_IDENTITY_KEYS: Final = (
    "sub", "username", "identity_provider", "identity_provider_display_name", "organization",
    "email", "name",
)  # fmt: skip
_PRIMARY_KEYS: Final = (
    "preferred_username", "identity_provider", "identity_provider_display_name",
    "organization", "email", "name",
)  # fmt: skip
_UNVERIFIED = "Globus's answer could not be verified. Please try again."


class ReauthenticationRequired(SignInAgain):
    """Globus needs the user to sign in again (MFA, a particular identity or domain): the
    broker sends the browser to `url`, the same sign-in flow going on."""


@dataclass(frozen=True, slots=True)
class DependentToken:
    """An access token for one Globus resource server, held for a user (secret: no repr)."""

    resource_server: str
    scope: str
    access_token: str
    expires_at: int

    def __repr__(self) -> str:
        rs, exp = self.resource_server, self.expires_at
        return f"DependentToken(resource_server={rs!r}, expires_at={exp})"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value and len(value) <= _MAX_CLAIM_CHARS else None


def map_identity_set(
    claims: Mapping[str, Any],
    *,
    idp: str,
    issuer: str,
    groups: Sequence[str] = (),
    session: Mapping[str, Any] | None = None,
    now: int | None = None,
) -> Principal:
    """The Principal a verified Globus ID token (or userinfo) describes.

    `sub` is the primary identity; `identity_set` lists every linked identity (each with
    `sub`, `username`, `identity_provider`, `identity_provider_display_name`, `organization`,
    `email`, `name`). `session` is token introspection's `session_info`: its
    `authentications` give `amr` (MFA when any holds "mfa") and the latest `auth_time`.
    Raises `InvalidRequest` without a subject.
    """
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidRequest(
            "Globus did not say who you are.", log_detail="ID token without a string sub"
        )
    linked: list[dict[str, str]] = []
    raw_set = claims.get("identity_set")
    for entry in raw_set[:_MAX_IDENTITIES] if isinstance(raw_set, list) else []:
        if not isinstance(entry, Mapping) or not _text(entry.get("sub")):
            continue
        item = {k: v for k in _IDENTITY_KEYS if (v := _text(entry.get(k))) is not None}
        linked.append(item)
    primary = next((i for i in linked if i["sub"] == subject), {})
    kept: dict[str, Any] = {}
    for key in _PRIMARY_KEYS:
        own = "username" if key == "preferred_username" else key
        value = _text(claims.get(key)) or _text(primary.get(own))
        if value is not None:
            kept[key] = value
    kept["linked_identities"] = linked
    kept["linked_usernames"] = [i["username"] for i in linked if "username" in i]
    organizations = list(dict.fromkeys(i["organization"] for i in linked if "organization" in i))
    if organizations:
        kept["organizations"] = organizations
    amr: list[str] = []
    auth_time = 0
    authentications = (session or {}).get("authentications")
    if isinstance(authentications, Mapping):
        for record in authentications.values():
            if not isinstance(record, Mapping):
                continue
            for method in record.get("amr") or ():
                if isinstance(method, str) and method not in amr:
                    amr.append(method)
            at = record.get("auth_time")
            if isinstance(at, int) and not isinstance(at, bool):
                auth_time = max(auth_time, at)
    if auth_time <= 0:
        last = claims.get("last_authentication")
        auth_time = last if isinstance(last, int) and last > 0 else 0
    if auth_time <= 0:
        auth_time = int(time.time()) if now is None else now
    affiliation = claims.get("eduperson_scoped_affiliation")
    return Principal(
        idp=idp,
        issuer=issuer,
        subject=subject,
        display_name=kept.get("name", ""),
        email=kept.get("email"),
        groups=tuple(dict.fromkeys(groups)),
        affiliation=tuple(a for a in affiliation if isinstance(a, str))
        if isinstance(affiliation, list)
        else (),
        amr=tuple(amr),
        mfa="mfa" in amr,
        auth_time=auth_time,
        claims=kept,
    )


def group_names(groups: Any) -> list[str]:
    """`globus:<id>` and `globus:<name>` for each group with an active membership."""
    names: list[str] = []
    for group in groups[:_MAX_GROUPS] if isinstance(groups, list) else []:
        if not isinstance(group, Mapping):
            continue
        memberships = group.get("my_memberships")
        active = isinstance(memberships, list) and any(
            isinstance(m, Mapping) and m.get("status") == "active" for m in memberships
        )
        group_id = group.get("id")
        if not active or not isinstance(group_id, str) or not _UUID.match(group_id):
            continue
        names.append(f"globus:{group_id}")
        name = _text(group.get("name"))
        if name is not None:
            names.append(f"globus:{name}")
    return names


class GlobusUpstream:
    """Globus Auth as an upstream (implements Upstream and Lifecycle)."""

    def __init__(
        self,
        *,
        id: str,
        display_name: str,
        client_id: str,
        client_secret: str,
        scopes: Sequence[str],
        resource_scope: str | None,
        dependent_scopes: Mapping[str, str],
        require_mfa: bool,
        required_domains: Sequence[str],
        clock_skew: int,
        cache: ReplayCache,
        vault: VaultClient,
        vault_prefix: str,
        http_timeout: float = 10.0,
    ) -> None:
        if "openid" not in scopes:
            raise ConfigurationError(f"upstream {id}: scopes must include 'openid'")
        needs_own_token = bool(dependent_scopes) or require_mfa or bool(required_domains)
        if needs_own_token and not resource_scope:
            raise ConfigurationError(
                f"upstream {id}: dependent_scopes, require_mfa and required_domains need "
                "resource_scope (the broker app's own Globus scope)"
            )
        self.id = id
        self.display_name = display_name
        self.issuer = ""  # learned from Globus Auth's OpenID configuration
        self._client_id = client_id
        requested = list(scopes)
        if resource_scope and resource_scope not in requested:
            requested.append(resource_scope)
        self._scopes = tuple(requested)
        self._resource_scope = resource_scope
        self._dependent_scopes = dict(dependent_scopes)
        self._require_mfa = require_mfa
        self._required_domains = tuple(d.lower() for d in required_domains)
        self._clock_skew = int(clock_skew)
        self._cache = cache
        self._vault = vault
        self._vault_prefix = vault_prefix
        self._http_timeout = http_timeout
        # One retry: a sign-in should fail fast rather than back off for a minute.
        self._auth = globus_sdk.ConfidentialAppAuthClient(
            client_id,
            client_secret,
            transport=RequestsTransport(http_timeout=http_timeout),
            retry_config=RetryConfig(max_retries=1),
        )
        self._decoder: IDTokenDecoder | None = None
        self._jwk_fetched_at = time.monotonic()  # the decoder fetches it on first use
        self._lock = asyncio.Lock()
        self._refresh_locks: dict[str, asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"GlobusUpstream(id={self.id!r}, client_id={self._client_id!r})"

    @property
    def resource_servers(self) -> tuple[str, ...]:
        return tuple(self._dependent_scopes)

    # -- Lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Read Globus Auth's OpenID configuration; if unreachable, retry on the next use."""
        try:
            await self._discover()
        except BrokerError as error:
            log.warning(
                "globus.discovery_failed", upstream=self.id, detail=error.log_detail or str(error)
            )

    async def close(self) -> None:
        await asyncio.to_thread(self._auth.close)

    async def _discover(self) -> IDTokenDecoder:
        async with self._lock:
            if self._decoder is not None:
                return self._decoder
            config = await self._call("openid configuration", self._auth.get_openid_configuration)
            base = self._auth.base_url.rstrip("/")
            issuer = config.get("issuer")
            if issuer != base:
                # OpenID Connect Discovery 1.0 §4.3: the configuration is about this service.
                raise UpstreamFailed(
                    f"{self.display_name} is not reachable at the moment. Please try later.",
                    log_detail=f"openid configuration issuer {str(issuer)[:200]!r} != {base!r}",
                )
            decoder = IDTokenDecoder(
                self._auth,
                jwt_leeway=self._clock_skew,
                jwt_options={"require": ["iss", "sub", "aud", "exp", "iat"]},
            )
            decoder.store_openid_configuration(dict(config.data))
            self.issuer = issuer
            self._decoder = decoder
            log.info("globus.discovered", upstream=self.id, issuer=issuer)
            return decoder

    # -- Upstream --------------------------------------------------------------------------

    async def begin(self, flow: LoginFlow) -> Redirect:
        """Send the browser to Globus Auth's authorize endpoint."""
        await self._discover()
        record = {"verifier": generate_token(64), "redirect_uri": flow.callback_url, "reauth": 0}
        await self._cache.set(self._flow_key(flow.id), json.dumps(record), FLOW_TTL)
        extra: dict[str, Any] = {"prompt": "login"} if flow.force_authn else {}
        return Redirect(url=self._authorize_url(flow, record, extra))

    def _authorize_url(
        self, flow: LoginFlow, record: Mapping[str, Any], extra: Mapping[str, Any]
    ) -> str:
        manager = GlobusAuthorizationCodeFlowManager(
            self._auth, record["redirect_uri"], requested_scopes=self._scopes, state=flow.id
        )
        return manager.get_authorize_url(
            query_params={
                "code_challenge": create_s256_code_challenge(record["verifier"]),
                "code_challenge_method": "S256",
                **extra,
            }
        )

    async def complete(self, flow: LoginFlow, params: Mapping[str, str]) -> Principal:
        """Check Globus's answer and return who signed in (see the module docstring)."""
        raw = await self._cache.pop(self._flow_key(flow.id))
        if raw is None:
            raise InvalidRequest(
                "This sign-in has expired or was already used. Please start again.",
                log_detail="no pending Globus request for this flow (expired or replayed)",
            )
        record: dict[str, Any] = json.loads(raw)
        if not hmac.compare_digest(params.get("state", "").encode(), flow.id.encode()):
            raise InvalidRequest(
                _UNVERIFIED, log_detail="authorization response state does not match the flow"
            )
        if "error" in params:
            raise self._error_response(params)
        code = params.get("code", "")
        if not code:
            raise InvalidRequest(
                "Globus's answer is incomplete. Please start again.",
                log_detail="authorization response without code",
            )
        decoder = await self._discover()
        attempt = _Attempt(self, flow, record)
        try:
            return await self._exchange(attempt, decoder, code, record)
        except ReauthenticationRequired:
            await attempt.save()  # the same flow goes on, with a new PKCE verifier
            raise

    async def _exchange(
        self, attempt: _Attempt, decoder: IDTokenDecoder, code: str, record: Mapping[str, Any]
    ) -> Principal:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": record["redirect_uri"],
            "code_verifier": record["verifier"],
        }
        tokens = await attempt.call(
            "code exchange",
            lambda: self._auth.oauth2_token(form, response_class=OAuthAuthorizationCodeResponse),
            refusal=InvalidRequest,
        )
        claims = await self._verify_id_token(decoder, tokens.get("id_token"))
        by_rs = tokens.by_resource_server
        own = self._own_token(tokens)
        session: Mapping[str, Any] | None = None
        if own is not None:
            session = await self._session_info(attempt, own)
            self._check_session(attempt, session, claims)
        claims = await self._with_identity_set(attempt, claims, by_rs)
        groups: list[str] = []
        groups_token = by_rs.get(GROUPS_RESOURCE_SERVER, {}).get("access_token")
        if isinstance(groups_token, str):
            client = globus_sdk.GroupsClient(
                authorizer=globus_sdk.AccessTokenAuthorizer(groups_token),
                transport=RequestsTransport(http_timeout=self._http_timeout),
                retry_config=RetryConfig(max_retries=1),
            )
            try:
                found = await attempt.call(
                    "groups", lambda: client.get_my_groups(statuses="active"), refusal=None
                )
            finally:
                await asyncio.to_thread(client.close)
            groups = group_names(found.data)
        principal = map_identity_set(
            claims, idp=self.id, issuer=self.issuer, groups=groups, session=session
        )
        if self._dependent_scopes and own is not None:
            dependent = await attempt.call(
                "dependent tokens",
                lambda: self._auth.oauth2_get_dependent_tokens(
                    own, refresh_tokens=True, scope=list(self._dependent_scopes.values())
                ),
                refusal=AccessDenied,
            )
            await self._store(principal, dependent.by_resource_server)
        return principal

    def _own_token(self, tokens: globus_sdk.OAuthTokenResponse) -> str | None:
        """The access token for the broker's own scope (its audience is this client)."""
        if not self._resource_scope:
            return None
        if self._resource_scope not in tokens.by_scopes:
            raise AccessDenied(
                f"{self.display_name} did not grant the access this service needs. Please "
                "sign in again and allow it.",
                log_detail=f"token response lacks the resource scope {self._resource_scope!r}",
            )
        token = tokens.by_scopes[self._resource_scope].get("access_token")
        return token if isinstance(token, str) else None

    async def _verify_id_token(self, decoder: IDTokenDecoder, id_token: Any) -> dict[str, Any]:
        if not isinstance(id_token, str):
            raise InvalidRequest(_UNVERIFIED, log_detail="token response without id_token")
        try:
            alg = jwt.get_unverified_header(id_token).get("alg")
        except jwt.InvalidTokenError as error:
            raise InvalidRequest(_UNVERIFIED, log_detail=f"id_token header: {error}") from None
        if alg not in _RSA_ALGS:
            # Checked before any key is used: "none" and HS* never reach the verifier.
            raise InvalidRequest(_UNVERIFIED, log_detail=f"id_token alg {str(alg)[:20]!r}")
        try:
            try:
                claims = await self._call("JWKS", lambda: decoder.decode(id_token))
            except jwt.InvalidSignatureError:
                # Globus may have rotated its key: fetch it again, at most once per interval,
                # so forged tokens cannot make the broker hammer Globus.
                if time.monotonic() - self._jwk_fetched_at < JWK_REFETCH_INTERVAL:
                    raise
                self._jwk_fetched_at = time.monotonic()
                config = decoder.get_openid_configuration()
                key = await self._call(
                    "JWKS", lambda: self._auth.get_jwk(openid_configuration=config, as_pem=True)
                )
                decoder.store_jwk(key)
                claims = await self._call("JWKS", lambda: decoder.decode(id_token))
        except jwt.InvalidTokenError as error:
            raise InvalidRequest(
                _UNVERIFIED, log_detail=f"id_token: {type(error).__name__}: {error}"
            ) from None
        if claims.get("iss") != self.issuer:
            raise InvalidRequest(
                _UNVERIFIED,
                log_detail=f"id_token iss {str(claims.get('iss'))[:200]!r} != {self.issuer!r}",
            )
        return claims

    async def _session_info(self, attempt: _Attempt, token: str) -> Mapping[str, Any]:
        """Token introspection's `session_info` for the broker's own token."""
        info = await attempt.call(
            "introspection",
            lambda: self._auth.oauth2_token_introspect(token, include="session_info"),
            refusal=None,
        )
        if info.get("active") is not True or info.get("sub") is None:
            raise InvalidRequest(_UNVERIFIED, log_detail="introspection: token not active")
        session = info.get("session_info")
        return session if isinstance(session, Mapping) else {}

    def _check_session(
        self, attempt: _Attempt, session: Mapping[str, Any], claims: Mapping[str, Any]
    ) -> None:
        """The configured session requirements, or a re-authentication asking for them."""
        authentications = session.get("authentications")
        records = list(authentications.items()) if isinstance(authentications, Mapping) else []
        wanted: dict[str, Any] = {}
        if self._require_mfa and not any(
            isinstance(r, Mapping) and "mfa" in (r.get("amr") or ()) for _, r in records
        ):
            wanted["session_required_mfa"] = True
        if self._required_domains:
            usernames = {
                str(i.get("sub")): str(i.get("username", ""))
                for i in claims.get("identity_set") or ()
                if isinstance(i, Mapping)
            }
            if claims.get("sub") is not None and claims.get("preferred_username"):
                usernames.setdefault(str(claims["sub"]), str(claims["preferred_username"]))
            domains = {usernames.get(i, "").rpartition("@")[2].lower() for i, _ in records}
            if not domains.intersection(self._required_domains):
                wanted["session_required_single_domain"] = list(self._required_domains)
        if wanted:
            raise attempt.reauthenticate(
                GlobusAuthorizationParameters(
                    session_required_mfa=wanted.get("session_required_mfa"),
                    session_required_single_domain=wanted.get("session_required_single_domain"),
                    session_message="This service needs a stronger sign-in.",
                ),
                reason=f"configured session requirement {sorted(wanted)}",
            )

    async def _with_identity_set(
        self, attempt: _Attempt, claims: dict[str, Any], by_rs: Mapping[str, Any]
    ) -> dict[str, Any]:
        """`claims` with an identity set: the ID token's, else userinfo's; identities listed
        without a username are looked up with `get_identities`."""
        token = by_rs.get(AUTH_RESOURCE_SERVER, {}).get("access_token")
        if not isinstance(token, str):
            return claims
        client = globus_sdk.AuthClient(
            authorizer=globus_sdk.AccessTokenAuthorizer(token),
            transport=RequestsTransport(http_timeout=self._http_timeout),
            retry_config=RetryConfig(max_retries=1),
        )
        try:
            merged = dict(claims)
            if not isinstance(merged.get("identity_set"), list):
                info = await attempt.call("userinfo", client.userinfo, refusal=None)
                if info.get("sub") == claims.get("sub"):
                    # OIDC Core §5.3.4: userinfo about someone else must not be used.
                    merged.update(
                        {k: v for k, v in info.data.items() if k not in ("sub", "iss", "aud")}
                    )
            identities = merged.get("identity_set")
            if isinstance(identities, list):
                missing = [
                    str(i["sub"])
                    for i in identities
                    if isinstance(i, Mapping) and i.get("sub") and not i.get("username")
                ]
                if missing:
                    found = await attempt.call(
                        "identities", lambda: client.get_identities(ids=missing), refusal=None
                    )
                    by_id = {
                        i.get("id"): i for i in found.get("identities", []) if isinstance(i, dict)
                    }
                    merged["identity_set"] = [
                        {**i, **_identity_claims(by_id[i.get("sub")])}
                        if isinstance(i, Mapping) and i.get("sub") in by_id
                        else i
                        for i in identities
                    ]
            return merged
        finally:
            await asyncio.to_thread(client.close)

    def _error_response(self, params: Mapping[str, str]) -> BrokerError:
        code = params.get("error", "")
        shown = code if _ERROR_CODE.match(code) else "unknown"
        detail = f"Globus error {shown}: {params.get('error_description', '')[:300]}"
        if code in ("access_denied", "login_required", "consent_required"):
            return AccessDenied(
                f"{self.display_name} did not sign you in ({shown}).", log_detail=detail
            )
        return InvalidRequest(
            f"{self.display_name} could not complete the sign-in ({shown}).", log_detail=detail
        )

    # -- dependent tokens ------------------------------------------------------------------

    def _flow_key(self, flow_id: str) -> str:
        return f"{self.id}:flow:{flow_id}"

    def token_path(self, principal_id: str) -> str:
        return f"{self._vault_prefix}/upstream-tokens/{self.id}/{principal_id}"

    async def _store(self, principal: Principal, by_rs: Mapping[str, Mapping[str, Any]]) -> None:
        tokens: dict[str, dict[str, Any]] = {}
        for rs, data in by_rs.items():
            if rs in self._dependent_scopes and isinstance(data.get("access_token"), str):
                tokens[rs] = {
                    "access_token": data["access_token"],
                    "refresh_token": data.get("refresh_token"),
                    "expires_at": int(data.get("expires_at_seconds") or 0),
                    "scope": str(data.get("scope", "")),
                }
        missing = sorted(set(self._dependent_scopes) - set(tokens))
        if missing:
            log.warning("globus.dependent_tokens_missing", upstream=self.id, missing=missing)
        await self._vault.kv_write(
            self.token_path(principal.id),
            {"sub": principal.subject, "issuer": self.issuer, "stored_at": int(time.time()),
             "tokens": tokens},
        )  # fmt: skip

    async def dependent_token(self, principal: Principal, resource_server: str) -> DependentToken:
        """A live access token for `resource_server` held for `principal`, refreshed with
        its refresh token when fewer than `MIN_REMAINING` seconds are left.

        `AccessDenied` when none is stored (not signed in with Globus, or no consent) or Globus
        refuses the refresh (that token is then forgotten); `UpstreamFailed` when Globus or
        Vault cannot be reached; `InvalidRequest` for a resource server not configured.
        """
        if resource_server not in self._dependent_scopes:
            raise InvalidRequest(
                f"{resource_server!r} is not a Globus resource server this broker holds "
                f"tokens for; one of {sorted(self._dependent_scopes)}"
            )
        if principal.idp != self.id:
            raise AccessDenied(
                f"Sign in with {self.display_name} to use Globus services.",
                log_detail=f"principal of {principal.idp!r}, not {self.id!r}",
            )
        lock = self._refresh_locks.setdefault(
            f"{principal.id}\x00{resource_server}", asyncio.Lock()
        )
        async with lock:  # one refresh per user and resource server in this process
            path = self.token_path(principal.id)
            entry = await self._vault.kv_read(path)
            stored = entry.data.get("tokens", {}) if entry is not None else {}
            data = stored.get(resource_server) if isinstance(stored, dict) else None
            if entry is None or not isinstance(data, dict):
                raise AccessDenied(
                    f"Please sign in with {self.display_name} again: it has not granted access "
                    f"to {resource_server}.",
                    log_detail="no dependent token stored",
                )
            expires_at = int(data.get("expires_at") or 0)
            if expires_at - time.time() >= MIN_REMAINING:
                return DependentToken(
                    resource_server, str(data.get("scope", "")), str(data["access_token"]),
                    expires_at,
                )  # fmt: skip
            refresh_token = data.get("refresh_token")
            if not isinstance(refresh_token, str) or not refresh_token:
                raise AccessDenied(
                    f"Your {resource_server} access has expired; please sign in with "
                    f"{self.display_name} again.",
                    log_detail="dependent token expired and no refresh token stored",
                )
            try:
                fresh = await self._call(
                    "refresh",
                    lambda: self._auth.oauth2_refresh_token(refresh_token),
                    refusal=AccessDenied,
                )
            except AccessDenied:
                tokens = {k: v for k, v in stored.items() if k != resource_server}
                await self._vault.kv_write(path, {**entry.data, "tokens": tokens})
                raise
            got = fresh.by_resource_server.get(resource_server)
            if got is None or not isinstance(got.get("access_token"), str):
                raise UpstreamFailed(
                    "Globus did not renew the access token. Please try later.",
                    log_detail=f"refresh answered without a token for {resource_server}",
                )
            updated = {
                "access_token": got["access_token"],
                # Globus may rotate refresh tokens; keep whichever is current.
                "refresh_token": got.get("refresh_token") or refresh_token,
                "expires_at": int(got.get("expires_at_seconds") or 0),
                "scope": str(got.get("scope") or data.get("scope", "")),
            }
            tokens = {**stored, resource_server: updated}
            await self._vault.kv_write(path, {**entry.data, "tokens": tokens})
            log.info("globus.dependent_token_refreshed", upstream=self.id, rs=resource_server)
            return DependentToken(
                resource_server, updated["scope"], updated["access_token"], updated["expires_at"]
            )

    # -- helpers ---------------------------------------------------------------------------

    async def _call(
        self,
        what: str,
        call: Callable[[], T],
        *,
        refusal: type[BrokerError] | None = None,
    ) -> T:
        """Run one SDK call in a worker thread; its failures as broker errors."""
        try:
            return await asyncio.to_thread(call)
        except globus_sdk.GlobusAPIError as error:
            raise self._api_error(what, error, refusal) from None
        except (globus_sdk.NetworkError, globus_sdk.GlobusSDKUsageError, ValueError) as error:
            raise UpstreamFailed(
                f"{self.display_name} is not reachable at the moment. Please try later.",
                log_detail=f"{what}: {type(error).__name__}",
            ) from None

    def _api_error(
        self, what: str, error: globus_sdk.GlobusAPIError, refusal: type[BrokerError] | None
    ) -> BrokerError:
        code = str(error.code) if error.code else ""
        shown = code if _ERROR_CODE.match(code) else "unknown"
        detail = f"{what}: HTTP {error.http_status} {shown}"
        if refusal is not None and 400 <= error.http_status < 500:
            return refusal(
                f"{self.display_name} did not accept the request. Please sign in again.",
                log_detail=detail,
            )
        return UpstreamFailed(
            f"{self.display_name} is not reachable at the moment. Please try later.",
            log_detail=detail,
        )


def _identity_claims(identity: Mapping[str, Any]) -> dict[str, Any]:
    """A `get_identities` entry in the identity-set claim names."""
    out = {k: identity[k] for k in _IDENTITY_KEYS[1:] if identity.get(k)}
    return out


class _Attempt:
    """One `complete` call: Globus calls whose session-requirement errors (GAREs) become a
    re-authentication in the same flow."""

    def __init__(self, upstream: GlobusUpstream, flow: LoginFlow, record: dict[str, Any]) -> None:
        self._upstream = upstream
        self._flow = flow
        self._record = record
        self._pending: dict[str, Any] | None = None

    async def call(
        self, what: str, call: Callable[[], T], *, refusal: type[BrokerError] | None
    ) -> T:
        try:
            return await asyncio.to_thread(call)
        except globus_sdk.GlobusAPIError as error:
            gare = to_gare(error)
            if gare is not None and _is_session_requirement(gare.authorization_parameters):
                raise self.reauthenticate(
                    gare.authorization_parameters, reason=f"{what}: Globus {gare.code}"
                ) from None
            raise self._upstream._api_error(what, error, refusal) from None
        except (globus_sdk.NetworkError, globus_sdk.GlobusSDKUsageError, ValueError) as error:
            raise UpstreamFailed(
                f"{self._upstream.display_name} is not reachable at the moment. Please try later.",
                log_detail=f"{what}: {type(error).__name__}",
            ) from None

    def reauthenticate(
        self, parameters: GlobusAuthorizationParameters, *, reason: str
    ) -> BrokerError | ReauthenticationRequired:
        """The exception that sends the browser back to Globus with these session requirements
        (the flow's cache record is renewed with a new PKCE verifier), or `AccessDenied`
        once the flow has been sent back `MAX_REAUTH` times."""
        attempts = int(self._record.get("reauth", 0))
        if attempts >= MAX_REAUTH:
            return AccessDenied(
                f"{self._upstream.display_name} still asks for a stronger sign-in "
                "(for example a second factor). Please start again.",
                log_detail=f"{reason}; re-authenticated {attempts} times already",
            )
        record = {**self._record, "verifier": generate_token(64), "reauth": attempts + 1}
        extra: dict[str, Any] = {"prompt": "login"}
        if parameters.session_required_identities:
            extra["session_required_identities"] = parameters.session_required_identities
        if parameters.session_required_single_domain:
            extra["session_required_single_domain"] = parameters.session_required_single_domain
        if parameters.session_required_policies:
            extra["session_required_policies"] = parameters.session_required_policies
        if parameters.session_required_mfa:
            extra["session_required_mfa"] = "true"
        if parameters.session_message:
            extra["session_message"] = parameters.session_message[:300]
        url = self._upstream._authorize_url(self._flow, record, extra)
        self._pending = record
        return ReauthenticationRequired(url, f"{reason}; re-authenticating")

    async def save(self) -> None:
        """Keep the renewed flow record for the callback after re-authentication."""
        pending = self._pending
        if pending is not None:
            await self._upstream._cache.set(
                self._upstream._flow_key(self._flow.id), json.dumps(pending), FLOW_TTL
            )


def _is_session_requirement(parameters: GlobusAuthorizationParameters) -> bool:
    return bool(
        parameters.session_required_identities
        or parameters.session_required_single_domain
        or parameters.session_required_policies
        or parameters.session_required_mfa
        or parameters.prompt == "login"
    )
