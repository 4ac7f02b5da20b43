"""The authorization endpoint (RFC 6749 §4.1, OIDC Core §3.1) and the code grant.

Code flow only, PKCE `S256` required. The request is validated in two stages: until the
client and its exact redirect URI are known, errors show a page (never a redirect, so the
endpoint is no open redirector); after that, errors go back to the client with `state` and
`iss` (RFC 9207). The validated request is kept server-side while the user signs in or
consents, so `prompt=login` cannot loop and nothing can be changed on the way.
Codes live ≤ 60 s, are single-use and bound to client, redirect URI and PKCE challenge; a
replayed code revokes what was issued from it (RFC 6749 §4.1.2).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp import web
from sqlalchemy import delete, select

from adapters.base import Principal
from broker.errors import BrokerError, InvalidGrant, InvalidRequest
from broker.oauth.bearer import revoke_access_token
from broker.oauth.clients import Client
from broker.oauth.forms import parse_form, query_params
from broker.oauth.issuance import Issued, TokenRequest, issue, load_principal, remember_principal
from broker.oauth.refresh import token_hash
from broker.oauth.token import GrantContext, grant, require
from broker.pages import esc, origin_of, render
from broker.routes.login import current_session, read_form
from broker.services import Services
from broker.state import services
from broker.storage import ConsentRecord

AUTHORIZATION_CODE = "authorization_code"
_PKCE = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")
_REQUEST_TTL = 900
_USED_CODE_TTL = 86400
_KNOWN_PROMPTS = {"none", "login", "consent", "select_account"}


class AuthorizeError(BrokerError):
    """An error returned to the client's redirect URI (RFC 6749 §4.1.2.1)."""

    status = 302

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.code = error


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    """A validated authorization request, kept server-side between the hops of sign-in."""

    client_id: str
    redirect_uri: str
    redirect_uri_given: bool
    state: str
    scopes: list[str]
    code_challenge: str
    nonce: str | None
    prompt: list[str]
    max_age: int | None
    login_hint: str | None
    idp: str | None
    dpop_jkt: str | None
    created_at: float
    stale_session: str | None = None  # with prompt=login: the session that must not count


def _redirect(uri: str, params: dict[str, str]) -> web.Response:
    parts = urlsplit(uri)
    query = f"{parts.query}&{urlencode(params)}" if parts.query else urlencode(params)
    location = urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


def _error_to_client(
    svc: Services, req: AuthorizationRequest, error: AuthorizeError
) -> web.Response:
    params = {"error": error.code, "error_description": error.description}
    if req.state:
        params["state"] = req.state
    params["iss"] = svc.settings.server.public_url
    return _redirect(req.redirect_uri, params)


async def _params(request: web.Request) -> dict[str, str]:
    if request.method == "POST":
        if request.content_type != "application/x-www-form-urlencoded":
            raise InvalidRequest("send the authorization request as a form")
        return parse_form(await request.read())
    return query_params(request)


async def _client_and_redirect(svc: Services, params: dict[str, str]) -> tuple[Client, str, bool]:
    """Stage one: errors here are shown as a page, never redirected."""
    client = await svc.oauth.clients.get(params.get("client_id", ""))
    if client is None:
        raise InvalidRequest(
            "Unknown client. The application that sent you here is not registered."
        )
    registered = client.config.redirect_uris
    given = params.get("redirect_uri")
    if given is None:
        if len(registered) != 1:
            raise InvalidRequest("The application did not say where to send you back.")
        return client, registered[0], False
    if given not in registered:  # exact string match (RFC 9700 §4.1.3)
        raise InvalidRequest("The application's return address is not registered for it.")
    return client, given, True


