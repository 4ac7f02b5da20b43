"""LTI 1.3 tool endpoints: login initiation, launch, Deep Linking, the instructor's member list
and the tool JWKS.

A launch is a browser sign-in that starts at the course platform: `/lti/{platform}/login`
creates the same server-side flow (bound to the browser by the flow cookie) as `/login`, the
platform's form post to `/lti/{platform}/launch` is checked by the adapter, then the policy's
`sign_in` decision, a broker session, and the browser goes on to the launch target, one of the
configured launcher URLs (exact match; never an open redirect), with a short-lived launch ticket
(a JWT signed by the broker key ring) posted in a form, so it never shows in a URL.

The platform's post is cross-site, so the SameSite=Lax flow cookie does not come with it: as
for SAML (`broker.routes.login`), the post is parked for a minute and the browser is sent to
GET the launch URL, which brings the cookie. Every refusal is audited (`sign_in` rejected).
Launches inside an iframe are not supported: the broker's pages refuse framing and browsers
withhold cookies from third-party frames; platforms must open the tool in a new window.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from adapters.base import LoginFlow
from adapters.upstream.lti import STAFF_ROLES, LtiLaunch, LtiUpstream
from broker.errors import AccessDenied, BrokerError, InvalidRequest, NotFound
from broker.pages import esc, origin_of, render
from broker.routes.issuer import jwks
from broker.routes.login import (
    HANDOFF_TTL,
    audit_refused_sign_in,
    authorize_sign_in,
    current_session,
    read_form,
    set_cookie,
)
from broker.services import Services
from broker.sessions import FLOW_COOKIE, FLOW_TTL, SESSION_COOKIE, Session
from broker.state import services

TICKET_FIELD = "lti_ticket"
_DL_TTL = FLOW_TTL


def _upstream(svc: Services, request: web.Request) -> LtiUpstream:
    upstream = svc.upstreams.get(request.match_info["platform"])
    if not isinstance(upstream, LtiUpstream):
        raise NotFound("No course platform is registered under that name.")
    return upstream


async def _params(request: web.Request) -> dict[str, str]:
    """Query and form parameters; a repeated one keeps its first value."""
    params: dict[str, str] = {}
    form = await read_form(request) if request.method == "POST" else {}
    for source in (request.query, form):
        for key, value in source.items():
            if isinstance(value, str):
                params.setdefault(key, value)
    return params


async def _reject(svc: Services, upstream: LtiUpstream, error: BrokerError) -> None:
    await audit_refused_sign_in(svc, upstream.id, error)


async def login(request: web.Request) -> web.StreamResponse:
    """GET/POST /lti/{platform}/login: OIDC third-party-initiated login (LTI Core §5.1.1)."""
    svc = services(request)
    upstream = _upstream(svc, request)
    params = await _params(request)
    try:
        target = upstream.check_initiation(params)
        flow = LoginFlow(
            id=secrets.token_urlsafe(24),
            upstream=upstream.id,
            callback_url=upstream.launch_url,
            next_url=target,
            login_hint=params.get("login_hint"),
        )
        step = await upstream.initiate(flow, params)
    except BrokerError as error:
        await _reject(svc, upstream, error)
        raise
    cookie = await svc.sessions.start_flow(flow)
    response = web.Response(status=302, headers={"Location": step.url})
    set_cookie(response, svc, FLOW_COOKIE, cookie, FLOW_TTL)
    return response


async def _launch_params(
    request: web.Request, svc: Services, upstream: LtiUpstream
) -> dict[str, str] | web.StreamResponse:
    """The platform's form post, or the hand-off that brings the browser's cookies along."""
    if request.method == "POST" and FLOW_COOKIE not in request.cookies:
        params = await _params(request)
        if not await svc.sessions.flow_exists(params.get("state", "")):
            return params  # nothing to resume: the binding check refuses it, audited
        key = secrets.token_urlsafe(24)
        await svc.cache.set(f"handoff:{key}", json.dumps(params), HANDOFF_TTL)
        location = f"/lti/{upstream.id}/launch?handoff={key}"
        return web.Response(status=303, headers={"Location": location})
    if request.method == "GET":
        raw = await svc.cache.pop(f"handoff:{request.query.get('handoff', '')}")
        if raw is None:
            return {}  # an id_token only ever arrives by form post (response_mode=form_post)
        parked: dict[str, str] = json.loads(raw)
        return parked
    return await _params(request)


async def launch(request: web.Request) -> web.StreamResponse:
    """POST /lti/{platform}/launch (and the hand-off GET): check the launch, sign in, go on."""
    svc = services(request)
    upstream = _upstream(svc, request)
    params = await _launch_params(request, svc, upstream)
    if isinstance(params, web.StreamResponse):
        return params
    flow_id = params.get("state", "")
    flow = await svc.sessions.peek_flow(flow_id, request.cookies.get(FLOW_COOKIE))
    try:
        if flow is None or flow.upstream != upstream.id:
            raise InvalidRequest(
                "This launch has expired or was started in another browser. Please open the "
                "link in your course again.",
                log_detail="no LTI login of this browser matches the launch",
            )
        result = await upstream.launch(flow, params)
        if await svc.sessions.finish_flow(flow_id, request.cookies.get(FLOW_COOKIE)) is None:
            raise InvalidRequest(
                "This launch was already completed.",
                log_detail="the LTI flow was completed concurrently",
            )
    except BrokerError as error:
        await _reject(svc, upstream, error)
        raise
    await authorize_sign_in(svc, result.principal)
    session, cookie = await svc.sessions.create(result.principal)
    await _remember_launch(svc, upstream, result)
    await svc.audit.append(
        "lti.launch",
        outcome="success",
        actor=result.principal.id,
        idp=upstream.id,
        message_type=result.message_type,
        deployment_id=result.deployment_id,
        context=result.context_id,
        resource_link=result.resource_link_id,
        target=result.target_link_uri,
    )
    if result.deep_linking is not None:
        response = await _deep_link_picker(request, svc, upstream, session, result)
    else:
        response = await _to_target(request, svc, upstream, result)
    set_cookie(response, svc, SESSION_COOKIE, cookie, svc.sessions.ttl)
    response.del_cookie(FLOW_COOKIE, path="/")
    return response


def launch_key(upstream: str, context: str, user_id: str) -> str:
    """Cache key recording that `user_id` launched in `context` (hashed: ids are personal)."""
    digest = hashlib.sha256(f"{context}\x00{user_id}".encode()).hexdigest()[:40]
    return f"lti:{upstream}:launched:{digest}"


async def _remember_launch(svc: Services, upstream: LtiUpstream, result: LtiLaunch) -> None:
    """Who launched in which context, and the context's NRPS URL, for the instructor page."""
    if result.context_id is None:
        return
    ttl = upstream.launch_record_ttl
    await svc.cache.set(
        launch_key(upstream.id, result.context_id, result.principal.subject),
        str(int(time.time())),
        ttl,
    )
    if result.nrps_url is not None:
        await svc.cache.set(f"lti:{upstream.id}:nrps:{result.context_id}", result.nrps_url, ttl)


