"""The start page, and in dev mode a button that mints a test access token.

The test token goes through the same path as every grant: the policy decides (`exchange`
for the built-in `dev-console` client), the lifetime is clipped to the policy's limit, and an
audit record names the jti and the deciding policies.
"""

from __future__ import annotations

import json

from aiohttp import web

from broker.errors import AccessDenied, InvalidRequest, NotFound
from broker.oauth import bearer
from broker.pages import esc, render
from broker.routes.login import current_session, read_form
from broker.state import services
from policies.engine import Resource

DEV_CLIENT = "dev-console"
DEV_AUDIENCE = "urn:binder-broker:dev-console"


async def home(request: web.Request) -> web.Response:
    svc = services(request)
    issuer = svc.settings.server.public_url
    session = await current_session(request)
    links = (
        f'<ul><li><a href="{esc(issuer)}/.well-known/openid-configuration">OpenID Provider '
        f'metadata</a></li><li><a href="{esc(issuer)}/jwks.json">Signing keys (JWKS)</a></li>'
        f'<li><a href="{esc(issuer)}/readyz">Readiness</a></li></ul>'
    )
    if session is None:
        body = (
            "<p>binder-broker signs you in with your institution and hands notebook launchers "
            "short-lived, narrowly scoped credentials.</p>"
            '<p><a href="/login">Sign in</a></p>' + links
        )
        return render(request, "binder-broker", body)
    p = session.principal
    groups = ", ".join(p.groups) or "none"
    body = (
        f"<p>Signed in as <strong>{esc(p.display_name or p.subject)}</strong> through "
        f"<code>{esc(p.idp)}</code>.</p><dl><dt>Principal id</dt><dd><code>{esc(p.id)}</code>"
        f"</dd><dt>Groups</dt><dd>{esc(groups)}</dd>"
        f"<dt>Affiliation</dt><dd>{esc(', '.join(p.affiliation) or 'none')}</dd>"
        f"<dt>Signed in at</dt><dd><code>{esc(p.issuer)}</code></dd></dl>"
    )
    if svc.dev_mode:
        body += (
            '<form method="post" action="/dev/token">'
            f'<input type="hidden" name="csrf" value="{esc(session.csrf)}">'
            '<button type="submit">Mint a test access token</button></form>'
        )
    body += (
        f'<form method="post" action="/logout"><input type="hidden" name="csrf" '
        f'value="{esc(session.csrf)}"><button type="submit">Sign out</button></form>' + links
    )
    return render(request, "binder-broker", body)


async def dev_token(request: web.Request) -> web.Response:
    """POST /dev/token (dev mode only): a real access token for the signed-in user."""
    svc = services(request)
    if not svc.dev_mode:
        raise NotFound("There is nothing at this address.")
    session = await current_session(request)
    form = await read_form(request)
    if session is None or form.get("csrf") != session.csrf:
        raise InvalidRequest("Sign in first, then use the button on the start page.")
    principal = session.principal
    decision = svc.policy.decide(
        principal, "exchange", Resource("Client", DEV_CLIENT, attrs={"first_party": True})
    )
    if not decision.allowed:
        svc.metrics.denials.labels(action="exchange").inc()
        await svc.audit.append(
            "token.denied", outcome="denied", actor=principal.id, client=DEV_CLIENT,
            policies=list(decision.reasons),
        )  # fmt: skip
        raise AccessDenied("The policy does not let you mint this token.", reasons=decision.reasons)
    ttl = svc.settings.tokens.access_token_ttl
    if decision.limits.max_ttl is not None:
        ttl = min(ttl, decision.limits.max_ttl)
    minted = await svc.tokens.mint(
        subject=principal.id,
        audience=DEV_AUDIENCE,
        client_id=DEV_CLIENT,
        scope=("openid",),
        ttl=ttl,
        auth_time=principal.auth_time,
        acr=principal.acr,
        extra={"groups": list(principal.groups)},
    )
    await svc.audit.append(
        "token.issued", outcome="success", actor=principal.id, client=DEV_CLIENT,
        token_jti=minted.jti, kid=minted.kid, expires_at=minted.expires_at,
        policies=list(decision.reasons),
    )  # fmt: skip
    issuer = svc.settings.server.public_url
    snippet = (
        "python - <<'EOF'\nimport jwt\n"
        f'jwks = jwt.PyJWKClient("{issuer}/jwks.json")\n'
        'token = "PASTE_THE_TOKEN"\n'
        "key = jwks.get_signing_key_from_jwt(token)\n"
        f'print(jwt.decode(token, key, algorithms=["ES256", "RS256"], audience="{DEV_AUDIENCE}", '
        f'issuer="{issuer}"))\nEOF'
    )
    body = (
        f"<p>An access token for <code>{esc(principal.id)}</code>, valid for {ttl} seconds "
        f"(jti <code>{esc(minted.jti)}</code>, key <code>{esc(minted.kid)}</code>).</p>"
        f'<label for="token">Token</label><pre id="token">{esc(minted.token)}</pre>'
        f"<p>Verify it against the published keys:</p><pre>{esc(snippet)}</pre>"
        '<p><a href="/">Back</a></p>'
    )
    return render(request, "Test access token", body)


async def whoami(request: web.Request) -> web.Response:
    """GET /v1/whoami: the claims of a valid, unrevoked broker access token (Bearer or DPoP)."""
    claims = await bearer.access_token_claims(services(request), request)
    body = {k: claims[k] for k in ("sub", "client_id", "scope", "aud", "exp", "jti") if k in claims}
    return web.json_response(body, dumps=json.dumps, headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", home, name="home")
    app.router.add_post("/dev/token", dev_token, name="dev_token")
    app.router.add_get("/v1/whoami", whoami, name="whoami")
