"""Reviewer grants over HTTP: the `/v1/grants` API, the reviewer's redemption page
(`/review?k=…`) and the owner's page (`/grants`).

API callers present a broker access token (Bearer or DPoP) addressed to this broker with the
scope `grants`; the pages use the browser session and a CSRF token in every form (the
session's, or for a reviewer who is not signed in a double-submit cookie that is SameSite
Strict). The reviewer's token is shown once and never logged.
"""

from __future__ import annotations

import hmac
import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from adapters.base import Principal
from broker import grants
from broker.errors import AccessDenied, InvalidRequest, NotFound
from broker.grants import GrantRequest
from broker.oauth import bearer
from broker.oauth.forms import parse_model, read_json_object
from broker.oauth.issuance import load_principal
from broker.oauth.userinfo import InsufficientScope
from broker.pages import esc, render
from broker.routes.login import current_session, offered_upstreams, read_form
from broker.services import Services
from broker.state import services
from broker.storage import GrantRecord

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
REVIEW_CSRF_COOKIE = "broker_review_csrf"
REVIEW_CSRF_TTL = 3600


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=json.dumps, headers=_NO_STORE)


async def _caller(svc: Services, request: web.Request) -> Principal:
    """The user a broker token with the scope `grants` stands for."""
    claims = await bearer.access_token_claims(svc, request, audience=svc.settings.server.public_url)
    if grants.GRANTS_SCOPE not in str(claims.get("scope", "")).split():
        error = InsufficientScope(f"the token does not carry the scope {grants.GRANTS_SCOPE}")
        error.headers["WWW-Authenticate"] = (
            f'Bearer realm="binder-broker", error="insufficient_scope", '
            f'scope="{grants.GRANTS_SCOPE}"'
        )
        raise error
    if "grant" in claims:
        raise AccessDenied("a reviewer's token cannot manage grants")
    principal = await load_principal(svc, str(claims["sub"]))
    if principal is None:
        raise AccessDenied("grants are managed by a signed-in user, not a client")
    return principal


async def _created_body(
    svc: Services, created: grants.Created, principal: Principal
) -> dict[str, Any]:
    identities = await grants.may(svc, principal, created.record.repo, "see_reviewers")
    view = grants.grant_view(created.record, [], identities=identities, reveal_reviewer=True)
    return view | {
        "url": grants.capability_url(svc, created.secret),
        "clone_url": grants.clone_url(svc, created.record.repo),
        "launch_url": grants.launch_url(svc, created.record),
    }


async def api_create(request: web.Request) -> web.Response:
    """POST /v1/grants: a grant and its capability URL (shown once)."""
    svc = services(request)
    principal = await _caller(svc, request)
    body = parse_model(GrantRequest, await read_json_object(request, "the grant"))
    created = await grants.create_grant(svc, principal, body)
    return _json(await _created_body(svc, created, principal), status=201)


async def api_list(request: web.Request) -> web.Response:
    """GET /v1/grants[?repo=backend/owner/name]."""
    svc = services(request)
    principal = await _caller(svc, request)
    repo = request.query.get("repo") or None
    return _json({"grants": await grants.list_grants(svc, principal, repo)})


async def api_revoke(request: web.Request) -> web.Response:
    """DELETE /v1/grants/{grant_id}: revoke it and the tokens it yielded."""
    svc = services(request)
    principal = await _caller(svc, request)
    return _json(await grants.revoke_grant(svc, principal, request.match_info["grant_id"]))


async def api_receipt(request: web.Request) -> web.Response:
    """GET /v1/grants/{grant_id}/receipt: the editor's signed access receipt."""
    svc = services(request)
    principal = await _caller(svc, request)
    return _json(await grants.receipt(svc, principal, request.match_info["grant_id"]))


# --- the reviewer's page -------------------------------------------------------------------


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _facts(record: GrantRecord) -> str:
    rows = [("Repository", f"<code>{esc(record.repo)}</code>")]
    if record.commit:
        rows.append(("Commit", f"<code>{esc(record.commit)}</code>"))
    if record.ref:
        rows.append(("Branch or tag", f"<code>{esc(record.ref)}</code>"))
    rows += [
        ("Access", "read only"),
        ("Link valid until", esc(_when(record.expires_at))),
        ("Uses left", f"{max(record.max_uses - record.uses, 0)} of {record.max_uses}"),
        ("Who may use it", esc(grants.reviewer_description(record))),
    ]
    if record.note:
        rows.append(("Note", esc(record.note)))
    return "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _review_path(secret: str) -> str:
    return f"/review?{urlencode({'k': secret})}"