def _validate(
    client: Client, redirect_uri: str, given: bool, p: dict[str, str]
) -> AuthorizationRequest:
    """Stage two: errors here go back to the client."""
    state = p.get("state", "")
    req = AuthorizationRequest(
        client_id=client.id, redirect_uri=redirect_uri, redirect_uri_given=given, state=state,
        scopes=[], code_challenge="", nonce=None, prompt=[], max_age=None, login_hint=None,
        idp=None, dpop_jkt=None, created_at=time.time(),
    )  # fmt: skip
    checks: list[tuple[bool, str, str]] = [
        (p.get("response_type") == "code", "unsupported_response_type",
         "only response_type=code is supported"),
        (client.allows_grant(AUTHORIZATION_CODE), "unauthorized_client",
         "this client may not use the authorization code flow"),
        (bool(state), "invalid_request", "state is required"),
        ("request" not in p and "request_uri" not in p, "request_not_supported",
         "request objects are not supported"),
        (p.get("code_challenge_method") == "S256", "invalid_request",
         "PKCE with code_challenge_method=S256 is required (plain is refused)"),
        (bool(_PKCE.match(p.get("code_challenge", ""))), "invalid_request",
         "code_challenge must be 43-128 characters of [A-Za-z0-9._~-]"),
    ]  # fmt: skip
    for ok, code, description in checks:
        if not ok:
            raise _Bound(req, AuthorizeError(code, description))
    prompt = p.get("prompt", "").split()
    if not set(prompt) <= _KNOWN_PROMPTS or ("none" in prompt and len(prompt) > 1):
        raise _Bound(req, AuthorizeError("invalid_request", "prompt is not valid"))
    max_age = None
    if "max_age" in p:
        if not p["max_age"].isdigit():
            raise _Bound(req, AuthorizeError("invalid_request", "max_age must be a number"))
        max_age = int(p["max_age"])
    try:
        scopes = client.narrow_scopes(p.get("scope"))
    except BrokerError as error:
        raise _Bound(req, AuthorizeError("invalid_scope", error.description)) from None
    return AuthorizationRequest(
        client_id=client.id, redirect_uri=redirect_uri, redirect_uri_given=given, state=state,
        scopes=scopes, code_challenge=p["code_challenge"], nonce=p.get("nonce"), prompt=prompt,
        max_age=max_age, login_hint=p.get("login_hint"), idp=p.get("idp"),
        dpop_jkt=p.get("dpop_jkt"), created_at=req.created_at,
    )  # fmt: skip


class _Bound(Exception):
    """An AuthorizeError together with the request it belongs to."""

    def __init__(self, req: AuthorizationRequest, error: AuthorizeError) -> None:
        self.req, self.error = req, error


async def authorize(request: web.Request) -> web.StreamResponse:
    """GET/POST /oauth/authorize."""
    svc = services(request)
    params = await _params(request)
    client, redirect_uri, given = await _client_and_redirect(svc, params)
    try:
        req = _validate(client, redirect_uri, given, params)
    except _Bound as bound:
        return _error_to_client(svc, bound.req, bound.error)
    request_id = secrets.token_urlsafe(24)
    await svc.cache.set(f"authz-req:{request_id}", json.dumps(asdict(req)), _REQUEST_TTL)
    return await _continue(request, svc, client, req, request_id)


async def resume(request: web.Request) -> web.StreamResponse:
    """GET /oauth/authorize/resume?req=…: back from the sign-in page."""
    svc = services(request)
    request_id = request.query.get("req", "")
    req = await _load_request(svc, request_id)
    client = await svc.oauth.clients.get(req.client_id)
    if client is None:
        raise InvalidRequest("The application is no longer registered.")
    return await _continue(request, svc, client, req, request_id)


async def _stored_request(svc: Services, request_id: str) -> AuthorizationRequest | None:
    raw = await svc.cache.get(f"authz-req:{request_id}") if request_id else None
    return AuthorizationRequest(**json.loads(raw)) if raw else None


async def _load_request(svc: Services, request_id: str) -> AuthorizationRequest:
    req = await _stored_request(svc, request_id)
    if req is None:
        raise InvalidRequest(
            "This sign-in request has expired. Go back to the application and start again."
        )
    return req


