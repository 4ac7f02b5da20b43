"""Browser sign-in: the upstream chooser, the hand-off to an upstream and the callback.

Flow state is server-side and bound to the browser by a signed cookie; a flow completes at
most once. `next` is only ever a path on this broker, so sign-in is never an open redirect.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping

from aiohttp import web

from adapters.base import FormPost, LocalForm, LoginFlow, Principal, Redirect, Upstream
from broker.errors import AccessDenied, InvalidRequest, NotFound
from broker.pages import esc, render
from broker.services import Services
from broker.sessions import FLOW_COOKIE, FLOW_TTL, SESSION_COOKIE, Session
from broker.state import services
from policies.engine import Resource

_LOCAL_PATH = re.compile(r"^/(?![/\\])[^\s\\]*$")


def safe_next(value: str | None) -> str:
    """`value` if it is a path on this broker, else "/"."""
    return value if value and _LOCAL_PATH.fullmatch(value) else "/"


async def read_form(request: web.Request) -> Mapping[str, object]:
    """The POSTed form; a body that cannot be decoded is the client's error, not ours."""
    try:
        return await request.post()
    except (ValueError, LookupError) as error:  # UnicodeDecodeError is a ValueError
        raise InvalidRequest(
            "The form could not be read.", log_detail=type(error).__name__
        ) from None


def set_cookie(
    response: web.StreamResponse, svc: Services, name: str, value: str, ttl: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=ttl,
        path="/",
        httponly=True,
        secure=svc.settings.server.cookie_secure,
        samesite="Lax",
    )


async def current_session(request: web.Request) -> Session | None:
    return await services(request).sessions.load(request.cookies.get(SESSION_COOKIE))


async def chooser(request: web.Request) -> web.StreamResponse:
    """GET /login: begin with the hinted upstream, or list every configured one."""
    svc = services(request)
    next_url = safe_next(request.query.get("next"))
    hint = request.query.get("idp")
    if hint is not None:
        upstream = svc.upstreams.get(hint)
        if upstream is None:
            raise NotFound("No sign-in option has that name.")
        return await _begin(request, svc, upstream, next_url)
    if len(svc.upstreams) == 1:
        return await _begin(request, svc, next(iter(svc.upstreams.values())), next_url)
    items = "".join(
        f'<li><a href="/login?idp={esc(u.id)}&amp;next={esc(next_url)}">'
        f"{esc(u.display_name)}</a></li>"
        for u in svc.upstreams.values()
    )
    body = (
        f'<p>Choose how to sign in.</p><ul class="choices">{items}</ul>'
        if items
        else (
            "<p>No sign-in options are configured. Add an <code>[[upstreams]]</code> entry to the "
            "settings file.</p>"
        )
    )
    return render(request, "Sign in", body)


async def _begin(
    request: web.Request, svc: Services, upstream: Upstream, next_url: str
) -> web.StreamResponse:
    flow = LoginFlow(
        id=secrets.token_urlsafe(24),
        upstream=upstream.id,
        callback_url=f"{svc.settings.server.public_url}/login/{upstream.id}/callback",
        next_url=next_url,
        login_hint=request.query.get("login_hint"),
        idp_hint=request.query.get("idp"),
    )
    step = await upstream.begin(flow)
    cookie = await svc.sessions.start_flow(flow)
    response: web.StreamResponse
    if isinstance(step, Redirect):
        response = web.Response(status=302, headers={"Location": step.url})
    elif isinstance(step, FormPost):
        fields = "".join(
            f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">'
            for k, v in step.fields.items()
        )
        body = (
            f'<form method="post" action="{esc(step.url)}">{fields}'
            "<p>Your browser will continue automatically; if not, press Continue.</p>"
            '<button type="submit">Continue</button></form>'
        )
        response = render(request, "Continuing sign-in", body)
    else:
        response = render(request, f"Sign in: {upstream.display_name}", _local_form(flow, step))
    set_cookie(response, svc, FLOW_COOKIE, cookie, FLOW_TTL)
    return response