def _sign_in_links(svc: Services, secret: str, heading: str) -> str:
    next_url = _review_path(secret)
    items = "".join(
        f'<li><a href="{esc("/login?" + urlencode({"idp": u.id, "next": next_url}))}">'
        f"{esc(u.display_name)}</a></li>"
        for u in offered_upstreams(svc)
    )
    if not items:
        return ""
    return f'<h2>{esc(heading)}</h2><ul class="choices">{items}</ul>'


def _redeem_form(secret: str, csrf: str, mode: str, label: str) -> str:
    return (
        '<form method="post" action="/review">'
        f'<input type="hidden" name="k" value="{esc(secret)}">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
        f'<input type="hidden" name="mode" value="{esc(mode)}">'
        f'<button type="submit">{esc(label)}</button></form>'
    )


async def review_page(request: web.Request) -> web.StreamResponse:
    """GET /review?k=…: what the link gives, and how to take it."""
    svc = services(request)
    session = await current_session(request)
    actor = session.principal.id if session else None
    secret = request.query.get("k", "")
    record = await grants.find_by_secret(svc, secret, actor=actor)
    await grants.check_available(svc, record, actor=actor)
    body = "<p>You have been given read access to a repository for review.</p>" + _facts(record)
    anonymous = record.reviewer_kind == "anonymous"
    csrf = session.csrf if session else secrets.token_urlsafe(24)
    if session is not None:
        who = session.principal.display_name or session.principal.subject
        if grants.reviewer_matches(record, session.principal):
            body += f"<p>You are signed in as <strong>{esc(who)}</strong>.</p>"
            body += _redeem_form(secret, csrf, "signed-in", f"Get access as {who}")
            if anonymous:
                body += _redeem_form(
                    secret, csrf, "anonymous", "Get access without saying who I am"
                )
        else:
            body += (
                f"<p>You are signed in as <strong>{esc(who)}</strong>, but this link is for "
                "another reviewer.</p>"
            )
            body += _sign_in_links(svc, secret, "Sign in with another account")
    else:
        body += _sign_in_links(svc, secret, "Sign in with")
        if anonymous:
            body += (
                "<h2>Or stay anonymous</h2><p>Nobody, not even the editor, learns who you "
                "are.</p>" + _redeem_form(secret, csrf, "anonymous", "Continue without signing in")
            )
    response = render(request, "Review access", body)
    if session is None:
        response.set_cookie(
            REVIEW_CSRF_COOKIE, csrf, max_age=REVIEW_CSRF_TTL, path="/review", httponly=True,
            secure=svc.settings.server.cookie_secure, samesite="Strict",
        )  # fmt: skip
    return response


async def review_redeem(request: web.Request) -> web.StreamResponse:
    """POST /review: redeem the link (CSRF-checked); shows the token once."""
    svc = services(request)
    form = await read_form(request)
    session = await current_session(request)
    principal = session.principal if session else None
    actor = principal.id if principal else None
    record = await grants.find_by_secret(svc, str(form.get("k", "")), actor=actor)
    expected = session.csrf if session else request.cookies.get(REVIEW_CSRF_COOKIE, "")
    sent = str(form.get("csrf", ""))
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        await grants.audit_refusal(svc, record, actor, "csrf check failed")
        raise InvalidRequest("This form has expired; open the review link again.")
    await grants.check_available(svc, record, actor=actor)
    if form.get("mode") == "anonymous":
        principal = None
    elif principal is None:
        raise await grants.refuse(
            svc, record, None, "sign-in required", "Sign in to use this review link."
        )
    redeemed = await grants.redeem(svc, record, principal)
    response = render(request, "Your review access", _token_body(svc, redeemed))
    response.del_cookie(REVIEW_CSRF_COOKIE, path="/review")
    return response


