"""RFC 8693 token exchange at `/oauth/token`.

The subject token (and the optional actor token) is either a broker token, verified locally
(and refused if its `jti` was revoked), or a token of a configured trusted issuer such as a peer
binder deployment, verified with the keys that issuer publishes (`broker.oauth.peers`).

- A broker token is only exchanged by the client it was issued to (`client_id` / `azp`) or a
  client named in its `aud` (a resource server passing its caller's token on), so a leaked
  token cannot be turned into a token for another audience by just any client. A token bound
  to a DPoP key (`cnf.jkt`) needs a DPoP proof by that key on the exchange request.
- Who the new token is for: the broker user of the subject token (still known to the broker);
  the client itself for a client's own token (client_credentials, exchanged by that client
  only); or, for a trusted issuer's token, a peer principal of its own (`idp = "peer:<iss>"`,
  id derived from issuer and subject). The policy decides inside `issue`.
- Narrowing only: `resource`/`audience` pick from the client's audiences; `scope` must lie in
  both the client's scopes and the subject token's `scope` (a token without one, such as an
  ID token, stands for the identity scopes only).
- Delegation (§4.1): with an actor token, `act = {"sub", "iss"}` of the actor, with any `act`
  the subject token carried nested inside; without one, the subject token's `act` is kept.

Errors (§2.2.2): a subject or actor token that is malformed, does not verify, is revoked, was
issued to another client, comes from an untrusted issuer or names an unknown user is
`invalid_request`, as the RFC requires; an audience the client may not ask for is
`invalid_target`. Descriptions never echo a token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from pydantic import ValidationError

from adapters.base import Principal
from broker.credentials import CredentialRequest, expires_in, issue_credential
from broker.errors import InvalidRequest, InvalidScope, InvalidToken
from broker.oauth.bearer import is_revoked
from broker.oauth.issuance import (
    ACCESS_TOKEN_TYPE,
    ID_TOKEN_TYPE,
    JWT_TOKEN_TYPE,
    Issued,
    TokenRequest,
    issue,
    load_principal,
    remember_principal,
)
from broker.oauth.peers import Expected, trusted_issuer, verify_peer_token
from broker.oauth.token import GrantContext, grant, narrow_audience, require
from broker.settings import TrustedIssuerConfig
from broker.tokens import TokenKind

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
INPUT_TOKEN_TYPES = frozenset({ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE, ID_TOKEN_TYPE})
ISSUED_TOKEN_TYPES = frozenset({ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE, ID_TOKEN_TYPE})
# What a subject token without a `scope` claim (an ID token) can stand for: who the user is.
IDENTITY_SCOPES = ("openid", "profile", "email", "groups")
# Each exchange with an actor adds a level; a bound keeps tokens (and headers) small.
MAX_ACT_DEPTH = 8
_AT_TYP = frozenset({"at+jwt", "application/at+jwt"})


@dataclass(frozen=True, slots=True)
class InputToken:
    """A verified subject or actor token."""

    claims: dict[str, Any]
    issuer: str
    peer: TrustedIssuerConfig | None  # None: the broker's own token

    @property
    def subject(self) -> str:
        return str(self.claims["sub"])


@grant(TOKEN_EXCHANGE)
async def token_exchange(ctx: GrantContext) -> Issued:
    """RFC 8693 §2.1 request → §2.2.1 response (through `issue`)."""
    form = ctx.form
    subject_token = require(form, "subject_token")
    subject_type = require(form, "subject_token_type")
    actor_token, actor_type = form.get("actor_token"), form.get("actor_token_type")
    if (actor_token is None) != (actor_type is None):
        raise InvalidRequest("actor_token and actor_token_type go together: send both or neither")
    if form.get("resource") in ctx.svc.backends:
        return await _exchange_for_credential(ctx, subject_token, subject_type)
    requested = form.get("requested_token_type", ACCESS_TOKEN_TYPE)
    if requested not in ISSUED_TOKEN_TYPES:
        raise InvalidRequest(f"requested_token_type {requested!r} is not supported")
    audience = narrow_audience(ctx.client, form)

    subject = await _verify(ctx, subject_token, subject_type, "subject_token")
    actor = None
    if actor_token is not None and actor_type is not None:
        actor = await _verify(ctx, actor_token, actor_type, "actor_token")
    principal = await _principal(ctx, subject)
    if principal is None and requested == ID_TOKEN_TYPE:
        raise InvalidRequest("an ID token can only be issued for a user, not for a client")
    scopes = _narrow_scopes(ctx, subject, form.get("scope"))
    act = _act(subject, actor)

    extra_audit: dict[str, Any] = {"subject_iss": subject.issuer, "subject_type": subject_type}
    if isinstance(subject.claims.get("jti"), str):
        extra_audit["subject_jti"] = subject.claims["jti"][:128]
    if actor is not None:
        extra_audit |= {"actor_sub": actor.subject[:256], "actor_iss": actor.issuer}
    if principal is not None and subject.peer is not None:
        # Stored before issuing, so userinfo and refreshes find the principal a token names.
        await remember_principal(ctx.svc, principal)
    request = TokenRequest(
        grant_type=TOKEN_EXCHANGE, client=ctx.client, principal=principal, scopes=scopes,
        audience=audience, dpop_jkt=ctx.dpop_jkt, act=act, requested_token_type=requested,
        extra_audit=extra_audit, not_after=_expiry(subject),
    )  # fmt: skip
    return await issue(ctx.svc, request)


CREDENTIAL_TOKEN_TYPE = "urn:binder-broker:token-type:credential"


async def _exchange_for_credential(ctx: GrantContext, token: str, token_type: str) -> Issued:
    """RFC 8693 with `resource` = a backend id: the user's token for a launch credential,
    the same path as `POST /v1/credentials` (`duration`, `role`, `project` as form fields).
    The credential is the `access_token` (compact JSON), `token_type` is "N_A" (§2.2.1)."""
    form = ctx.form
    backend = form["resource"]
    requested = form.get("requested_token_type", CREDENTIAL_TOKEN_TYPE)
    if requested != CREDENTIAL_TOKEN_TYPE:
        raise InvalidRequest(f"a backend as resource issues {CREDENTIAL_TOKEN_TYPE} only")
    subject = await _verify(ctx, token, token_type, "subject_token")
    principal = await _principal(ctx, subject)
    if principal is None:
        raise InvalidRequest("a launch credential is for a user, not for a client")
    scopes = _token_scopes(subject.claims) or []
    if f"launch:{backend}" not in scopes:
        raise InvalidScope(f"the subject token does not carry the scope launch:{backend}")
    fields: dict[str, Any] = {"backend": backend}
    if "duration" in form:
        if not form["duration"].isdigit():
            raise InvalidRequest("duration must be a number of seconds")
        fields["duration"] = int(form["duration"])
    fields |= {k: form[k] for k in ("role", "project", "repo") if k in form}
    try:
        request = CredentialRequest.model_validate(fields)
    except ValidationError as error:
        raise InvalidRequest(f"the request is not valid: {error.errors()[0]['msg']}") from None
    issued = await issue_credential(ctx.svc, principal, ctx.client.id, request)
    credential = issued.credential
    body = {
        "access_token": json.dumps(dict(credential.secret), separators=(",", ":")),
        "issued_token_type": CREDENTIAL_TOKEN_TYPE,
        "token_type": "N_A",
        "expires_in": expires_in(credential),
    } | {k: v for k, v in issued.body().items() if k != "credential"}
    return Issued(
        body=body, jti=credential.lease_id,
        expires_at=int(credential.expires_at.timestamp()), refresh_family=None,
    )  # fmt: skip


def _expiry(token: InputToken) -> int | None:
    """A new token never outlives the one it was exchanged for."""
    exp = token.claims.get("exp")
    return int(exp) if isinstance(exp, int | float) else None


async def _verify(ctx: GrantContext, token: str, token_type: str, role: str) -> InputToken:
    """The verified token, or InvalidRequest naming `role` (never the token)."""
    if token_type not in INPUT_TOKEN_TYPES:
        raise InvalidRequest(f"{role}_type {token_type!r} is not supported")
    svc = ctx.svc
    try:
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise InvalidToken("it is not a JWT") from None
        iss = unverified.get("iss")
        if iss == svc.tokens.issuer:
            claims = svc.tokens.verify(token, kind=_broker_kind(token, token_type))
            if isinstance(claims.get("jti"), str) and await is_revoked(svc, claims["jti"]):
                raise InvalidToken("it was revoked")
            _check_holder(claims, ctx.client.id)
            verified = InputToken(claims, svc.tokens.issuer, None)
        else:
            peer = trusted_issuer(svc.settings.trusted_issuers, iss)
            if peer is None:
                raise InvalidToken("its issuer is not trusted by this broker")
            claims = await verify_peer_token(
                svc.http, peer, token, expected=_peer_expected(token_type),
                clock_skew=svc.settings.tokens.clock_skew,
            )  # fmt: skip
            verified = InputToken(claims, peer.issuer, peer)
        _check_binding(claims, ctx.dpop_jkt)
    except InvalidToken as error:
        raise InvalidRequest(
            f"the {role} is not acceptable: {error.description}", log_detail=error.log_detail
        ) from None
    return verified


def _broker_kind(token: str, token_type: str) -> TokenKind:
    if token_type == ACCESS_TOKEN_TYPE:
        return "access"
    if token_type == ID_TOKEN_TYPE:
        return "id"
    # A `jwt` may be either; its explicit `typ` says which (and verify checks it again).
    typ = str(jwt.get_unverified_header(token).get("typ", "")).lower()
    return "access" if typ in _AT_TYP else "id"


def _peer_expected(token_type: str) -> Expected:
    if token_type == ACCESS_TOKEN_TYPE:
        return "access"
    return "id" if token_type == ID_TOKEN_TYPE else "any"


def _audiences(claims: Mapping[str, Any]) -> list[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    return [a for a in aud if isinstance(a, str)] if isinstance(aud, list) else []


def _check_holder(claims: Mapping[str, Any], client_id: str) -> None:
    holder = claims.get("client_id", claims.get("azp"))
    if holder != client_id and client_id not in _audiences(claims):
        raise InvalidToken("it was issued neither to this client nor for it")


def _check_binding(claims: Mapping[str, Any], dpop_jkt: str | None) -> None:
    cnf = claims.get("cnf")
    bound = cnf.get("jkt") if isinstance(cnf, dict) else None
    if bound is not None and bound != dpop_jkt:
        # Otherwise a stolen bound token could be exchanged for an unbound one.
        raise InvalidToken("it is bound to a DPoP key: send a DPoP proof signed with that key")


async def _principal(ctx: GrantContext, subject: InputToken) -> Principal | None:
    """Who the new token is for; None when a client exchanges its own token."""
    claims = subject.claims
    if subject.peer is not None:
        return peer_principal(subject.issuer, claims)
    if claims.get("client_id") == subject.subject:
        if subject.subject != ctx.client.id:
            raise InvalidRequest("a client's own token can only be exchanged by that client")
        return None
    principal = await load_principal(ctx.svc, subject.subject)
    if principal is None:
        raise InvalidRequest("the user of the subject_token is not known to this broker")
    return principal


def peer_principal(issuer: str, claims: Mapping[str, Any]) -> Principal:
    """A user of a trusted issuer, as a principal of its own (its id derives from both)."""

    def text(name: str) -> str | None:
        value = claims.get(name)
        return value if isinstance(value, str) and value else None

    groups = claims.get("groups")
    auth_time = claims.get("auth_time", claims.get("iat"))
    return Principal(
        idp=f"peer:{issuer}",
        issuer=issuer,
        subject=str(claims["sub"]),
        display_name=text("name") or text("preferred_username") or "",
        email=text("email"),
        # Namespaced: a peer cannot claim this broker's own groups (e.g. broker-admins).
        groups=tuple(f"peer:{issuer}#{g}" for g in groups if isinstance(g, str))
        if isinstance(groups, list)
        else (),
        auth_time=int(auth_time) if isinstance(auth_time, int | float) else 0,
    )


def _token_scopes(claims: Mapping[str, Any]) -> list[str] | None:
    """The scopes a token carries (`scope` string, or an `scp` list), None if it has none."""
    scope, scp = claims.get("scope"), claims.get("scp")
    if isinstance(scope, str):
        return scope.split()
    if isinstance(scp, list):
        return [s for s in scp if isinstance(s, str)]
    return None


def _narrow_scopes(ctx: GrantContext, subject: InputToken, requested: str | None) -> list[str]:
    """Scopes the client may have and the subject token grants; asking for more is refused."""
    carried = _token_scopes(subject.claims)
    granted = set(IDENTITY_SCOPES if carried is None else carried)
    allowed = ctx.client.narrow_scopes(requested)  # InvalidScope beyond the client's own
    if requested is None:
        return [s for s in allowed if s in granted]
    beyond = [s for s in allowed if s not in granted]
    if beyond:
        refused = " ".join(beyond)
        raise InvalidScope(f"an exchange only narrows the subject_token's scope; not: {refused}")
    return allowed


def _act(subject: InputToken, actor: InputToken | None) -> dict[str, Any] | None:
    """The new token's `act` claim (RFC 8693 §4.1): the current actor outermost."""
    previous = subject.claims.get("act")
    if previous is not None and not isinstance(previous, dict):
        raise InvalidRequest("the subject_token's act claim is malformed")
    if actor is None:
        return previous
    act: dict[str, Any] = {"sub": actor.subject, "iss": actor.issuer}
    if previous:
        act["act"] = previous
    depth, level = 1, previous
    while isinstance(level, dict):
        depth, level = depth + 1, level.get("act")
    if depth > MAX_ACT_DEPTH:
        raise InvalidRequest(f"the delegation chain is longer than {MAX_ACT_DEPTH} actors")
    return act
