"""LTI 1.3 launches from a course platform (Canvas, Moodle, Blackboard ...): the broker is the
tool (IMS LTI Core 1.3, IMS Security Framework 1.0, Deep Linking 2.0, NRPS 2.0).

Contracts:
- One `LtiUpstream` is one platform registration: issuer, client id, deployment ids, the
  platform's JWKS, OIDC auth and token URLs, and the launcher allow-list (`targets`, exact
  URLs). Launches are platform-initiated: `begin` (the chooser) and `complete` (the generic
  callback) refuse; `initiate` answers the third-party-initiated login and `launch` checks the
  form post that follows.
- `initiate` checks `iss`, `client_id`, `lti_deployment_id`, `login_hint` and that
  `target_link_uri` is an allowed target (or the tool's own launch URL, for Deep Linking),
  keeps a fresh nonce and the target under `{id}:flow:{flow id}` (ten minutes) and redirects
  to the platform's auth URL: `response_type=id_token`, `response_mode=form_post`,
  `scope=openid`, `prompt=none`, `state` = the flow id, `redirect_uri` = the launch URL.
- `launch` consumes that record (a launch is answered once) and checks, in order: `state`,
  the `id_token` header `alg` against the allow-list (never none or HS*), the signature with a
  key from the platform JWKS (refetched on an unknown `kid`), `iss`, `aud` contains the client
  id, `azp` equals it (required with several audiences), `exp`/`iat`/`nbf` within
  `clock_skew`, single use of the id_token and of its `nonce` (shared replay cache), the nonce
  of this flow, `version` 1.3.0, `message_type`, `deployment_id` registered, `sub`, `roles`,
  `target_link_uri` (equal to the login's and allowed), `resource_link.id` (resource links),
  `deep_linking_settings.deep_link_return_url` (Deep Linking).
- Groups (what policies see): for a launch in context C through upstream U, each membership
  role R (short name, e.g. Learner, Instructor, TeachingAssistant, ContentDeveloper, Mentor,
  Administrator) becomes `lti:U:C#R`, plus `lti:U:C` for any member of C; institution and
  system roles become `lti:U#R`. Sub-roles (`membership/Instructor#TeachingAssistant`) give
  their own short name.
- Platform services: `service_token` obtains a platform access token with a client-credentials
  JWT assertion (RFC 7523; `iss` the broker, `sub` the client id, `aud` the token URL, signed
  by the broker key ring through `TokenSigner`), cached until shortly before it expires;
  `members` reads a context's NRPS membership container (following `rel=next`).
  `deep_link_claims` builds the LtiDeepLinkingResponse claims (one ltiResourceLink item); the
  broker signs them with its key ring.
- Only `adapters.errors` types escape; descriptions are for the user, `log_detail` names the
  failed check (never a token).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import structlog

from adapters.base import LoginFlow, Principal, Redirect, ReplayCache, TokenSigner
from adapters.errors import (
    ConfigurationError,
    InvalidRequest,
    NotFound,
    UpstreamFailed,
)
from adapters.jwks import ASYMMETRIC_ALGS, JwksCache, decode_signed

__all__ = [
    "CLAIM",
    "NRPS_SCOPE",
    "DeepLinking",
    "LtiLaunch",
    "LtiUpstream",
    "Member",
    "lti_groups",
    "role_name",
]

log = structlog.get_logger(__name__)

FLOW_TTL: Final = 600
CLAIM: Final = "https://purl.imsglobal.org/spec/lti/claim/"
DL_CLAIM: Final = "https://purl.imsglobal.org/spec/lti-dl/claim/"
NRPS_CLAIM: Final = "https://purl.imsglobal.org/spec/lti-nrps/claim/namesroleservice"
NRPS_SCOPE: Final = "https://purl.imsglobal.org/spec/lti-nrps/scope/contextmembership.readonly"
NRPS_MEDIA_TYPE: Final = "application/vnd.ims.lti-nrps.v2.membershipcontainer+json"
RESOURCE_LINK: Final = "LtiResourceLinkRequest"
DEEP_LINKING: Final = "LtiDeepLinkingRequest"
ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Roles that may see a context's members and place links (LIS v2 membership roles).
STAFF_ROLES: Final = frozenset({"Instructor", "TeachingAssistant", "Administrator"})

_MAX_TOKEN: Final = 64 * 1024
_MAX_BODY: Final = 4 * 1024 * 1024
_MAX_PAGES: Final = 50
_MAX_CUSTOM: Final = 50
_MAX_VALUE: Final = 1000
_ROLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_NEXT_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?', re.IGNORECASE)
_UNVERIFIED = "The course platform's launch could not be verified. Please start it again."


@dataclass(frozen=True, slots=True)
class DeepLinking:
    """What a Deep Linking request asks the tool to answer."""

    return_url: str
    data: str | None = None
    accept_types: tuple[str, ...] = ()
    title: str = ""


@dataclass(frozen=True, slots=True)
class LtiLaunch:
    """One verified launch: who, from where, to where, with which extras."""

    principal: Principal
    message_type: str
    deployment_id: str
    target_link_uri: str
    roles: tuple[str, ...]
    context_id: str | None = None
    context_title: str = ""
    resource_link_id: str | None = None
    resource_link_title: str = ""
    custom: Mapping[str, str] = field(default_factory=dict)
    deep_linking: DeepLinking | None = None
    nrps_url: str | None = None

    @property
    def is_staff(self) -> bool:
        """An instructor, teaching assistant or administrator in the launch's context."""
        return self.context_id is not None and not STAFF_ROLES.isdisjoint(self.roles)