def _local_form(flow: LoginFlow, form: LocalForm) -> str:
    inputs = "".join(
        f'<label for="f-{esc(name)}">{esc(name.capitalize())}</label>'
        f'<input type="text" id="f-{esc(name)}" name="{esc(name)}" required autocomplete="off">'
        for name in form.fields
    )
    for name, options in form.choices.items():
        boxes = "".join(
            f'<div><input type="checkbox" id="c-{esc(name)}-{i}" name="{esc(name)}" '
            f'value="{esc(option)}"><label style="display:inline" for="c-{esc(name)}-{i}">'
            f"{esc(option)}</label></div>"
            for i, option in enumerate(options)
        )
        inputs += f"<fieldset><legend>{esc(name.capitalize())}</legend>{boxes}</fieldset>"
    return (
        f'<form method="post" action="/login/{esc(form.upstream)}/callback">'
        f'<input type="hidden" name="flow" value="{esc(flow.id)}">{inputs}'
        '<button type="submit">Sign in</button></form>'
    )


async def _params(request: web.Request) -> dict[str, str]:
    """Callback parameters: query and form; repeated fields joined with spaces."""
    merged: dict[str, list[str]] = {}
    form = await read_form(request) if request.method == "POST" else {}
    for source in (request.query, form):
        for key, value in source.items():
            if isinstance(value, str):
                merged.setdefault(key, []).append(value)
    return {key: " ".join(values) for key, values in merged.items()}


async def callback(request: web.Request) -> web.StreamResponse:
    """Finish a sign-in: the upstream turns its answer into a Principal, the policy decides."""
    svc = services(request)
    upstream = svc.upstreams.get(request.match_info["idp"])
    if upstream is None:
        raise NotFound("No sign-in option has that name.")
    params = await _params(request)
    flow_id = params.pop("flow", "")
    flow = await svc.sessions.peek_flow(flow_id, request.cookies.get(FLOW_COOKIE))
    if flow is None or flow.upstream != upstream.id:
        raise InvalidRequest(
            "This sign-in has expired or was started in another browser. Please start again."
        )
    principal = await upstream.complete(flow, params)
    if await svc.sessions.finish_flow(flow_id, request.cookies.get(FLOW_COOKIE)) is None:
        raise InvalidRequest("This sign-in was already completed. Please start again.")
    await authorize_sign_in(svc, principal)
    _session, cookie = await svc.sessions.create(principal)
    response = web.Response(status=303, headers={"Location": safe_next(flow.next_url)})
    set_cookie(response, svc, SESSION_COOKIE, cookie, svc.sessions.ttl)
    response.del_cookie(FLOW_COOKIE, path="/")
    return response


async def authorize_sign_in(svc: Services, principal: Principal) -> None:
    """Ask the policy whether this principal may sign in through its upstream; audit either way."""
    decision = svc.policy.decide(principal, "sign_in", Resource("Idp", principal.idp))
    fields: Mapping[str, object] = {
        "idp": principal.idp,
        "principal": principal.id,
        "policies": list(decision.reasons),
    }
    if not decision.allowed:
        svc.metrics.denials.labels(action="sign_in").inc()
        await svc.audit.append("sign_in", outcome="denied", actor=principal.id, **fields)
        raise AccessDenied("Your account may not sign in here.", reasons=decision.reasons)
    await svc.audit.append(
        "sign_in", outcome="success", actor=principal.id, auth_time=principal.auth_time, **fields
    )


async def logout(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    session = await current_session(request)
    if session is not None:
        form = await read_form(request)
        if form.get("csrf") != session.csrf:
            raise InvalidRequest("The sign-out form has expired; reload the page and try again.")
        await svc.sessions.end(session)
        await svc.audit.append("sign_out", outcome="success", actor=session.principal.id)
    response = web.Response(status=303, headers={"Location": "/"})
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/login", chooser, name="login")
    app.router.add_route("*", "/login/{idp}/callback", callback, name="login_callback")
    app.router.add_post("/logout", logout, name="logout")