def _auto_post(
    request: web.Request, title: str, url: str, fields: Mapping[str, str]
) -> web.Response:
    inputs = "".join(
        f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">' for k, v in fields.items()
    )
    body = (
        f'<form method="post" action="{esc(url)}" id="continue">{inputs}'
        "<p>Your browser will continue automatically; if not, press Continue.</p>"
        '<button type="submit">Continue</button></form>'
    )
    return render(
        request,
        title,
        body,
        script="document.getElementById('continue').submit();",
        form_action=origin_of(url),
    )


async def _to_target(
    request: web.Request, svc: Services, upstream: LtiUpstream, result: LtiLaunch
) -> web.Response:
    """Post a launch ticket to the target: who launched and the launch's LTI facts, signed by
    the key ring for the target's origin, alive `ticket_ttl` seconds."""
    principal = result.principal
    lti: dict[str, Any] = {
        "platform": upstream.id,
        "deployment_id": result.deployment_id,
        "message_type": result.message_type,
        "roles": list(result.roles),
        "custom": dict(result.custom),
    }
    if result.context_id is not None:
        lti["context"] = {"id": result.context_id, "title": result.context_title}
    if result.resource_link_id is not None:
        lti["resource_link"] = {"id": result.resource_link_id, "title": result.resource_link_title}
    claims: dict[str, Any] = {
        "sub": principal.id,
        "idp": principal.idp,
        "name": principal.display_name,
        "groups": list(principal.groups),
        "target_link_uri": result.target_link_uri,
        "lti": lti,
    }
    if principal.email:
        claims["email"] = principal.email
    ticket = await svc.signer.sign(
        claims, audience=origin_of(result.target_link_uri), ttl=upstream.ticket_ttl
    )
    return _auto_post(
        request, "Opening your notebook", result.target_link_uri, {TICKET_FIELD: ticket}
    )


async def _deep_link_picker(
    request: web.Request,
    svc: Services,
    upstream: LtiUpstream,
    session: Session,
    result: LtiLaunch,
) -> web.Response:
    """The instructor picks which notebook link to place in the course."""
    settings = result.deep_linking
    assert settings is not None
    if settings.accept_types and "ltiResourceLink" not in settings.accept_types:
        raise InvalidRequest("The course platform does not accept launch links here.")
    key = secrets.token_urlsafe(24)
    record = {
        "upstream": upstream.id,
        "session": hashlib.sha256(session.id.encode()).hexdigest(),
        "deployment_id": result.deployment_id,
        "return_url": settings.return_url,
        "data": settings.data,
        "context": result.context_id,
    }
    await svc.cache.set(f"lti-dl:{key}", json.dumps(record), _DL_TTL)
    choices = "".join(
        f'<div><input type="radio" name="target" id="t-{i}" value="{esc(url)}"'
        f'{" checked" if i == 0 else ""}><label style="display:inline" for="t-{i}">'
        f"{esc(title)}</label></div>"
        for i, (url, title) in enumerate(upstream.targets.items())
    )
    where = f" in {esc(result.context_title)}" if result.context_title else ""
    body = (
        f"<p>Choose the notebook link to place{where}.</p>"
        f'<form method="post" action="/lti/{esc(upstream.id)}/deep-link">'
        f'<input type="hidden" name="request" value="{esc(key)}">'
        f'<input type="hidden" name="csrf" value="{esc(session.csrf)}">'
        f"<fieldset><legend>Notebooks</legend>{choices}</fieldset>"
        '<button type="submit">Place link</button></form>'
    )
    return render(
        request, "Place a notebook link", body, form_action=origin_of(settings.return_url)
    )