@dataclass(frozen=True, slots=True)
class Member:
    """One NRPS context member."""

    user_id: str
    name: str
    email: str | None
    roles: tuple[str, ...]
    status: str


def role_name(uri: str) -> tuple[str, str] | None:
    """(kind, short name) of an LTI role: kind is "membership", "institution" or "system".

    `http://purl.imsglobal.org/vocab/lis/v2/membership#Instructor` → ("membership",
    "Instructor"); a sub-role `.../membership/Instructor#TeachingAssistant` → ("membership",
    "TeachingAssistant"); a bare name (deprecated short form) is a membership role. None for
    what is no LIS role."""
    base, _, name = uri.rpartition("#")
    if not base:
        return ("membership", uri) if _ROLE_NAME.match(uri) else None
    if not _ROLE_NAME.match(name):
        return None
    for kind in ("membership", "institution", "system"):
        if f"/lis/v2/{kind}" in base:
            return kind, name
    return None


def lti_groups(upstream: str, context_id: str | None, roles: Sequence[str]) -> tuple[str, ...]:
    """The groups of a launch (the scheme in the module docstring), order kept."""
    groups: dict[str, None] = {}
    for uri in roles:
        parsed = role_name(uri)
        if parsed is None:
            continue
        kind, name = parsed
        if kind == "membership":
            if context_id is not None:
                groups.setdefault(f"lti:{upstream}:{context_id}", None)
                groups.setdefault(f"lti:{upstream}:{context_id}#{name}", None)
        else:
            groups.setdefault(f"lti:{upstream}#{name}", None)
    return tuple(groups)


def _short_roles(roles: Sequence[str]) -> tuple[str, ...]:
    names: dict[str, None] = {}
    for uri in roles:
        parsed = role_name(uri)
        if parsed is not None and parsed[0] == "membership":
            names.setdefault(parsed[1], None)
    return tuple(names)