async def _continue(
    request: web.Request, svc: Services, client: Client, req: AuthorizationRequest, request_id: str
) -> web.StreamResponse:
    session = await current_session(request)
    principal = session.principal if session else None
    forced = "login" in req.prompt and (
        req.stale_session is None or (session is not None and session.id == req.stale_session)
    )
    needs_login = (
        principal is None
        or forced
        or (req.max_age is not None and time.time() - principal.auth_time > req.max_age)
    )
    if needs_login:
        if "none" in req.prompt:
            return _error_to_client(
                svc, req, AuthorizeError("login_required", "the user must sign in")
            )
        if "login" in req.prompt and req.stale_session is None:
            # Whatever session exists now does not count: only a new sign-in does.
            req = replace(req, stale_session=session.id if session else "-")
            await svc.cache.set(f"authz-req:{request_id}", json.dumps(asdict(req)), _REQUEST_TTL)
        query = {"next": f"/oauth/authorize/resume?req={request_id}"}
        if req.idp:
            query["idp"] = req.idp
        if req.login_hint:
            query["login_hint"] = req.login_hint
        return web.Response(status=302, headers={"Location": f"/login?{urlencode(query)}"})
    assert principal is not None and session is not None
    if not client.config.first_party and (
        "consent" in req.prompt or not await _has_consent(svc, principal.id, client.id, req.scopes)
    ):
        if "none" in req.prompt:
            return _error_to_client(
                svc, req, AuthorizeError("consent_required", "the user must approve this client")
            )
        return _consent_page(request, client, req, request_id, session.csrf)
    return await _issue_code(svc, req, principal)


async def consent(request: web.Request) -> web.StreamResponse:
    """POST /oauth/authorize/consent: the user's answer on the consent page."""
    svc = services(request)
    form = await read_form(request)
    session = await current_session(request)
    if session is None or form.get("csrf") != session.csrf:
        raise InvalidRequest(
            "This approval form has expired. Go back to the application and start again."
        )
    request_id = str(form.get("req", ""))
    req = await _load_request(svc, request_id)
    await svc.cache.delete(f"authz-req:{request_id}")
    principal = session.principal
    if form.get("decision") != "approve":
        await svc.audit.append(
            "consent.denied", outcome="denied", actor=principal.id, client=req.client_id
        )
        return _error_to_client(svc, req, AuthorizeError("access_denied", "the user declined"))
    async with svc.db.sessions() as db, db.begin():
        await db.merge(
            ConsentRecord(
                principal_id=principal.id, client_id=req.client_id, scopes=req.scopes,
                granted_at=datetime.now(UTC),
            )
        )  # fmt: skip
    await svc.audit.append(
        "consent.granted", outcome="success", actor=principal.id, client=req.client_id,
        scopes=req.scopes,
    )  # fmt: skip
    return await _issue_code(svc, req, principal)


async def _has_consent(svc: Services, principal_id: str, client_id: str, scopes: list[str]) -> bool:
    async with svc.db.sessions() as db:
        record = await db.get(ConsentRecord, (principal_id, client_id))
    return record is not None and set(scopes) <= set(record.scopes)


def _consent_page(
    request: web.Request, client: Client, req: AuthorizationRequest, request_id: str, csrf: str
) -> web.Response:
    name = client.config.name or client.id
    items = (
        "".join(f"<li><code>{esc(s)}</code></li>" for s in req.scopes)
        or "<li>nothing beyond sign-in</li>"
    )
    body = (
        f"<p><strong>{esc(name)}</strong> (<code>{esc(client.id)}</code>) asks to act for you "
        f"with:</p><ul>{items}</ul>"
        f'<p class="muted">It will be sent back to <code>{esc(req.redirect_uri)}</code>. You can '
        'withdraw this later on <a href="/consents">your approvals page</a>.</p>'
        '<form method="post" action="/oauth/authorize/consent">'
        f'<input type="hidden" name="req" value="{esc(request_id)}">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
        '<button type="submit" name="decision" value="approve">Allow</button> '
        '<button type="submit" name="decision" value="deny">Deny</button></form>'
    )
    return render(request, "Allow access?", body, form_action=origin_of(req.redirect_uri))


