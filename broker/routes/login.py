"""Browser sign-in: the upstream chooser, the hand-off to an upstream and the callback.

Flow state is server-side and bound to the browser by a signed cookie; a flow completes at
most once. `next` is only ever a path on this broker, so sign-in is never an open redirect.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode

from aiohttp import web

from adapters.base import (
    Federated,
    FormPost,
    LocalForm,
    LoginFlow,
    PlatformInitiated,
    Principal,
    Redirect,
    ServesMetadata,
    SignInAgain,
    Upstream,
)
from broker.errors import AccessDenied, BrokerError, InvalidRequest, NotFound
from broker.pages import esc, origin_of, render
from broker.services import Services
from broker.sessions import FLOW_COOKIE, FLOW_TTL, SESSION_COOKIE, Session
from broker.state import services
from policies.engine import Resource

_LOCAL_PATH = re.compile(r"^/(?![/\\])[^\s\\]*$")
LAST_IDP_COOKIE = "broker_last_idp"
LAST_IDP_TTL = 180 * 86400
HANDOFF_TTL = 60
MAX_RESULTS = 50


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
    """GET /login: begin with the hinted upstream (and IdP), or show the chooser.

    `idp` names an upstream, or an IdP entity id behind a federated upstream (as a launcher
    passes it through /oauth/authorize); `entity` picks the IdP within a federation; `q`
    searches the federations' IdPs (the page works without JavaScript).
    """
    svc = services(request)
    next_url = safe_next(request.query.get("next"))
    hint = request.query.get("idp")
    entity = request.query.get("entity") or None
    only: Upstream | None = None
    if hint is not None:
        upstream = svc.upstreams.get(hint)
        if upstream is None:
            found = await _federated_entity(svc, hint)
            if found is None:
                raise NotFound("No sign-in option has that name.")
            upstream, entity = found
        if not isinstance(upstream, Federated):
            return await _begin(request, svc, upstream, next_url, entity)
        if entity is not None:
            if await upstream.idp(entity) is None:
                raise NotFound("That institution is not in this federation.")
            return await _begin(request, svc, upstream, next_url, entity)
        only = upstream
    choices = [only] if only else offered_upstreams(svc)
    if len(choices) == 1:
        single = await _single_choice(choices[0])
        if single is not None:
            return await _begin(request, svc, choices[0], next_url, single)
    body = await _chooser_body(request, svc, choices, next_url)
    return render(request, "Sign in", body, script=_TYPE_AHEAD if "data-idps" in body else "")


def offered_upstreams(svc: Services) -> list[Upstream]:
    """The upstreams a browser may pick (not those whose sign-ins start at a platform)."""
    return [u for u in svc.upstreams.values() if not isinstance(u, PlatformInitiated)]


async def _single_choice(upstream: Upstream) -> str | None:
    """The entity to begin with if this upstream offers exactly one way in, else None.
    A plain upstream offers one ("" as entity); a federation offers one if it lists one IdP."""
    if not isinstance(upstream, Federated):
        return ""
    idps = upstream.find_idps("", 2)
    return idps[0].entity_id if len(idps) == 1 else None


async def _federated_entity(svc: Services, entity_id: str) -> tuple[Upstream, str] | None:
    for upstream in svc.upstreams.values():
        if isinstance(upstream, Federated) and await upstream.idp(entity_id) is not None:
            return upstream, entity_id
    return None


def _login_href(upstream: str, next_url: str, entity: str | None = None) -> str:
    query = {"idp": upstream, "next": next_url} | ({"entity": entity} if entity else {})
    return f"/login?{urlencode(query)}"


async def _last_choice(
    request: web.Request, svc: Services, next_url: str
) -> tuple[str, str] | None:
    """(link, name) of the browser's previous choice, if it still exists."""
    saved = dict(parse_qsl(request.cookies.get(LAST_IDP_COOKIE, "")))
    upstream = svc.upstreams.get(saved.get("idp", ""))
    if upstream is None:
        return None
    entity = saved.get("entity") or None
    if isinstance(upstream, Federated):
        choice = await upstream.idp(entity) if entity else None
        if choice is None:
            return None
        return _login_href(upstream.id, next_url, entity), choice.display_name
    return _login_href(upstream.id, next_url), upstream.display_name


async def _chooser_body(
    request: web.Request, svc: Services, choices: list[Upstream], next_url: str
) -> str:
    if not choices:
        return (
            "<p>No sign-in options are configured. Add an <code>[[upstreams]]</code> entry to the "
            "settings file.</p>"
        )
    parts = ["<p>Choose how to sign in.</p>"]
    last = await _last_choice(request, svc, next_url)
    if last is not None:
        parts.append(f'<p>Last time you used <a href="{esc(last[0])}">{esc(last[1])}</a>.</p>')
    links: list[tuple[str, str]] = []
    federations: list[Upstream] = []
    for upstream in choices:
        single = await _single_choice(upstream)
        if single is None:
            federations.append(upstream)
        else:
            links.append((_login_href(upstream.id, next_url, single), upstream.display_name))
    if links:
        items = "".join(f'<li><a href="{esc(href)}">{esc(name)}</a></li>' for href, name in links)
        parts.append(f'<ul class="choices">{items}</ul>')
    query = request.query.get("q", "").strip()[:100]
    parts.extend(_federation_section(upstream, query, next_url) for upstream in federations)
    return "".join(parts)


