"""One path for every token the authorization server hands out.

Each grant type works out *who* (a principal, or the client itself), *for what* (scopes,
audience) and *how bound* (DPoP key), then calls `issue`: the policy decides, the lifetime is
clipped to the policy's `max_ttl`, the tokens are minted, and one audit record names the
grant, the client, the principal, the jti and the deciding policies.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from adapters.base import Principal
from broker.errors import InvalidGrant
from broker.oauth.clients import Client
from broker.services import Services
from broker.storage import PrincipalRecord
from policies.engine import Resource

ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
REFRESH_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:refresh_token"


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """Everything a grant decided; the input to `issue`."""

    grant_type: str
    client: Client
    principal: Principal | None  # None: the client acts for itself (client_credentials)
    scopes: Sequence[str]
    audience: Sequence[str]
    dpop_jkt: str | None = None
    nonce: str | None = None
    refresh: bool = False
    refresh_family: str | None = None
    refresh_expires_at: datetime | None = None
    act: Mapping[str, Any] | None = None
    requested_token_type: str = ACCESS_TOKEN_TYPE
    extra_audit: Mapping[str, Any] = field(default_factory=dict)
    not_after: int | None = None  # e.g. the subject token's exp in an exchange


def profile_claims(principal: Principal, scopes: Sequence[str]) -> dict[str, Any]:
    """OpenID Connect standard claims the scopes allow (Core §5.4), plus `groups` and
    `affiliation` (eduPersonScopedAffiliation values, already checked against the IdP's scopes)."""
    claims: dict[str, Any] = {}
    if "profile" in scopes:
        claims["name"] = principal.display_name or principal.subject
        claims["preferred_username"] = principal.subject
    if "email" in scopes and principal.email:
        claims["email"] = principal.email
    if "groups" in scopes:
        claims["groups"] = list(principal.groups)
        if principal.affiliation:
            claims["affiliation"] = list(principal.affiliation)
    return claims


PROFILE_TTL = 300  # seconds a profile is served from the shared cache


def _profile_key(principal_id: str) -> str:
    return f"principal:{principal_id}"


async def remember_principal(svc: Services, principal: Principal) -> None:
    """Keep the latest profile for userinfo and refreshes (never any upstream token): in SQL,
    and written through to the shared cache that `load_principal` reads first."""
    document = principal.to_json()
    async with svc.db.sessions() as session, session.begin():
        await session.merge(
            PrincipalRecord(id=principal.id, document=document, updated_at=datetime.now(UTC))
        )
    await svc.cache.set(_profile_key(principal.id), json.dumps(document), PROFILE_TTL)


async def load_principal(svc: Services, principal_id: str) -> Principal | None:
    """The latest profile: from the shared cache (every update writes through to it, so
    replicas sharing Redis agree), else from SQL. Every request with a user's token asks."""
    cached = await svc.cache.get(_profile_key(principal_id))
    if cached is not None:
        return Principal.from_json(json.loads(cached))
    async with svc.db.reads() as session:
        record = await session.get(PrincipalRecord, principal_id)
    if record is None:
        return None
    await svc.cache.set(_profile_key(principal_id), json.dumps(record.document), PROFILE_TTL)
    return Principal.from_json(record.document)


@dataclass(frozen=True, slots=True)
class Issued:
    """The response body and what a later revocation needs to find the tokens."""

    body: dict[str, Any]
    jti: str
    expires_at: int
    refresh_family: str | None


async def issue(svc: Services, req: TokenRequest) -> Issued:
    """Decide, mint, audit; the body is RFC 6749 §5.1 / RFC 8693 §2.2.1."""
    client = req.client
    subject_id = req.principal.id if req.principal else client.id
    resource = Resource("Client", client.id, attrs={"first_party": client.config.first_party})
    decision = svc.policy.decide(req.principal, "exchange", resource, client=client.id)
    audit_base = {
        "grant_type": req.grant_type,
        "client": client.id,
        "policies": list(decision.reasons),
        **req.extra_audit,
    }
    if not decision.allowed:
        svc.metrics.denials.labels(action="exchange").inc()
        await svc.audit.append("token.denied", outcome="denied", actor=subject_id, **audit_base)
        raise InvalidGrant("the broker's policy does not allow this grant")
    ttl = svc.settings.tokens.access_token_ttl
    if decision.limits.max_ttl is not None:
        ttl = min(ttl, decision.limits.max_ttl)
    if req.not_after is not None:
        ttl = min(ttl, req.not_after - int(time.time()))
        if ttl <= 0:
            raise InvalidGrant("the token to exchange has expired")
    principal = req.principal
    extra: dict[str, Any] = {}
    cnf = {"jkt": req.dpop_jkt} if req.dpop_jkt else None
    if principal is not None and "groups" in req.scopes:
        extra["groups"] = list(principal.groups)
        if principal.affiliation:
            extra["affiliation"] = list(principal.affiliation)
    body: dict[str, Any] = {}
    if req.requested_token_type == ID_TOKEN_TYPE:
        if principal is None:
            raise InvalidGrant("an ID token needs a user")
        minted = await svc.tokens.mint(
            kind="id", subject=principal.id, audience=list(req.audience), client_id=client.id,
            ttl=min(ttl, svc.settings.tokens.id_token_ttl), auth_time=principal.auth_time,
            acr=principal.acr, cnf=cnf, act=req.act,
            extra=profile_claims(principal, req.scopes) | extra,
        )  # fmt: skip
        body = {"access_token": minted.token, "issued_token_type": ID_TOKEN_TYPE,
                "token_type": "N_A"}  # fmt: skip
    else:
        minted = await svc.tokens.mint(
            subject=subject_id, audience=list(req.audience), client_id=client.id,
            scope=req.scopes, ttl=ttl,
            auth_time=principal.auth_time if principal else None,
            acr=principal.acr if principal else None, cnf=cnf, act=req.act,
            extra=extra or None,
        )  # fmt: skip
        body = {
            "access_token": minted.token,
            "token_type": "DPoP" if req.dpop_jkt else "Bearer",
        }
        if req.grant_type.endswith("token-exchange"):
            body["issued_token_type"] = req.requested_token_type
    body["expires_in"] = minted.expires_at - minted.issued_at
    body["scope"] = " ".join(req.scopes)
    audit = {**audit_base, "token_jti": minted.jti, "expires_at": minted.expires_at,
             "audience": list(req.audience), "dpop_bound": bool(req.dpop_jkt)}  # fmt: skip
    if principal is not None and "openid" in req.scopes and req.grant_type in _ID_TOKEN_GRANTS:
        id_token = await svc.tokens.mint(
            kind="id", subject=principal.id, audience=client.id, client_id=client.id,
            ttl=svc.settings.tokens.id_token_ttl, auth_time=principal.auth_time,
            acr=principal.acr, nonce=req.nonce, extra=profile_claims(principal, req.scopes),
        )  # fmt: skip
        body["id_token"] = id_token.token
        audit["id_token_jti"] = id_token.jti
    if req.refresh and principal is not None and client.allows_grant("refresh_token"):
        grant = {
            "principal_id": principal.id,
            "scopes": list(req.scopes),
            "audience": list(req.audience),
            "jkt": req.dpop_jkt if client.public else None,
            "auth_time": principal.auth_time,
            # The access token issued beside it: revoking the family revokes it too.
            "access_jti": minted.jti,
            "access_exp": minted.expires_at,
        }
        refresh, family = await svc.oauth.refresh.create(
            client_id=client.id, subject=principal.id, grant=grant,
            family_id=req.refresh_family, expires_at=req.refresh_expires_at,
        )  # fmt: skip
        body["refresh_token"] = refresh
        audit["refresh_family"] = family
    await svc.audit.append("token.issued", outcome="success", actor=subject_id, **audit)
    return Issued(body, minted.jti, minted.expires_at, audit.get("refresh_family"))


_ID_TOKEN_GRANTS = frozenset(
    {"authorization_code", "refresh_token", "urn:ietf:params:oauth:grant-type:device_code"}
)