def _token_body(svc: Services, redeemed: grants.Redeemed) -> str:
    record = redeemed.grant
    url = grants.clone_url(svc, record.repo)
    name = record.repo.rsplit("/", 1)[1]
    clone = (
        "read -rs REVIEW_TOKEN   # paste the token, then press Enter\n"
        f'git -c http.extraHeader="Authorization: Bearer $REVIEW_TOKEN" clone {url}'
    )
    if record.ref and not record.commit:  # a pinned clone checks out the commit itself
        clone += f"\ngit -C {name} checkout {record.ref}"
    pin = f" at commit <code>{esc(record.commit)}</code>" if record.commit else ""
    body = (
        f"<p>You can read <code>{esc(record.repo)}</code>{pin} until "
        f"{esc(_when(redeemed.expires_at))}. The author sees you as "
        f"<strong>{esc(redeemed.pseudonym)}</strong>.</p>"
        "<p>This token is shown only once: copy it now. Anyone holding it can read the "
        "repository until it expires.</p>"
        f'<label for="token">Your access token</label><pre id="token">{esc(redeemed.token)}</pre>'
        "<h2>Clone it</h2><p>Through the broker's gateway (the token is the only credential "
        "you need, and git does not store it):</p>"
        f'<pre id="clone">{esc(clone)}</pre>'
    )
    launch = grants.launch_url(svc, record)
    if launch is not None:
        body += (
            "<h2>Run it</h2>"
            f'<p><a id="launch" href="{esc(launch)}">Open it in the notebook launcher</a> '
            "(it asks for the token).</p>"
        )
    if record.expires_at > redeemed.expires_at + timedelta(minutes=1):
        body += (
            '<p class="muted">The token ends before the link does; if the link has uses '
            "left, open it again for a new token.</p>"
        )
    return body


# --- the owner's page ------------------------------------------------------------------------


def _grant_item(view: dict[str, Any], csrf: str) -> str:
    pin = view["commit"] or view["ref"] or "any commit"
    reviewer = view["reviewer"]
    target = reviewer.get(reviewer["kind"], "")
    people = "".join(
        f"<li>{esc(r['pseudonym'])}"
        + (f" ({esc(r['display'] or r['principal_id'])})" if "principal_id" in r else "")
        + f", {esc(r['redeemed_at'])}{'' if r['signed_in'] else ', not signed in'}</li>"
        for r in view["redemptions"]
    )
    revoke = ""
    if view["status"] != "revoked":
        revoke = (
            '<form method="post" action="/grants/revoke">'
            f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
            f'<input type="hidden" name="grant_id" value="{esc(view["id"])}">'
            f'<button type="submit">Revoke {esc(view["id"])}</button></form>'
        )
    return (
        f"<li><h3><code>{esc(view['repo'])}</code> · {esc(pin)}</h3>"
        f"<p>{esc(view['status'])}; {view['uses']} of {view['max_uses']} uses; until "
        f"{esc(view['expires_at'])}; reviewer: {esc(reviewer['kind'])} {esc(target)}</p>"
        + (f"<p>{esc(view['note'])}</p>" if view["note"] else "")
        + (f"<ul>{people}</ul>" if people else "<p>Not redeemed yet.</p>")
        + revoke
        + "</li>"
    )


_CREATE_FORM = """
<h2>Give a reviewer access</h2>
<form method="post" action="/grants">
<input type="hidden" name="csrf" value="{csrf}">
<label for="g-repo">Repository (backend/owner/name)</label>
<input type="text" id="g-repo" name="repo" required value="{repo}">
<label for="g-commit">Commit (40 hex digits; optional, pins the reviewer to it)</label>
<input type="text" id="g-commit" name="commit">
<label for="g-days">Days of access</label>
<input type="text" id="g-days" name="days" inputmode="numeric" value="7" required>
<label for="g-uses">How many times the link may be used</label>
<input type="text" id="g-uses" name="max_uses" inputmode="numeric" value="1" required>
<fieldset><legend>Reviewer</legend>
<div><input type="radio" id="g-anon" name="reviewer" value="anonymous" checked>
<label style="display:inline" for="g-anon">anyone with the link, anonymously</label></div>
<div><input type="radio" id="g-any" name="reviewer" value="any_signed_in">
<label style="display:inline" for="g-any">anyone who signs in</label></div>
<div><input type="radio" id="g-email" name="reviewer" value="email">
<label style="display:inline" for="g-email">the person with this email address:</label></div>
<div><input type="radio" id="g-orcid" name="reviewer" value="orcid">
<label style="display:inline" for="g-orcid">the person with this ORCID iD:</label></div>
<label for="g-who">Email address or ORCID iD</label>
<input type="text" id="g-who" name="who">
</fieldset>
<label for="g-note">Note for the reviewer</label>
<input type="text" id="g-note" name="note">
<button type="submit">Create the review link</button>
</form>
"""