def _text(value: Any, limit: int = _MAX_VALUE) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _with_query(url: str, params: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


class LtiUpstream:
    """One LTI 1.3 platform registration (implements Upstream; `PlatformInitiated`: the
    chooser never offers it)."""

    platform_initiated = True

    def __init__(
        self,
        *,
        id: str,
        display_name: str,
        issuer: str,
        client_id: str,
        deployment_ids: Sequence[str],
        jwks_url: str,
        auth_login_url: str,
        token_url: str,
        targets: Mapping[str, str],
        launch_url: str,
        id_token_algs: Sequence[str],
        clock_skew: int,
        ticket_ttl: int,
        launch_record_ttl: int,
        http: aiohttp.ClientSession,
        cache: ReplayCache,
        signer: TokenSigner,
    ) -> None:
        bad = [a for a in id_token_algs if a not in ASYMMETRIC_ALGS]
        if not id_token_algs or bad:
            raise ConfigurationError(
                f"upstream {id}: id_token_algs must be asymmetric JWS algorithms, not {bad}"
            )
        if not targets:
            raise ConfigurationError(f"upstream {id}: list at least one launch target")
        self.id = id
        self.display_name = display_name
        self.issuer = issuer
        self.client_id = client_id
        self.deployment_ids = frozenset(deployment_ids)
        self.auth_login_url = auth_login_url
        self.token_url = token_url
        self.targets: Mapping[str, str] = dict(targets)
        self.launch_url = launch_url
        self.ticket_ttl = ticket_ttl
        self.launch_record_ttl = launch_record_ttl
        self._algs = tuple(id_token_algs)
        self._clock_skew = int(clock_skew)
        self._jwks = JwksCache(http, jwks_url)
        self._http = http
        self._cache = cache
        self._signer = signer
        self._service_tokens: dict[str, tuple[str, float]] = {}
        self._token_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"LtiUpstream(id={self.id!r}, issuer={self.issuer!r})"

    # -- Upstream --------------------------------------------------------------------------

    async def begin(self, flow: LoginFlow) -> Redirect:
        """Refused: an LTI sign-in starts at the course platform, never at the broker."""
        raise InvalidRequest(
            f"Sign-in through {self.display_name} starts in your course: open the notebook "
            "link there.",
            log_detail=f"LTI upstream {self.id} cannot begin a sign-in (platform-initiated)",
        )

    async def complete(self, flow: LoginFlow, params: Mapping[str, str]) -> Principal:
        """Refused: launches arrive at `/lti/{id}/launch`, which calls `launch`."""
        raise InvalidRequest(
            "This is not where course launches arrive.",
            log_detail=f"LTI upstream {self.id}: launch posted to the generic callback",
        )

    # -- OIDC third-party-initiated login --------------------------------------------------

    def check_initiation(self, params: Mapping[str, str]) -> str:
        """The `target_link_uri` of a valid login initiation (LTI Core §5.1.1, Security
        Framework §5.1.1.1); `InvalidRequest` otherwise."""
        if params.get("iss") != self.issuer:
            raise InvalidRequest(
                "This course platform is not registered here.",
                log_detail=f"login initiation iss {params.get('iss', '')[:200]!r} is not ours",
            )
        client_id = params.get("client_id")
        if client_id is not None and client_id != self.client_id:
            raise InvalidRequest(
                "This course platform is not registered here.",
                log_detail=f"login initiation client_id {client_id[:200]!r} is not ours",
            )
        deployment = params.get("lti_deployment_id")
        if deployment is not None and deployment not in self.deployment_ids:
            raise InvalidRequest(
                "This course's tool deployment is not registered here.",
                log_detail=f"login initiation deployment {deployment[:200]!r} not registered",
            )
        if not params.get("login_hint"):
            raise InvalidRequest(
                "The course platform's launch is incomplete.",
                log_detail="login initiation without login_hint",
            )
        target = params.get("target_link_uri", "")
        if not self._allowed_target(target):
            raise InvalidRequest(
                "This launch points somewhere this broker does not send people.",
                log_detail=f"target_link_uri {target[:200]!r} is not an allowed target",
            )
        return target

    def _allowed_target(self, target: str) -> bool:
        return target in self.targets or target == self.launch_url

    async def initiate(self, flow: LoginFlow, params: Mapping[str, str]) -> Redirect:
        """The authentication request to the platform for a checked login initiation;
        `flow.next_url` is its target_link_uri."""
        target = self.check_initiation(params)
        nonce = secrets.token_urlsafe(32)
        record = {"nonce": nonce, "target": target}
        await self._cache.set(self._flow_key(flow.id), json.dumps(record), FLOW_TTL)
        query = {
            "scope": "openid",
            "response_type": "id_token",
            "response_mode": "form_post",
            "prompt": "none",
            "client_id": self.client_id,
            "redirect_uri": self.launch_url,
            "login_hint": params["login_hint"],
            "state": flow.id,
            "nonce": nonce,
        }
        if params.get("lti_message_hint"):
            query["lti_message_hint"] = params["lti_message_hint"]
        return Redirect(url=_with_query(self.auth_login_url, query))

    # -- the launch ------------------------------------------------------------------------

    async def launch(self, flow: LoginFlow, params: Mapping[str, str]) -> LtiLaunch:
        """Check the platform's form post (see the module docstring) and describe the launch."""
        raw = await self._cache.pop(self._flow_key(flow.id))
        if raw is None:
            raise InvalidRequest(
                "This launch has expired or was already used. Please start it again.",
                log_detail="no pending LTI login for this flow (expired or replayed)",
            )
        record: dict[str, str] = json.loads(raw)
        if "error" in params:
            code = (
                params["error"] if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", params["error"]) else "?"
            )
            raise InvalidRequest(
                f"{self.display_name} did not complete the launch ({code}).",
                log_detail=f"platform error {code}: {params.get('error_description', '')[:200]}",
            )
        if not hmac.compare_digest(params.get("state", "").encode(), flow.id.encode()):
            raise InvalidRequest(_UNVERIFIED, log_detail="launch state does not match the flow")
        token = params.get("id_token", "")
        if not token or len(token) > _MAX_TOKEN:
            raise InvalidRequest(_UNVERIFIED, log_detail="launch without a usable id_token")
        claims = await self._verify(token)
        await self._check_replay(token, claims)
        if not hmac.compare_digest(str(claims["nonce"]).encode(), record["nonce"].encode()):
            raise InvalidRequest(_UNVERIFIED, log_detail="id_token nonce is not this flow's")
        return self._describe(claims, record["target"])

    async def _verify(self, token: str) -> dict[str, Any]:
        claims = await decode_signed(
            token, self._jwks, algs=self._algs, audience=self.client_id, issuer=self.issuer,
            leeway=self._clock_skew, require=["iss", "aud", "exp", "iat", "nonce"],
            refusal=_UNVERIFIED,
        )  # fmt: skip
        if claims["iat"] > time.time() + self._clock_skew:
            raise InvalidRequest(_UNVERIFIED, log_detail="id_token iat in the future")
        aud = claims["aud"]
        audiences = [aud] if isinstance(aud, str) else list(aud)
        azp = claims.get("azp")
        if (len(audiences) > 1 or azp is not None) and azp != self.client_id:
            # Security Framework §5.1.3 (5)/(6): azp names us whenever several audiences.
            raise InvalidRequest(_UNVERIFIED, log_detail=f"id_token azp {str(azp)[:100]!r}")
        if not isinstance(claims["nonce"], str) or not claims["nonce"]:
            raise InvalidRequest(_UNVERIFIED, log_detail="id_token nonce is not a string")
        return claims

    async def _check_replay(self, token: str, claims: Mapping[str, Any]) -> None:
        """Each id_token and each nonce is accepted once, across replicas."""
        ttl = max(float(claims["exp"]) - time.time() + self._clock_skew, 1.0) + FLOW_TTL
        digest = hashlib.sha256(token.encode()).hexdigest()
        if not await self._cache.add(f"{self.id}:id_token:{digest}", "1", ttl):
            raise InvalidRequest(_UNVERIFIED, log_detail="id_token replayed")
        nonce = hashlib.sha256(str(claims["nonce"]).encode()).hexdigest()
        if not await self._cache.add(f"{self.id}:nonce:{nonce}", "1", ttl):
            raise InvalidRequest(_UNVERIFIED, log_detail="id_token nonce replayed")

    def _describe(self, claims: Mapping[str, Any], login_target: str) -> LtiLaunch:
        """The LTI claim checks after the JWT ones; the launch they describe."""

        def refuse(detail: str) -> InvalidRequest:
            return InvalidRequest(_UNVERIFIED, log_detail=detail)

        if claims.get(CLAIM + "version") != "1.3.0":
            raise refuse(f"LTI version {str(claims.get(CLAIM + 'version'))[:20]!r}")
        message_type = claims.get(CLAIM + "message_type")
        if message_type not in (RESOURCE_LINK, DEEP_LINKING):
            raise refuse(f"message_type {str(message_type)[:40]!r} not supported")
        deployment = claims.get(CLAIM + "deployment_id")
        if not isinstance(deployment, str) or deployment not in self.deployment_ids:
            raise refuse(f"deployment_id {str(deployment)[:100]!r} not registered")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.strip():
            raise refuse("sub missing (anonymous launches cannot sign in)")
        roles = claims.get(CLAIM + "roles")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise refuse("roles claim missing or not a list of strings")
        target = claims.get(CLAIM + "target_link_uri")
        if not isinstance(target, str) or target != login_target:
            raise refuse("target_link_uri missing or not the login initiation's")
        context = claims.get(CLAIM + "context")
        context_id: str | None = None
        context_title = ""
        if context is not None:
            if not isinstance(context, dict) or not isinstance(context.get("id"), str):
                raise refuse("context claim without an id")
            context_id = context["id"][:255]
            context_title = _text(context.get("title")) or _text(context.get("label"))
        link = claims.get(CLAIM + "resource_link")
        link_id: str | None = None
        link_title = ""
        deep_linking: DeepLinking | None = None
        if message_type == RESOURCE_LINK:
            if not isinstance(link, dict) or not isinstance(link.get("id"), str) or not link["id"]:
                raise refuse("resource_link.id missing")
            if target not in self.targets:
                raise refuse("a resource link must target an allowed launch URL")
            link_id = link["id"][:255]
            link_title = _text(link.get("title"))
        else:
            settings = claims.get(DL_CLAIM + "deep_linking_settings")
            if not isinstance(settings, dict):
                raise refuse("deep_linking_settings missing")
            return_url = settings.get("deep_link_return_url")
            if not isinstance(return_url, str) or urlsplit(return_url).scheme not in (
                "https",
                "http",
            ):
                raise refuse("deep_link_return_url missing")
            accept = settings.get("accept_types")
            data = settings.get("data")
            deep_linking = DeepLinking(
                return_url=return_url,
                data=data if isinstance(data, str) else None,
                accept_types=tuple(a for a in accept if isinstance(a, str))
                if isinstance(accept, list)
                else (),
                title=_text(settings.get("title")),
            )
        nrps = claims.get(NRPS_CLAIM)
        nrps_url = nrps.get("context_memberships_url") if isinstance(nrps, dict) else None
        principal = self._principal(claims, subject, context_id, context_title, roles)
        return LtiLaunch(
            principal=principal,
            message_type=str(message_type),
            deployment_id=deployment,
            target_link_uri=target,
            roles=_short_roles(roles),
            context_id=context_id,
            context_title=context_title,
            resource_link_id=link_id,
            resource_link_title=link_title,
            custom=self._custom(claims.get(CLAIM + "custom")),
            deep_linking=deep_linking,
            nrps_url=nrps_url if isinstance(nrps_url, str) and nrps_url else None,
        )

    def _principal(
        self,
        claims: Mapping[str, Any],
        subject: str,
        context_id: str | None,
        context_title: str,
        roles: Sequence[str],
    ) -> Principal:
        name = _text(claims.get("name"), 200) or " ".join(
            p
            for p in (_text(claims.get("given_name"), 100), _text(claims.get("family_name"), 100))
            if p
        )
        email = _text(claims.get("email"), 320) or None
        kept: dict[str, Any] = {
            "lti_deployment_id": claims.get(CLAIM + "deployment_id"),
            "lti_roles": list(_short_roles(roles)),
        }
        if context_id is not None:
            kept["lti_context_id"] = context_id
            kept["lti_context_title"] = context_title
        username = _text(claims.get("preferred_username"), 200)
        if username:
            kept["preferred_username"] = username
        return Principal(
            idp=self.id,
            issuer=self.issuer,
            subject=subject[:255],
            display_name=name,
            email=email,
            groups=lti_groups(self.id, context_id, roles),
            auth_time=int(time.time()),
            claims=kept,
        )

    @staticmethod
    def _custom(value: Any) -> dict[str, str]:
        """Custom parameters as strings (platforms substitute variables into strings)."""
        if not isinstance(value, dict):
            return {}
        custom: dict[str, str] = {}
        for key, item in list(value.items())[:_MAX_CUSTOM]:
            if isinstance(key, str) and len(key) <= 100 and isinstance(item, str | int | float):
                custom[key] = str(item)[:_MAX_VALUE]
        return custom

    # -- Deep Linking ------------------------------------------------------------------------

    def deep_link_claims(
        self, *, deployment_id: str, data: str | None, target: str, ttl: int = 300
    ) -> dict[str, Any]:
        """The claims of an LtiDeepLinkingResponse (Deep Linking 2.0 §4.2) placing one
        ltiResourceLink to `target`, an allowed launch URL; the broker signs them with its key
        ring (`iss` is our client id, `aud` the platform)."""
        if target not in self.targets:
            raise InvalidRequest(
                "That notebook is not one this broker offers.",
                log_detail=f"deep link target {target[:200]!r} not allowed",
            )
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.client_id,
            "aud": self.issuer,
            "iat": now,
            "exp": now + ttl,
            "nonce": secrets.token_urlsafe(24),
            CLAIM + "message_type": "LtiDeepLinkingResponse",
            CLAIM + "version": "1.3.0",
            CLAIM + "deployment_id": deployment_id,
            DL_CLAIM + "content_items": [
                {"type": "ltiResourceLink", "title": self.targets[target], "url": target}
            ],
        }
        if data is not None:
            claims[DL_CLAIM + "data"] = data
        return claims

    # -- platform services (client credentials, NRPS) -----------------------------------

    async def service_token(self, scope: str) -> str:
        """A platform access token for `scope` (Security Framework §4.1: client credentials
        with a JWT assertion), reused until a minute before it expires."""
        async with self._token_lock:
            cached = self._service_tokens.get(scope)
            if cached is not None and cached[1] > time.monotonic():
                return cached[0]
            assertion = await self._signer.sign(
                {"sub": self.client_id}, audience=self.token_url, ttl=300
            )
            form = {
                "grant_type": "client_credentials",
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion,
                "scope": scope,
            }
            status, document, _ = await self._request("POST", self.token_url, data=form)
            token = document.get("access_token") if document is not None else None
            if status != 200 or not isinstance(token, str) or not token:
                raise UpstreamFailed(
                    f"{self.display_name} did not grant access to its services.",
                    log_detail=f"platform token endpoint HTTP {status}",
                )
            expires_in = document.get("expires_in") if document is not None else None
            lifetime = float(expires_in) if isinstance(expires_in, int | float) else 300.0
            self._service_tokens[scope] = (token, time.monotonic() + max(lifetime - 60, 0))
            return token

    async def members(self, url: str) -> list[Member]:
        """The members of a context from its NRPS `context_memberships_url`."""
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise NotFound("The course platform did not offer its member list.")
        token = await self.service_token(NRPS_SCOPE)
        members: list[Member] = []
        next_url: str | None = url
        pages = 0
        while next_url is not None and pages < _MAX_PAGES:
            pages += 1
            status, document, link = await self._request(
                "GET",
                next_url,
                headers={"Authorization": f"Bearer {token}", "Accept": NRPS_MEDIA_TYPE},
            )
            if status != 200 or document is None or not isinstance(document.get("members"), list):
                raise UpstreamFailed(
                    f"{self.display_name} did not return the course's members.",
                    log_detail=f"NRPS HTTP {status}",
                )
            members.extend(m for m in map(_member, document["members"]) if m is not None)
            found = _NEXT_LINK.search(link or "")
            next_url = found.group(1) if found else None
        return members

    async def _request(
        self, method: str, url: str, **kwargs: Any
    ) -> tuple[int, dict[str, Any] | None, str | None]:
        headers = {"Accept": "application/json", **kwargs.pop("headers", {})}
        try:
            async with self._http.request(
                method, url, headers=headers, allow_redirects=False, **kwargs
            ) as response:
                body = await response.content.read(_MAX_BODY + 1)
                status, link = response.status, response.headers.get("Link")
        except (aiohttp.ClientError, TimeoutError) as error:
            raise UpstreamFailed(
                f"{self.display_name} is not reachable at the moment. Please try later.",
                log_detail=f"{method} {urlsplit(url).path}: {type(error).__name__}",
            ) from None
        try:
            document = json.loads(body) if len(body) <= _MAX_BODY else None
        except ValueError:
            document = None
        return status, document if isinstance(document, dict) else None, link

    def _flow_key(self, flow_id: str) -> str:
        return f"{self.id}:flow:{flow_id}"


def _member(value: Any) -> Member | None:
    if not isinstance(value, dict) or not isinstance(value.get("user_id"), str):
        return None
    roles = value.get("roles")
    name = _text(value.get("name"), 200) or " ".join(
        p for p in (_text(value.get("given_name"), 100), _text(value.get("family_name"), 100)) if p
    )
    return Member(
        user_id=value["user_id"],
        name=name,
        email=_text(value.get("email"), 320) or None,
        roles=_short_roles([r for r in roles if isinstance(r, str)])
        if isinstance(roles, list)
        else (),
        status=_text(value.get("status"), 20) or "Active",
    )