async def deep_link(request: web.Request) -> web.StreamResponse:
    """POST /lti/{platform}/deep-link: sign the LtiDeepLinkingResponse and post it back."""
    svc = services(request)
    upstream = _upstream(svc, request)
    session = await current_session(request)
    form = await read_form(request)
    if session is None or form.get("csrf") != session.csrf:
        raise InvalidRequest("This page has expired. Please start again from your course.")
    raw = await svc.cache.pop(f"lti-dl:{form.get('request', '')}")
    record: dict[str, Any] = json.loads(raw) if raw else {}
    if (
        record.get("upstream") != upstream.id
        or record.get("session") != hashlib.sha256(session.id.encode()).hexdigest()
    ):
        raise InvalidRequest("This page has expired. Please start again from your course.")
    target = form.get("target")
    claims = upstream.deep_link_claims(
        deployment_id=record["deployment_id"],
        data=record["data"],
        target=target if isinstance(target, str) else "",
    )
    token = await svc.tokens.sign_jws(svc.keyring.signer(), "JWT", claims)
    await svc.audit.append(
        "lti.deep_link",
        outcome="success",
        actor=session.principal.id,
        idp=upstream.id,
        context=record.get("context"),
        target=target,
    )
    return _auto_post(request, "Placing the link", record["return_url"], {"JWT": token})


def _is_staff(session: Session, upstream: LtiUpstream, context: str) -> bool:
    groups = set(session.principal.groups)
    return session.principal.idp == upstream.id and any(
        f"lti:{upstream.id}:{context}#{role}" in groups for role in STAFF_ROLES
    )


async def members(request: web.Request) -> web.StreamResponse:
    """GET /lti/{platform}/members?context=…: the course's members (NRPS) and who launched;
    for the context's instructors, teaching assistants and administrators only."""
    svc = services(request)
    upstream = _upstream(svc, request)
    context = request.query.get("context", "")
    session = await current_session(request)
    if session is None or not context or not _is_staff(session, upstream, context):
        raise AccessDenied("Open the tool from your course as its instructor to see this page.")
    url = await svc.cache.get(f"lti:{upstream.id}:nrps:{context}")
    if url is None:
        raise NotFound("The course platform has not offered this course's member list.")
    found = await upstream.members(url)
    rows: list[dict[str, Any]] = []
    for member in found:
        at = await svc.cache.get(launch_key(upstream.id, context, member.user_id))
        rows.append(
            {
                "user_id": member.user_id,
                "name": member.name,
                "email": member.email,
                "roles": list(member.roles),
                "status": member.status,
                "launched": at is not None,
                "last_launch": int(at) if at is not None else None,
            }
        )
    await svc.audit.append(
        "lti.members", outcome="success", actor=session.principal.id, idp=upstream.id,
        context=context, count=len(rows),
    )  # fmt: skip
    if "text/html" not in request.headers.get("Accept", ""):
        body = {
            "context": context,
            "launched": sum(1 for r in rows if r["launched"]),
            "members": rows,
        }
        return web.json_response(body, headers={"Cache-Control": "no-store"})
    launched = [r for r in rows if r["launched"]]
    items = "".join(
        f"<tr><td>{esc(r['name'] or r['user_id'])}</td><td>{esc(', '.join(r['roles']))}</td>"
        f"<td>{esc(time.strftime('%Y-%m-%d %H:%M', time.gmtime(r['last_launch'])))} UTC</td></tr>"
        for r in launched
    )
    body_html = (
        f"<p>{len(launched)} of {len(rows)} course members have launched a notebook.</p>"
        '<table><thead><tr><th scope="col">Name</th><th scope="col">Roles</th>'
        f'<th scope="col">Last launch</th></tr></thead><tbody>{items}</tbody></table>'
    )
    return render(request, "Who launched", body_html)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/lti/jwks", jwks, name="lti_jwks")
    app.router.add_route("GET", "/lti/{platform}/login", login, name="lti_login")
    app.router.add_post("/lti/{platform}/login", login, name="lti_login_post")
    app.router.add_route("GET", "/lti/{platform}/launch", launch, name="lti_launch")
    app.router.add_post("/lti/{platform}/launch", launch, name="lti_launch_post")
    app.router.add_post("/lti/{platform}/deep-link", deep_link, name="lti_deep_link")
    app.router.add_get("/lti/{platform}/members", members, name="lti_members")