async def owner_page(request: web.Request) -> web.StreamResponse:
    """GET /grants[?repo=…]: the grants the user created (or on one repo), revocable."""
    svc = services(request)
    session = await current_session(request)
    if session is None:
        raise web.HTTPFound("/login?" + urlencode({"next": request.path_qs}))
    repo = request.query.get("repo") or None
    views = await grants.list_grants(svc, session.principal, repo)
    items = "".join(_grant_item(v, session.csrf) for v in views)
    scope = f"on <code>{esc(repo)}</code>" if repo else "you created"
    body = (
        f"<h2>Grants {scope}</h2>"
        + (f'<ul class="choices">{items}</ul>' if items else "<p>There are none.</p>")
        + '<form method="get" action="/grants" role="search">'
        '<label for="q-repo">Show every grant on a repository (backend/owner/name)</label>'
        f'<input type="text" id="q-repo" name="repo" value="{esc(repo or "")}">'
        '<button type="submit">Show</button></form>'
        + _CREATE_FORM.format(csrf=esc(session.csrf), repo=esc(repo or ""))
        + '<p><a href="/">Back</a></p>'
    )
    return render(request, "Reviewer grants", body)


def _form_grant(form: Any) -> GrantRequest:
    """A GrantRequest from the owner page's form."""
    try:
        days = int(str(form.get("days", "")))
        uses = int(str(form.get("max_uses", "")))
    except ValueError:
        raise InvalidRequest("Days and uses must be whole numbers.") from None
    kind = str(form.get("reviewer", ""))
    who = str(form.get("who", "")).strip()
    reviewer: dict[str, Any] = (
        {kind: True} if kind in ("anonymous", "any_signed_in") else {kind: who}
    )
    document = {
        "repo": str(form.get("repo", "")).strip(),
        "expires_at": (datetime.now(UTC) + timedelta(days=days)).isoformat(),
        "max_uses": uses,
        "reviewer": reviewer,
        "note": str(form.get("note", "")),
    }
    if commit := str(form.get("commit", "")).strip():
        document["commit"] = commit
    return parse_model(GrantRequest, document)


async def owner_create(request: web.Request) -> web.StreamResponse:
    """POST /grants: create a grant from the owner page; shows the link once."""
    svc = services(request)
    form = await read_form(request)
    session = await current_session(request)
    if session is None or form.get("csrf") != session.csrf:
        raise InvalidRequest("This form has expired; reload the page and try again.")
    created = await grants.create_grant(svc, session.principal, _form_grant(form))
    url = grants.capability_url(svc, created.secret)
    body = (
        f"<p>Send this link to the reviewer. It is shown only once; the broker keeps only a "
        f"hash of it. It works until {esc(_when(created.record.expires_at))}, at most "
        f"{created.record.max_uses} time(s).</p>"
        f'<label for="link">Review link</label><pre id="link">{esc(url)}</pre>'
        '<p><a href="/grants">Back to your grants</a></p>'
    )
    return render(request, "Review link created", body)


async def owner_revoke(request: web.Request) -> web.StreamResponse:
    """POST /grants/revoke: revoke one grant from the owner page."""
    svc = services(request)
    form = await read_form(request)
    session = await current_session(request)
    if session is None or form.get("csrf") != session.csrf:
        raise InvalidRequest("This form has expired; reload the page and try again.")
    grant_id = str(form.get("grant_id", ""))
    if not grant_id:
        raise NotFound("there is no grant with that id")
    await grants.revoke_grant(svc, session.principal, grant_id)
    return web.Response(status=303, headers={"Location": "/grants"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/grants", api_create, name="grants_create")
    app.router.add_get("/v1/grants", api_list, name="grants_list")
    app.router.add_delete("/v1/grants/{grant_id}", api_revoke, name="grants_revoke")
    app.router.add_get("/v1/grants/{grant_id}/receipt", api_receipt, name="grants_receipt")
    app.router.add_get("/review", review_page, name="review")
    app.router.add_post("/review", review_redeem, name="review_redeem")
    app.router.add_get("/grants", owner_page, name="grants_page")
    app.router.add_post("/grants", owner_create, name="grants_page_create")
    app.router.add_post("/grants/revoke", owner_revoke, name="grants_page_revoke")