def _federation_section(upstream: Upstream, query: str, next_url: str) -> str:
    assert isinstance(upstream, Federated)
    found = upstream.find_idps(query, MAX_RESULTS + 1)
    more = len(found) > MAX_RESULTS
    items = "".join(
        f'<li><a href="{esc(_login_href(upstream.id, next_url, idp.entity_id))}">'
        f"{esc(idp.display_name)}</a></li>"
        for idp in found[:MAX_RESULTS]
    )
    if query and not found:
        status = f"No institution matches “{esc(query)}”."
    elif more:
        status = "Type more of your institution's name to narrow the list."
    else:
        status = ""
    uid = esc(upstream.id)
    return (
        f"<section><h2>{esc(upstream.display_name)}</h2>"
        f'<form method="get" action="/login" role="search">'
        f'<input type="hidden" name="idp" value="{uid}">'
        f'<input type="hidden" name="next" value="{esc(next_url)}">'
        f'<label for="q-{uid}">Find your institution</label>'
        f'<input type="search" id="q-{uid}" name="q" value="{esc(query)}" autocomplete="off" '
        f'data-idps="{uid}" aria-controls="r-{uid}" aria-describedby="s-{uid}">'
        f'<button type="submit">Search</button></form>'
        f'<p id="s-{uid}" class="muted" aria-live="polite">{status}</p>'
        f'<ul id="r-{uid}" class="choices">{items}</ul></section>'
    )


# Type-ahead for the federation search; without JavaScript the form's Search button does
# the same on the server. Results are built with textContent, never as HTML.
_TYPE_AHEAD = """
document.querySelectorAll('input[data-idps]').forEach(function (box) {
  var list = document.getElementById(box.getAttribute('aria-controls'));
  var status = document.getElementById(box.getAttribute('aria-describedby'));
  var next = box.form.elements['next'].value, timer = null, seq = 0;
  box.addEventListener('input', function () {
    clearTimeout(timer);
    timer = setTimeout(function () {
      var mine = ++seq;
      var url = '/login/idps?' + new URLSearchParams({idp: box.dataset.idps, q: box.value,
                                                      next: next});
      fetch(url, {headers: {Accept: 'application/json'}}).then(function (r) {
        return r.json();
      }).then(function (data) {
        if (mine !== seq) return;
        list.replaceChildren();
        data.idps.forEach(function (idp) {
          var li = document.createElement('li'), a = document.createElement('a');
          a.href = idp.href; a.textContent = idp.display_name;
          li.appendChild(a); list.appendChild(li);
        });
        status.textContent = data.idps.length ? (data.more ? 'Type more to narrow the list.' : '')
                                              : 'No institution matches.';
      });
    }, 150);
  });
});
"""


async def idp_search(request: web.Request) -> web.StreamResponse:
    """GET /login/idps?idp=…&q=…: the chooser's type-ahead (IdP names are public)."""
    svc = services(request)
    upstream = svc.upstreams.get(request.query.get("idp", ""))
    if not isinstance(upstream, Federated):
        raise NotFound("No federation has that name.")
    next_url = safe_next(request.query.get("next"))
    found = upstream.find_idps(request.query.get("q", "").strip()[:100], MAX_RESULTS + 1)
    body = {
        "idps": [
            {
                "entity_id": idp.entity_id,
                "display_name": idp.display_name,
                "href": _login_href(upstream.id, next_url, idp.entity_id),
            }
            for idp in found[:MAX_RESULTS]
        ],
        "more": len(found) > MAX_RESULTS,
    }
    return web.json_response(body, headers={"Cache-Control": "no-store"})


async def upstream_metadata(request: web.Request) -> web.StreamResponse:
    """GET /login/{idp}/metadata: what the upstream publishes (SAML SP metadata, ...)."""
    upstream = services(request).upstreams.get(request.match_info["idp"])
    if not isinstance(upstream, ServesMetadata):
        raise NotFound("This sign-in option publishes no metadata.")
    document = upstream.metadata()
    return web.Response(
        body=document.body,
        headers={"Content-Type": document.content_type, "Cache-Control": "max-age=3600"},
    )