async def _pending(svc: Services, next_url: str) -> AuthorizationRequest | None:
    """The authorization request `next_url` resumes, if it does and it is still pending."""
    parts = urlsplit(next_url)
    if parts.path != "/oauth/authorize/resume":
        return None
    return await _stored_request(svc, dict(parse_qsl(parts.query)).get("req", ""))


async def pending_redirect_origin(svc: Services, next_url: str) -> str:
    """The client's redirect origin if `next_url` resumes an authorization request, else ""."""
    req = await _pending(svc, next_url)
    return origin_of(req.redirect_uri) if req else ""


async def pending_needs_fresh_login(svc: Services, next_url: str) -> bool:
    """Whether the authorization request `next_url` resumes wants the user to authenticate
    anew (`prompt=login`, or a `max_age` an IdP's own session might exceed): the upstream is
    then asked to re-authenticate too (SAML ForceAuthn, OIDC prompt=login) instead of
    letting its single sign-on session answer. Read server-side, so a user cannot drop it."""
    req = await _pending(svc, next_url)
    return req is not None and ("login" in req.prompt or req.max_age is not None)


async def _issue_code(
    svc: Services, req: AuthorizationRequest, principal: Principal
) -> web.Response:
    await remember_principal(svc, principal)
    code = secrets.token_urlsafe(32)
    record = {
        "client_id": req.client_id, "redirect_uri": req.redirect_uri,
        "redirect_uri_given": req.redirect_uri_given, "code_challenge": req.code_challenge,
        "scopes": req.scopes, "nonce": req.nonce, "principal_id": principal.id,
        "dpop_jkt": req.dpop_jkt,
    }  # fmt: skip
    await svc.cache.set(f"code:{token_hash(code)}", json.dumps(record), svc.settings.oauth.code_ttl)
    await svc.audit.append(
        "authorization.granted", outcome="success", actor=principal.id, client=req.client_id,
        scopes=req.scopes,
    )  # fmt: skip
    return _redirect(
        req.redirect_uri, {"code": code, "state": req.state, "iss": svc.settings.server.public_url}
    )


@grant(AUTHORIZATION_CODE)
async def authorization_code(ctx: GrantContext) -> Issued:
    """RFC 6749 §4.1.3 with PKCE (RFC 7636 §4.6); the code is consumed before any check."""
    svc, form = ctx.svc, ctx.form
    code = require(form, "code")
    digest = token_hash(code)
    raw = await svc.cache.pop(f"code:{digest}")
    if raw is None:
        await _replayed(svc, digest, ctx.client)
        raise InvalidGrant("the authorization code is not valid")
    record: dict[str, Any] = json.loads(raw)
    if record["client_id"] != ctx.client.id:
        raise InvalidGrant("the authorization code was issued to another client")
    if record["redirect_uri_given"] or "redirect_uri" in form:
        if form.get("redirect_uri") != record["redirect_uri"]:
            raise InvalidGrant("redirect_uri does not match the authorization request")
    verifier = require(form, "code_verifier")
    if not _PKCE.match(verifier):
        raise InvalidGrant("code_verifier is malformed")
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    if not secrets.compare_digest(challenge.decode(), record["code_challenge"]):
        raise InvalidGrant("code_verifier does not match the code_challenge")
    if record.get("dpop_jkt") and record["dpop_jkt"] != ctx.dpop_jkt:
        raise InvalidGrant("the code is bound to a DPoP key; prove possession of it")
    principal = await load_principal(svc, record["principal_id"])
    if principal is None:
        raise InvalidGrant("the user is no longer known")
    issued = await issue(
        svc,
        TokenRequest(
            grant_type=AUTHORIZATION_CODE, client=ctx.client, principal=principal,
            scopes=record["scopes"], audience=ctx.client.default_audience(),
            dpop_jkt=ctx.dpop_jkt, nonce=record.get("nonce"), refresh=True,
        ),
    )  # fmt: skip
    used = {"jti": issued.jti, "exp": issued.expires_at, "family": issued.refresh_family,
            "client_id": ctx.client.id}  # fmt: skip
    await svc.cache.set(f"code-used:{digest}", json.dumps(used), _USED_CODE_TTL)
    return issued


