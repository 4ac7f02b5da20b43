"""Sign-in at an OpenID provider: authorization code flow with PKCE (OpenID Connect Core 1.0).

Contracts:
- `start()` fetches `{issuer}/.well-known/openid-configuration` (its `issuer` must equal the
  configured one exactly) and never fails the broker: if the OP is down it logs and tries
  again on the next `begin`, which raises `UpstreamFailed` while it stays down.
- `begin` binds the flow to the OP: `state` = the broker's flow id, a fresh `nonce` and PKCE
  verifier kept in the shared cache under `{id}:flow:{flow id}` for ten minutes.
- `complete` consumes that record (a callback is answered once), then checks, in order: the
  OP's error response, RFC 9207 `iss` (required when the OP advertises it; with per-upstream
  state this is the mix-up defence), `state`, the code exchange (PKCE), and the ID token:
  `alg` from the allow-list (never none or HS*), signature by a key from the OP's JWKS,
  `iss`, `aud` contains the client id, `azp`, `exp` / `iat` within `clock_skew`, `nonce`.
  Userinfo is merged only when its `sub` equals the ID token's.
- Upstream tokens never leave the adapter: not in `Principal.claims`, errors or logs. With
  `keep_refresh_token`, the refresh token goes to Vault KV at
  `{vault_prefix}/upstream-tokens/{id}/{principal id}`, where `refresh()` finds it.
- Only `adapters.errors` types escape; descriptions are for the user, `log_detail` says
  precisely which check failed (never a token).

Which library does what: authlib supplies the OAuth/OIDC protocol pieces that need no HTTP
client of their own (PKCE S256, random tokens, the authorization URL, the OIDC Core ID-token
claim rules in `CodeIDToken`); PyJWT with `cryptography` verifies the JWS signature and the
registered claims, with keys parsed once by `adapters.jwks.JwksCache`; every HTTP call goes
through the broker's shared aiohttp session (authlib's clients bring their own HTTP stack).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, urlsplit

import aiohttp
import jwt
import structlog
from authlib.common.security import generate_token  # type: ignore[import-untyped]
from authlib.oauth2.rfc6749.parameters import (  # type: ignore[import-untyped]
    prepare_grant_uri,
)
from authlib.oauth2.rfc7636 import create_s256_code_challenge  # type: ignore[import-untyped]
from authlib.oidc.core import CodeIDToken  # type: ignore[import-untyped]
from joserfc.errors import JoseError

from adapters.base import LoginFlow, Principal, Redirect, ReplayCache
from adapters.errors import (
    AccessDenied,
    BrokerError,
    ConfigurationError,
    InvalidRequest,
    UpstreamFailed,
)
from adapters.jwks import ASYMMETRIC_ALGS, JwksCache, decode_signed
from adapters.vault import VaultClient

__all__ = ["ClaimMapping", "OidcUpstream", "map_claims", "split_values"]

log = structlog.get_logger(__name__)

FLOW_TTL: Final = 600
_MAX_BODY: Final = 1024 * 1024
# Parameters the adapter sets itself; `auth_params` may not override them.
_PROTOCOL_PARAMS: Final = frozenset(
    {
        "response_type", "client_id", "redirect_uri", "scope", "state", "nonce",
        "code_challenge", "code_challenge_method", "login_hint", "request", "request_uri",
        "response_mode",
    }
)  # fmt: skip
# Claims that only the ID token may assert: userinfo cannot change them.
_ID_TOKEN_ONLY: Final = frozenset(
    {"iss", "sub", "aud", "exp", "iat", "nbf", "nonce", "azp", "at_hash", "c_hash",
     "auth_time", "acr", "amr", "sid", "jti"}
)  # fmt: skip
# Protocol claims that say nothing about the person; left out of Principal.claims.
_NOT_KEPT: Final = frozenset(
    {"aud", "exp", "iat", "nbf", "nonce", "azp", "at_hash", "c_hash", "sid", "jti", "s_hash"}
)
_MAX_KEPT_CLAIMS: Final = 40
_MAX_CLAIM_CHARS: Final = 512
_ERROR_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SPLIT = re.compile(r"[\s,]+")

_UNVERIFIED = "The identity provider's answer could not be verified. Please try again."


@dataclass(frozen=True, slots=True)
class ClaimMapping:
    """Which ID-token / userinfo claim fills each `Principal` field."""

    subject: str = "sub"
    email: str = "email"
    name: str = "name"
    groups: str = "groups"
    affiliation: str = "eduperson_scoped_affiliation"

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> ClaimMapping:
        unknown = set(values) - {"subject", "email", "name", "groups", "affiliation"}
        if unknown:
            raise ConfigurationError(f"unknown claim mapping keys: {sorted(unknown)}")
        return cls(**dict(values))


@dataclass(frozen=True, slots=True)
class _Provider:
    """What discovery told us about the OP."""

    authorization_endpoint: str
    token_endpoint: str
    userinfo_endpoint: str | None
    iss_parameter_supported: bool
    jwks: JwksCache


def split_values(value: Any) -> tuple[str, ...]:
    """A multi-valued claim as a tuple: a JSON list of strings, or one string separated by
    spaces or commas (as some OPs send groups); order kept, duplicates and blanks dropped."""
    if isinstance(value, str):
        items: list[Any] = _SPLIT.split(value)
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        return ()
    seen: dict[str, None] = {}
    for item in items:
        if isinstance(item, str) and item.strip():
            seen.setdefault(item.strip(), None)
    return tuple(seen)


def map_claims(
    claims: Mapping[str, Any],
    mapping: ClaimMapping,
    *,
    idp: str,
    issuer: str,
    now: int | None = None,
) -> Principal:
    """The Principal the verified claims describe.

    `issuer` is the OP's issuer; `subject` is the mapped subject claim (a non-empty string).
    MFA rule: `mfa` is True when the `amr` list contains "mfa" (RFC 8176) or the `acr` value
    contains "mfa" in any case (e.g. "https://refeds.org/profile/mfa"); nothing else counts.
    `auth_time` is the `auth_time` claim, or `now` when the OP does not send one.
    Raises `InvalidRequest` when the subject claim is missing.
    """
    subject = claims.get(mapping.subject)
    if isinstance(subject, int) and not isinstance(subject, bool):
        subject = str(subject)
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidRequest(
            "The identity provider did not say who you are.",
            log_detail=f"claim {mapping.subject!r} (subject) missing or not a string",
        )
    email = claims.get(mapping.email)
    name = claims.get(mapping.name)
    acr = claims.get("acr")
    acr = acr if isinstance(acr, str) and acr else None
    amr = split_values(claims.get("amr"))
    auth_time = claims.get("auth_time")
    if not isinstance(auth_time, int) or isinstance(auth_time, bool) or auth_time <= 0:
        auth_time = int(time.time()) if now is None else now
    return Principal(
        idp=idp,
        issuer=issuer,
        subject=subject,
        display_name=name if isinstance(name, str) else "",
        email=email if isinstance(email, str) and email else None,
        groups=split_values(claims.get(mapping.groups)),
        affiliation=split_values(claims.get(mapping.affiliation)),
        acr=acr,
        amr=amr,
        mfa="mfa" in amr or (acr is not None and "mfa" in acr.lower()),
        auth_time=auth_time,
        claims=_kept_claims(claims),
    )


def _kept_claims(claims: Mapping[str, Any]) -> dict[str, Any]:
    """A small JSON-able copy of the identity claims for the session (no protocol claims)."""
    kept: dict[str, Any] = {}
    for key, value in claims.items():
        if len(kept) >= _MAX_KEPT_CLAIMS or key in _NOT_KEPT or len(key) > 64:
            continue
        if isinstance(value, bool | int | float) or (
            isinstance(value, str) and len(value) <= _MAX_CLAIM_CHARS
        ):
            kept[key] = value
        elif isinstance(value, list) and all(
            isinstance(v, str) and len(v) <= _MAX_CLAIM_CHARS for v in value
        ):
            kept[key] = list(value[:100])
    return kept


class OidcUpstream:
    """One OpenID provider as an upstream (implements Upstream, Lifecycle, Refreshable)."""

    def __init__(
        self,
        *,
        id: str,
        display_name: str,
        issuer: str,
        client_id: str,
        client_secret: str | None,
        scopes: Sequence[str],
        id_token_algs: Sequence[str],
        claims: Mapping[str, str],
        use_userinfo: bool,
        idp_hint_param: str | None,
        auth_params: Mapping[str, str],
        keep_refresh_token: bool,
        clock_skew: int,
        http: aiohttp.ClientSession,
        cache: ReplayCache,
        vault: VaultClient,
        vault_prefix: str,
        discovery_retry: float = 5.0,
    ) -> None:
        bad_algs = [a for a in id_token_algs if a not in ASYMMETRIC_ALGS]
        if not id_token_algs or bad_algs:
            # none and HS* can never be checked against a public key set: refuse at start-up.
            raise ConfigurationError(
                f"upstream {id}: id_token_algs must be asymmetric JWS algorithms, not {bad_algs}"
            )
        if "openid" not in scopes:
            raise ConfigurationError(f"upstream {id}: scopes must include 'openid'")
        clash = set(_PROTOCOL_PARAMS.intersection(auth_params))
        if idp_hint_param in _PROTOCOL_PARAMS:
            clash.add(idp_hint_param)
        if clash:
            raise ConfigurationError(
                f"upstream {id}: auth_params may not set protocol parameters {sorted(clash)}"
            )
        self.id = id
        self.display_name = display_name
        self.issuer = issuer
        self._client_id = client_id
        self._client_secret = client_secret
        self._scopes = tuple(scopes)
        self._algs = tuple(id_token_algs)
        self._mapping = ClaimMapping.from_mapping(claims)
        self._use_userinfo = use_userinfo
        self._idp_hint_param = idp_hint_param
        self._auth_params = dict(auth_params)
        self._keep_refresh_token = keep_refresh_token
        self._clock_skew = int(clock_skew)
        self._http = http
        self._cache = cache
        self._vault = vault
        self._vault_prefix = vault_prefix
        self._discovery_retry = discovery_retry
        self._provider: _Provider | None = None
        self._failed_at = float("-inf")
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"OidcUpstream(id={self.id!r}, issuer={self.issuer!r})"

    # -- Lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Discover the OP; if it is unreachable, log and retry on the next sign-in."""
        try:
            await self._discover()
        except BrokerError as error:
            log.warning(
                "oidc.discovery_failed", upstream=self.id, detail=error.log_detail or str(error)
            )

    async def close(self) -> None:
        """Nothing to release: the HTTP session belongs to the broker."""

    async def _discover(self) -> _Provider:
        async with self._lock:
            if self._provider is not None:
                return self._provider
            if time.monotonic() - self._failed_at < self._discovery_retry:
                raise UpstreamFailed(
                    f"{self.display_name} is not reachable at the moment. Please try later.",
                    log_detail=f"discovery of {self.issuer} failed recently; not retried yet",
                )
            try:
                self._provider = await self._fetch_discovery()
            except BrokerError:
                self._failed_at = time.monotonic()
                raise
            log.info("oidc.discovered", upstream=self.id, issuer=self.issuer)
            return self._provider

    async def _fetch_discovery(self) -> _Provider:
        url = f"{self.issuer.rstrip('/')}/.well-known/openid-configuration"
        status, doc = await self._get_json(url)
        unavailable = f"{self.display_name} is not reachable at the moment. Please try later."
        if status != 200 or not isinstance(doc, dict):
            raise UpstreamFailed(unavailable, log_detail=f"discovery {url}: HTTP {status}")
        if doc.get("issuer") != self.issuer:
            # OpenID Connect Discovery 1.0 §4.3: a different issuer is a different OP.
            raise UpstreamFailed(
                unavailable,
                log_detail=f"discovery issuer {str(doc.get('issuer'))[:200]!r} != {self.issuer!r}",
            )
        endpoints: dict[str, str | None] = {}
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri", "userinfo_endpoint"):
            value = doc.get(name)
            if value is None and name == "userinfo_endpoint":
                endpoints[name] = None
                continue
            if not isinstance(value, str) or not self._acceptable_endpoint(value):
                raise UpstreamFailed(
                    unavailable, log_detail=f"discovery {url}: unusable {name} {value!r}"
                )
            endpoints[name] = value
        jwks_uri = endpoints["jwks_uri"]
        assert jwks_uri is not None and endpoints["authorization_endpoint"] is not None
        assert endpoints["token_endpoint"] is not None
        return _Provider(
            authorization_endpoint=endpoints["authorization_endpoint"],
            token_endpoint=endpoints["token_endpoint"],
            userinfo_endpoint=endpoints["userinfo_endpoint"],
            iss_parameter_supported=doc.get("authorization_response_iss_parameter_supported")
            is True,
            jwks=JwksCache(self._http, jwks_uri),
        )

    def _acceptable_endpoint(self, url: str) -> bool:
        """Absolute http(s); https whenever the issuer itself is https."""
        parts = urlsplit(url)
        if not parts.hostname or parts.scheme not in ("https", "http"):
            return False
        return parts.scheme == "https" or urlsplit(self.issuer).scheme == "http"

    # -- Upstream --------------------------------------------------------------------------

    async def begin(self, flow: LoginFlow) -> Redirect:
        """Send the browser to the OP's authorization endpoint."""
        provider = await self._discover()
        # Random values from authlib's generator (SystemRandom); 43+ chars of verifier as
        # RFC 7636 §4.1 asks, and the challenge by authlib's S256 implementation.
        nonce = generate_token(32)
        verifier = generate_token(64)
        record = {"nonce": nonce, "verifier": verifier, "redirect_uri": flow.callback_url}
        await self._cache.set(self._flow_key(flow.id), json.dumps(record), FLOW_TTL)
        extra: dict[str, str] = dict(self._auth_params)
        if flow.login_hint:
            extra["login_hint"] = flow.login_hint
        if flow.force_authn:
            extra["prompt"] = "login"
        if flow.idp_hint and self._idp_hint_param:
            extra[self._idp_hint_param] = flow.idp_hint
        url = prepare_grant_uri(
            provider.authorization_endpoint,
            self._client_id,
            "code",
            redirect_uri=flow.callback_url,
            scope=" ".join(self._scopes),
            state=flow.id,
            nonce=nonce,
            code_challenge=create_s256_code_challenge(verifier),
            code_challenge_method="S256",
            **extra,
        )
        return Redirect(url=str(url))

    async def complete(self, flow: LoginFlow, params: Mapping[str, str]) -> Principal:
        """Check the OP's answer and return who signed in (see the module docstring)."""
        raw = await self._cache.pop(self._flow_key(flow.id))
        if raw is None:
            raise InvalidRequest(
                "This sign-in has expired or was already used. Please start again.",
                log_detail="no pending OIDC request for this flow (expired or replayed)",
            )
        record: dict[str, str] = json.loads(raw)
        provider = await self._discover()
        self._check_response_origin(provider, flow, params)
        if "error" in params:
            raise self._op_error(params)
        code = params.get("code", "")
        if not code:
            raise InvalidRequest(
                "The identity provider's answer is incomplete. Please start again.",
                log_detail="authorization response without code",
            )
        tokens = await self._token_request(
            provider,
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": record["redirect_uri"],
                "code_verifier": record["verifier"],
            },
            refusal=InvalidRequest,
        )
        id_token = tokens.get("id_token")
        access_token = tokens.get("access_token")
        if not isinstance(id_token, str) or not isinstance(access_token, str):
            raise InvalidRequest(
                _UNVERIFIED, log_detail="token response without id_token or access_token"
            )
        claims = await self._verify_id_token(
            provider, id_token, nonce=record["nonce"], access_token=access_token
        )
        claims = await self._with_userinfo(provider, claims, access_token)
        principal = map_claims(claims, self._mapping, idp=self.id, issuer=self.issuer)
        refresh_token = tokens.get("refresh_token")
        if self._keep_refresh_token and isinstance(refresh_token, str) and refresh_token:
            await self._store_refresh_token(principal, refresh_token, str(claims["sub"]))
        return principal

    def _check_response_origin(
        self, provider: _Provider, flow: LoginFlow, params: Mapping[str, str]
    ) -> None:
        """RFC 9207 `iss` and `state`: the answer comes from this OP, for this flow."""
        iss = params.get("iss")
        if iss is not None and iss != self.issuer:
            raise InvalidRequest(
                _UNVERIFIED,
                log_detail=f"authorization response iss {iss[:200]!r} != {self.issuer!r} (mix-up)",
            )
        if iss is None and provider.iss_parameter_supported:
            raise InvalidRequest(
                _UNVERIFIED,
                log_detail="authorization response without iss although the OP advertises it",
            )
        state = params.get("state", "")
        if not hmac.compare_digest(state.encode(), flow.id.encode()):
            raise InvalidRequest(
                _UNVERIFIED, log_detail="authorization response state does not match the flow"
            )

    def _op_error(self, params: Mapping[str, str]) -> BrokerError:
        code = params.get("error", "")
        shown = code if _ERROR_CODE.match(code) else "unknown"
        detail = f"OP error {shown}: {params.get('error_description', '')[:300]}"
        if code in (
            "access_denied",
            "login_required",
            "consent_required",
            "unmet_authentication_requirements",
        ):
            return AccessDenied(
                f"{self.display_name} did not sign you in ({shown}).", log_detail=detail
            )
        return InvalidRequest(
            f"{self.display_name} could not complete the sign-in ({shown}).", log_detail=detail
        )

    # -- Refreshable -----------------------------------------------------------------------

    async def refresh(self, principal: Principal) -> Principal:
        """Use the stored upstream refresh token (rotating it) and return the up-to-date
        Principal. `AccessDenied` if none is stored or the OP refuses (the token is then
        deleted); `UpstreamFailed` if the OP or Vault cannot be reached (the token is kept).
        Without `keep_refresh_token` there is nothing to refresh: `principal` comes back as is."""
        if not self._keep_refresh_token:
            return principal
        if principal.idp != self.id:
            raise InvalidRequest(
                "This account did not sign in here.",
                log_detail=f"refresh for a principal of {principal.idp!r}",
            )
        path = self._token_path(principal)
        entry = await self._vault.kv_read(path)
        refresh_token = entry.data.get("refresh_token") if entry is not None else None
        if not isinstance(refresh_token, str) or entry is None:
            raise AccessDenied(
                "Please sign in again.", log_detail="no upstream refresh token stored"
            )
        provider = await self._discover()
        try:
            tokens = await self._token_request(
                provider,
                {"grant_type": "refresh_token", "refresh_token": refresh_token},
                refusal=AccessDenied,
            )
        except AccessDenied:
            await self._vault.kv_delete(path)
            raise
        rotated = tokens.get("refresh_token")
        if isinstance(rotated, str) and rotated and rotated != refresh_token:
            await self._vault.kv_write(path, {**entry.data, "refresh_token": rotated})
        sub = str(entry.data.get("sub", ""))
        claims: dict[str, Any] = {
            k: v for k, v in principal.claims.items() if k not in _ID_TOKEN_ONLY
        } | {"sub": sub, "iss": self.issuer, "auth_time": principal.auth_time}
        if principal.acr is not None:
            claims["acr"] = principal.acr
        if principal.amr:
            claims["amr"] = list(principal.amr)
        access_token = tokens.get("access_token")
        id_token = tokens.get("id_token")
        if isinstance(id_token, str):
            fresh = await self._verify_id_token(
                provider,
                id_token,
                nonce=None,
                access_token=access_token if isinstance(access_token, str) else None,
            )
            if fresh.get("sub") != sub:
                # OIDC Core §12.2: a refreshed ID token must be about the same person.
                await self._vault.kv_delete(path)
                raise AccessDenied(
                    "Please sign in again.", log_detail="refreshed ID token has another sub"
                )
            claims = dict(fresh)
        if isinstance(access_token, str):
            claims = await self._with_userinfo(provider, claims, access_token)
        updated = map_claims(
            claims, self._mapping, idp=self.id, issuer=self.issuer, now=principal.auth_time
        )
        if updated.id != principal.id:
            raise AccessDenied(
                "Please sign in again.", log_detail="refreshed claims map to another subject"
            )
        return updated

    # -- helpers ---------------------------------------------------------------------------

    def _flow_key(self, flow_id: str) -> str:
        return f"{self.id}:flow:{flow_id}"

    def _token_path(self, principal: Principal) -> str:
        return f"{self._vault_prefix}/upstream-tokens/{self.id}/{principal.id}"

    async def _store_refresh_token(self, principal: Principal, token: str, sub: str) -> None:
        await self._vault.kv_write(
            self._token_path(principal),
            {
                "refresh_token": token,
                "sub": sub,
                "issuer": self.issuer,
                "stored_at": int(time.time()),
            },
        )

    async def _token_request(
        self, provider: _Provider, form: dict[str, str], *, refusal: type[BrokerError]
    ) -> dict[str, Any]:
        """POST to the token endpoint; a 4xx OAuth error becomes `refusal`, anything else that
        is not a 200 JSON object `UpstreamFailed`."""
        headers = {"Accept": "application/json"}
        if self._client_secret is not None:
            # RFC 6749 §2.3.1: id and secret are form-urlencoded before Basic encoding (aiohttp's
            # BasicAuth and authlib's encoder skip that step, which breaks secrets with ':' or '%').
            pair = f"{_form_encode(self._client_id)}:{_form_encode(self._client_secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form = {**form, "client_id": self._client_id}
        try:
            async with self._http.post(
                provider.token_endpoint, data=form, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                body = await response.content.read(_MAX_BODY + 1)
        except (aiohttp.ClientError, TimeoutError) as failure:
            raise UpstreamFailed(
                f"{self.display_name} is not reachable at the moment. Please try later.",
                log_detail=f"token endpoint: {type(failure).__name__}",
            ) from None
        document = _json_object(body)
        if status == 200 and document is not None:
            token_type = document.get("token_type")
            if not isinstance(token_type, str) or token_type.lower() not in ("bearer", "dpop"):
                raise refusal(_UNVERIFIED, log_detail=f"token response token_type {token_type!r}")
            return document
        error = document.get("error") if document is not None else None
        if 400 <= status < 500 and isinstance(error, str):
            shown = error if _ERROR_CODE.match(error) else "unknown"
            raise refusal(
                f"{self.display_name} did not accept the sign-in. Please start again.",
                log_detail=f"token endpoint HTTP {status} error {shown}",
            )
        raise UpstreamFailed(
            f"{self.display_name} is not reachable at the moment. Please try later.",
            log_detail=f"token endpoint HTTP {status}",
        )

    async def _verify_id_token(
        self, provider: _Provider, token: str, *, nonce: str | None, access_token: str | None
    ) -> dict[str, Any]:
        """The ID token's claims once every OIDC Core §3.1.3.7 check has passed."""
        claims = await decode_signed(
            token, provider.jwks, algs=self._algs, audience=self._client_id, issuer=self.issuer,
            leeway=self._clock_skew, require=["iss", "sub", "aud", "exp", "iat"],
            refusal=_UNVERIFIED,
        )  # fmt: skip
        header = jwt.get_unverified_header(token)  # verified above; at_hash needs its alg
        # The OIDC-specific rules (azp with several audiences, nonce, at_hash, amr shape,
        # auth_time) are authlib's; it re-checks exp/iat with the same leeway.
        rules = CodeIDToken(
            claims,
            header,
            params={"client_id": self._client_id, "nonce": nonce, "access_token": access_token},
        )
        try:
            rules.validate(now=int(time.time()), leeway=self._clock_skew)
        except JoseError as error:
            raise InvalidRequest(
                _UNVERIFIED, log_detail=f"id_token: {type(error).__name__}: {error}"
            ) from None
        return claims

    async def _with_userinfo(
        self, provider: _Provider, claims: dict[str, Any], access_token: str
    ) -> dict[str, Any]:
        """`claims` plus the OP's userinfo, if enabled, offered and about the same `sub`."""
        if not self._use_userinfo or provider.userinfo_endpoint is None:
            return claims
        status, info = await self._get_json(
            provider.userinfo_endpoint, headers={"Authorization": f"Bearer {access_token}"}
        )
        if status != 200 or not isinstance(info, dict):
            raise UpstreamFailed(
                f"{self.display_name} is not reachable at the moment. Please try later.",
                log_detail=f"userinfo HTTP {status}",
            )
        if info.get("sub") != claims.get("sub"):
            # OIDC Core §5.3.4: userinfo about someone else must not be used.
            log.warning("oidc.userinfo_sub_mismatch", upstream=self.id)
            return claims
        merged = dict(claims)
        merged.update({k: v for k, v in info.items() if k not in _ID_TOKEN_ONLY})
        return merged

    async def _get_json(
        self, url: str, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        """(status, parsed JSON body or None); network failures are `UpstreamFailed`."""
        try:
            async with self._http.get(
                url,
                headers={"Accept": "application/json", **(headers or {})},
                allow_redirects=False,
            ) as response:
                status = response.status
                body = await response.content.read(_MAX_BODY + 1)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise UpstreamFailed(
                f"{self.display_name} is not reachable at the moment. Please try later.",
                log_detail=f"GET {urlsplit(url).path}: {type(error).__name__}",
            ) from None
        return status, _json_object(body)


def _form_encode(value: str) -> str:
    return quote(value, safe="").replace("%20", "+")


def _json_object(body: bytes) -> dict[str, Any] | None:
    if len(body) > _MAX_BODY:
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