async def _begin(
    request: web.Request,
    svc: Services,
    upstream: Upstream,
    next_url: str,
    entity: str | None = None,
) -> web.StreamResponse:
    # Imported here: broker.oauth.authorize imports this module.
    from broker.oauth.authorize import pending_needs_fresh_login, pending_redirect_origin

    flow = LoginFlow(
        id=secrets.token_urlsafe(24),
        upstream=upstream.id,
        callback_url=f"{svc.settings.server.public_url}/login/{upstream.id}/callback",
        next_url=next_url,
        login_hint=request.query.get("login_hint"),
        idp_hint=entity or None,
        force_authn=await pending_needs_fresh_login(svc, next_url),
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
            f'<form method="post" action="{esc(step.url)}" id="continue">{fields}'
            "<p>Your browser will continue automatically; if not, press Continue.</p>"
            '<button type="submit">Continue</button></form>'
        )
        response = render(
            request,
            "Continuing sign-in",
            body,
            script="document.getElementById('continue').submit();",
            form_action=origin_of(step.url),
        )
    else:
        response = render(
            request,
            f"Sign in: {upstream.display_name}",
            _local_form(flow, step),
            form_action=await pending_redirect_origin(svc, next_url),
        )
    set_cookie(response, svc, FLOW_COOKIE, cookie, FLOW_TTL)
    last = urlencode({"idp": upstream.id, "entity": entity or ""})
    set_cookie(response, svc, LAST_IDP_COOKIE, last, LAST_IDP_TTL)
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


def _flow_id(params: Mapping[str, str]) -> str:
    """The flow a callback answers: `flow` (the broker's own forms), else the OIDC `state` or
    the SAML `RelayState`, which adapters set to the flow id."""
    return params.get("flow") or next(
        (params[k] for k in ("state", "RelayState") if params.get(k)), ""
    )


async def _callback_params(
    request: web.Request, svc: Services, upstream: Upstream
) -> dict[str, str] | web.StreamResponse:
    """The upstream's answer, or a redirect that brings the browser's cookies along.

    An IdP's cross-site form POST (SAML ACS, LTI) arrives without the SameSite=Lax flow
    cookie, so the answer is parked for a minute and the browser is sent to GET this URL,
    which carries the cookie; the flow binding is then checked as for any other callback.
    """
    if request.method == "POST" and FLOW_COOKIE not in request.cookies:
        params = await _params(request)
        if not await svc.sessions.flow_exists(_flow_id(params)):
            return params  # nothing to resume: the binding check refuses it, and it is audited
        key = secrets.token_urlsafe(24)
        await svc.cache.set(f"handoff:{key}", json.dumps(params), HANDOFF_TTL)
        location = f"/login/{upstream.id}/callback?{urlencode({'handoff': key})}"
        return web.Response(status=303, headers={"Location": location})
    if request.method == "GET" and "handoff" in request.query:
        raw = await svc.cache.pop(f"handoff:{request.query['handoff']}")
        if raw is None:
            raise InvalidRequest("This sign-in has expired. Please start again.")
        parked: dict[str, str] = json.loads(raw)
        return parked
    return await _params(request)


async def callback(request: web.Request) -> web.StreamResponse:
    """Finish a sign-in: the upstream turns its answer into a Principal, the policy decides.

    Every refusal, whether of the flow binding or by the upstream's checks, is audited.
    """
    svc = services(request)
    upstream = svc.upstreams.get(request.match_info["idp"])
    if upstream is None:
        raise NotFound("No sign-in option has that name.")
    params = await _callback_params(request, svc, upstream)
    if isinstance(params, web.StreamResponse):
        return params
    flow_id = _flow_id(params)
    params.pop("flow", None)
    flow = await svc.sessions.peek_flow(flow_id, request.cookies.get(FLOW_COOKIE))
    try:
        if flow is None or flow.upstream != upstream.id:
            raise InvalidRequest(
                "This sign-in has expired or was started in another browser. Please start again.",
                log_detail="no sign-in flow of this browser matches the callback",
            )
        try:
            principal = await upstream.complete(flow, params)
        except SignInAgain as again:
            # Not a failure: the upstream asks for a stronger or different sign-in, and this
            # same flow continues when the browser comes back.
            await svc.audit.append(
                "sign_in", outcome="step_up", idp=upstream.id, reason=again.reason[:500]
            )
            return web.Response(
                status=303, headers={"Location": again.url, "Cache-Control": "no-store"}
            )
        if await svc.sessions.finish_flow(flow_id, request.cookies.get(FLOW_COOKIE)) is None:
            raise InvalidRequest(
                "This sign-in was already completed. Please start again.",
                log_detail="the sign-in flow was completed concurrently",
            )
    except BrokerError as error:
        await audit_refused_sign_in(svc, upstream.id, error)
        raise
    await authorize_sign_in(svc, principal)
    _session, cookie = await svc.sessions.create(principal)
    response = web.Response(status=303, headers={"Location": safe_next(flow.next_url)})
    set_cookie(response, svc, SESSION_COOKIE, cookie, svc.sessions.ttl)
    response.del_cookie(FLOW_COOKIE, path="/")
    return response


async def audit_refused_sign_in(svc: Services, idp: str, error: BrokerError) -> None:
    """The audit record of a sign-in an upstream's answer failed (never a secret)."""
    await svc.audit.append(
        "sign_in", outcome="rejected", idp=idp, error=error.error,
        reason=error.log_detail[:500] or error.description[:500],
    )  # fmt: skip


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
    app.router.add_get("/login/idps", idp_search, name="login_idps")
    app.router.add_get("/login/{idp}/metadata", upstream_metadata, name="login_metadata")
    app.router.add_route("*", "/login/{idp}/callback", callback, name="login_callback")
    app.router.add_post("/logout", logout, name="logout")