async def _replayed(svc: Services, digest: str, client: Client) -> None:
    """A code used twice: revoke everything issued from it (RFC 6749 §4.1.2)."""
    raw = await svc.cache.get(f"code-used:{digest}")
    if raw is None:
        return
    used = json.loads(raw)
    await revoke_access_token(svc, used["jti"], used["exp"])
    if used.get("family"):
        await svc.oauth.refresh.revoke_family(used["family"])
    await svc.audit.append(
        "code.replayed", outcome="denied", actor=client.id, client=used["client_id"],
        token_jti=used["jti"], refresh_family=used.get("family"),
    )  # fmt: skip


async def consents_page(request: web.Request) -> web.Response:
    """GET /consents: the clients the signed-in user approved, each revocable."""
    svc = services(request)
    session = await current_session(request)
    if session is None:
        raise web.HTTPFound("/login?next=/consents")
    async with svc.db.sessions() as db:
        rows = (
            (
                await db.execute(
                    select(ConsentRecord).where(ConsentRecord.principal_id == session.principal.id)
                )
            )
            .scalars()
            .all()
        )
    items = "".join(
        f"<li><code>{esc(r.client_id)}</code>: {esc(' '.join(r.scopes))} "
        '<form method="post" action="/consents/revoke" style="display:inline">'
        f'<input type="hidden" name="csrf" value="{esc(session.csrf)}">'
        f'<input type="hidden" name="client_id" value="{esc(r.client_id)}">'
        f'<button type="submit">Withdraw</button></form></li>'
        for r in rows
    )
    body = f"<ul>{items}</ul>" if items else "<p>You have not approved any application.</p>"
    return render(request, "Your approvals", body + '<p><a href="/">Back</a></p>')


async def revoke_consent(request: web.Request) -> web.StreamResponse:
    """POST /consents/revoke: forget the approval and revoke that client's refresh tokens."""
    svc = services(request)
    form = await read_form(request)
    session = await current_session(request)
    if session is None or form.get("csrf") != session.csrf:
        raise InvalidRequest("This form has expired; reload the page and try again.")
    client_id = str(form.get("client_id", ""))
    async with svc.db.sessions() as db, db.begin():
        await db.execute(
            delete(ConsentRecord).where(
                ConsentRecord.principal_id == session.principal.id,
                ConsentRecord.client_id == client_id,
            )
        )
    revoked = await svc.oauth.refresh.revoke_for(client_id, session.principal.id)
    await svc.audit.append(
        "consent.revoked", outcome="success", actor=session.principal.id, client=client_id,
        refresh_families_revoked=revoked,
    )  # fmt: skip
    return web.Response(status=303, headers={"Location": "/consents"})


def add_routes(app: web.Application) -> None:
    app.router.add_route("GET", "/oauth/authorize", authorize, name="oauth_authorize")
    app.router.add_route("POST", "/oauth/authorize", authorize, name="oauth_authorize_post")
    app.router.add_get("/oauth/authorize/resume", resume, name="oauth_authorize_resume")
    app.router.add_post("/oauth/authorize/consent", consent, name="oauth_consent")
    app.router.add_get("/consents", consents_page, name="consents")
    app.router.add_post("/consents/revoke", revoke_consent, name="consents_revoke")
