"""RFC 8628 device authorization: `/oauth/device_authorization`, the `/device` page and the
`urn:ietf:params:oauth:grant-type:device_code` grant.

State lives in the shared cache, so any replica can answer any step:

- `device:{h}` (h = SHA-256 of the device code; the code itself is never stored): client,
  scopes, expiry and base interval. It outlives the code by `EXPIRED_GRACE` so that a late poll
  learns `expired_token` rather than `invalid_grant`.
- `device-user:{u}` (u = SHA-256 of the normalised user code) → h, for the code's lifetime.
- `device-decision:{h}`: the user's one decision, written with `add` so only one can win;
  an approval is taken with `pop`, so exactly one poll gets tokens, then marked consumed.
- `device-poll:{h}` / `device-slow:{h}`: when the client may poll next and how many seconds
  `slow_down` has added (§3.5: +5 s for this and every later request).
- `device-attempts:{session}`: wrong user codes per browser session (§5.1, brute force).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, NoReturn
from urllib.parse import urlencode

from aiohttp import web

from broker.errors import (
    BrokerError,
    InvalidGrant,
    InvalidRequest,
    UnauthorizedClient,
)
from broker.oauth.clients import Client
from broker.oauth.forms import read_oauth_form
from broker.oauth.issuance import Issued, TokenRequest, issue, load_principal, remember_principal
from broker.oauth.refresh import token_hash
from broker.oauth.token import GrantContext, grant, require, token_response
from broker.pages import esc, render
from broker.routes.login import current_session, read_form
from broker.services import Services
from broker.sessions import Session
from broker.state import services

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"  # RFC 8628 §6.1: no vowels, no look-alike digits
USER_CODE_LENGTH = 8
SLOW_DOWN_STEP = 5  # RFC 8628 §3.5
EXPIRED_GRACE = 300  # seconds a code's state outlives it, to answer `expired_token`
POLL_JITTER = 0.5  # network jitter forgiven between two polls, in seconds
MAX_WRONG_CODES = 10
WRONG_CODE_WINDOW = 600


class AuthorizationPending(BrokerError):
    error, status, title = "authorization_pending", 400, "The user has not decided yet"


class SlowDown(BrokerError):
    error, status, title = "slow_down", 400, "Polling too often"


class DeviceAccessDenied(BrokerError):
    """The user denied the request (RFC 8628 §3.5: 400, unlike a policy denial's 403)."""

    error, status, title = "access_denied", 400, "The user denied the request"


class ExpiredToken(BrokerError):
    error, status, title = "expired_token", 400, "The device code has expired"


class TooManyAttempts(BrokerError):
    error, status, title = "too_many_requests", 429, "Too many attempts"


# --- codes and cache keys ------------------------------------------------------------------


def new_user_code() -> str:
    """Eight characters of `USER_CODE_ALPHABET` (about 34.5 bits), unformatted."""
    return "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))


def normalize_user_code(value: str) -> str | None:
    """The canonical form of what a user typed (case, hyphens and spaces ignored), or None if
    it cannot be a user code at all."""
    code = "".join(ch for ch in value.upper() if ch not in "- \t")
    if len(code) != USER_CODE_LENGTH or any(ch not in USER_CODE_ALPHABET for ch in code):
        return None
    return code


def display_user_code(code: str) -> str:
    return f"{code[:4]}-{code[4:]}"


def _state_key(h: str) -> str:
    return f"device:{h}"


def _user_key(code: str) -> str:
    return f"device-user:{token_hash(code)}"


def _decision_key(h: str) -> str:
    return f"device-decision:{h}"


def _poll_key(h: str) -> str:
    return f"device-poll:{h}"


def _slow_key(h: str) -> str:
    return f"device-slow:{h}"


def _attempts_key(session: Session) -> str:
    return f"device-attempts:{token_hash(session.id)}"


async def _load_state(svc: Services, h: str) -> dict[str, Any] | None:
    raw = await svc.cache.get(_state_key(h))
    return json.loads(raw) if raw else None


def _state_ttl(state: dict[str, Any]) -> float:
    return max(float(state["expires_at"]) + EXPIRED_GRACE - time.time(), 1.0)


# --- POST /oauth/device_authorization (RFC 8628 §3.1, §3.2) --------------------------------


async def device_authorization(request: web.Request) -> web.Response:
    """Start a device flow for an authenticated (or public) client."""
    svc = services(request)
    form = await read_oauth_form(request)
    client = await svc.oauth.clients.authenticate(request, form)
    if not client.allows_grant(DEVICE_CODE_GRANT):
        raise UnauthorizedClient("this client may not use the device authorization grant")
    scopes = client.narrow_scopes(form.get("scope"))
    settings = svc.settings.oauth
    ttl = settings.device_code_ttl
    expires_at = time.time() + ttl
    device_code = secrets.token_urlsafe(32)
    h = token_hash(device_code)
    state = {
        "client_id": client.id,
        "scopes": scopes,
        "expires_at": expires_at,
        "interval": settings.device_poll_interval,
    }
    await svc.cache.set(_state_key(h), json.dumps(state), ttl + EXPIRED_GRACE)
    for _ in range(8):
        user_code = new_user_code()
        if await svc.cache.add(_user_key(user_code), h, ttl):
            break
    else:  # eight collisions in a row: the live-code space is exhausted (or under attack)
        await svc.cache.delete(_state_key(h))
        raise BrokerError("no user code is free right now; try again later")
    verification_uri = f"{svc.settings.server.public_url}/device"
    shown = display_user_code(user_code)
    return token_response(
        {
            "device_code": device_code,
            "user_code": shown,
            "verification_uri": verification_uri,
            "verification_uri_complete": f"{verification_uri}?{urlencode({'user_code': shown})}",
            "expires_in": ttl,
            "interval": settings.device_poll_interval,
        }
    )


# --- the device access token request (RFC 8628 §3.4, §3.5) ---------------------------------


@grant(DEVICE_CODE_GRANT)
async def device_code_grant(ctx: GrantContext) -> Issued:
    """Answer one poll: pending, slow_down, denied, expired, or (once) the tokens."""
    svc = ctx.svc
    h = token_hash(require(ctx.form, "device_code"))
    state = await _load_state(svc, h)
    # A code of another client is answered exactly like an unknown one.
    if state is None or state["client_id"] != ctx.client.id:
        raise InvalidGrant("the device code is not valid")
    if time.time() >= state["expires_at"]:
        raise ExpiredToken("the device code has expired; start again")
    raw = await svc.cache.get(_decision_key(h))
    if raw is None:
        await _still_pending(svc, h, state)
    decision = json.loads(raw)
    if decision.get("outcome") == "denied":
        raise DeviceAccessDenied("the user denied the request")
    if decision.get("outcome") != "approved":
        raise InvalidGrant("the device code was already used")
    taken = await svc.cache.pop(_decision_key(h))
    if taken is None or json.loads(taken).get("outcome") != "approved":
        raise InvalidGrant("the device code was already used")
    # Keep a marker so later polls learn the code was used rather than "pending".
    await svc.cache.set(_decision_key(h), json.dumps({"outcome": "consumed"}), _state_ttl(state))
    principal = await load_principal(svc, decision["principal_id"])
    if principal is None:
        raise InvalidGrant("the user who approved this request is no longer known")
    request = TokenRequest(
        grant_type=DEVICE_CODE_GRANT, client=ctx.client, principal=principal,
        scopes=list(state["scopes"]), audience=ctx.client.default_audience(),
        dpop_jkt=ctx.dpop_jkt, refresh=True,
    )  # fmt: skip
    return await issue(svc, request)


async def _still_pending(svc: Services, h: str, state: dict[str, Any]) -> NoReturn:
    """Raise `slow_down` for a poll within the interval of the previous one, else
    `authorization_pending`. Each slow_down lengthens the interval by 5 s for good."""
    extra = int(await svc.cache.get(_slow_key(h)) or 0)
    interval = state["interval"] + extra
    if await svc.cache.add(_poll_key(h), "1", max(interval - POLL_JITTER, POLL_JITTER)):
        raise AuthorizationPending("the user has not approved the request yet")
    extra = await svc.cache.incr(_slow_key(h), _state_ttl(state), SLOW_DOWN_STEP)
    interval = state["interval"] + extra
    await svc.cache.set(_poll_key(h), "1", max(interval - POLL_JITTER, POLL_JITTER))
    raise SlowDown(f"poll at most once every {interval} seconds")


# --- the /device page (RFC 8628 §3.3) --------------------------------------------------------

_SCOPE_TEXT = {
    "openid": "know who you are",
    "profile": "see your name and username",
    "email": "see your email address",
    "groups": "see the groups you belong to",
    "offline_access": "stay signed in (a refresh token) until you sign out or it expires",
}


def _code_form(session: Session, prefill: str, message: str = "") -> str:
    note = f'<p class="error" role="alert">{esc(message)}</p>' if message else ""
    return (
        f"{note}<p>Enter the code your device or command line shows.</p>"
        '<form method="post" action="/device">'
        f'<input type="hidden" name="csrf" value="{esc(session.csrf)}">'
        '<label for="user_code">Code</label>'
        f'<input type="text" id="user_code" name="user_code" value="{esc(prefill)}" required '
        'autocomplete="off" autocapitalize="characters" spellcheck="false" maxlength="16">'
        '<button type="submit">Continue</button></form>'
    )


async def device_page(request: web.Request) -> web.StreamResponse:
    """GET /device: the code form (prefilled from `user_code`); sign-in first if needed."""
    session = await current_session(request)
    code = normalize_user_code(request.query.get("user_code", ""))
    shown = display_user_code(code) if code else ""
    if session is None:
        # Only a well-formed code goes into `next`, so nothing the caller typed is echoed.
        back = f"/device?{urlencode({'user_code': shown})}" if code else "/device"
        return web.Response(status=302, headers={"Location": f"/login?{urlencode({'next': back})}"})
    return render(request, "Connect a device", _code_form(session, shown))


async def _signed_in_form(request: web.Request) -> tuple[Services, Session, dict[str, str]]:
    """The session and the POSTed form, once its csrf token matches the session's."""
    svc = services(request)
    session = await current_session(request)
    form = {k: v for k, v in (await read_form(request)).items() if isinstance(v, str)}
    if session is None:
        raise InvalidRequest("Sign in first, then enter the code again.")
    if not secrets.compare_digest(form.get("csrf", "").encode(), session.csrf.encode()):
        raise InvalidRequest("This form has expired; reload the page and try again.")
    return svc, session, form


class _WrongCode(Exception):
    """The user code is malformed, unknown, expired or already decided."""


async def _find(svc: Services, session: Session, typed: str) -> tuple[str, dict[str, Any]]:
    """(h, state) of the live, undecided request the user code names.

    Every well-formed lookup takes one of the session's `MAX_WRONG_CODES` attempts first (so
    parallel guesses cannot overshoot) and gives it back if the code was right.
    """
    code = normalize_user_code(typed)
    if code is None:
        raise _WrongCode("That is not a code from this broker: it has 8 letters, like BCDF-GHJK.")
    attempts = _attempts_key(session)
    if await svc.cache.incr(attempts, WRONG_CODE_WINDOW) > MAX_WRONG_CODES:
        error = TooManyAttempts("Too many wrong codes. Wait ten minutes, then try again.")
        error.headers["Retry-After"] = str(WRONG_CODE_WINDOW)
        raise error
    h = await svc.cache.get(_user_key(code))
    state = await _load_state(svc, h) if h else None
    if h is None or state is None or time.time() >= state["expires_at"]:
        raise _WrongCode("That code is not valid or has expired. Check it and try again.")
    await svc.cache.incr(attempts, WRONG_CODE_WINDOW, -1)
    if await svc.cache.get(_decision_key(h)) is not None:
        raise _WrongCode("That code was already used. Start again on your device.")
    return h, state


async def _client(svc: Services, state: dict[str, Any]) -> Client:
    client = await svc.oauth.clients.get(state["client_id"])
    if client is None:
        raise InvalidRequest("The application that asked for this code is no longer registered.")
    return client


async def device_lookup(request: web.Request) -> web.Response:
    """POST /device: check the code, then ask the user to approve or deny, naming the client."""
    svc, session, form = await _signed_in_form(request)
    typed = form.get("user_code", "")
    try:
        _, state = await _find(svc, session, typed)
    except _WrongCode as wrong:
        body = _code_form(session, typed[:16], str(wrong))
        return render(request, "Connect a device", body, status=400)
    client = await _client(svc, state)
    code = display_user_code(normalize_user_code(typed) or "")
    p = session.principal
    scopes = "".join(
        f"<li><code>{esc(s)}</code>{': ' + esc(_SCOPE_TEXT[s]) if s in _SCOPE_TEXT else ''}</li>"
        for s in state["scopes"]
    )
    body = (
        f"<p><strong>{esc(client.config.name or client.id)}</strong> "
        f"(client <code>{esc(client.id)}</code>) asks to act as "
        f"<strong>{esc(p.display_name or p.subject)}</strong> with code "
        f"<code>{esc(code)}</code>. It asks to:</p><ul>{scopes or '<li>nothing more</li>'}</ul>"
        "<p>Approve only if you started this sign-in yourself, just now, and your device shows "
        "this same code. If someone sent you this code or link, deny.</p>"
        '<form method="post" action="/device/decision">'
        f'<input type="hidden" name="csrf" value="{esc(session.csrf)}">'
        f'<input type="hidden" name="user_code" value="{esc(code)}">'
        '<button type="submit" name="decision" value="approve">Approve</button> '
        '<button type="submit" name="decision" value="deny">Deny</button></form>'
    )
    return render(request, "Approve this device?", body)


async def device_decision(request: web.Request) -> web.Response:
    """POST /device/decision: record approve (with the session's principal) or deny, once."""
    svc, session, form = await _signed_in_form(request)
    choice = form.get("decision")
    if choice not in ("approve", "deny"):
        raise InvalidRequest("Choose Approve or Deny.")
    typed = form.get("user_code", "")
    try:
        h, state = await _find(svc, session, typed)
    except _WrongCode as wrong:
        return render(request, "Connect a device", _code_form(session, "", str(wrong)), status=400)
    principal = session.principal
    if choice == "approve":
        await remember_principal(svc, principal)
        decision = {"outcome": "approved", "principal_id": principal.id}
    else:
        decision = {"outcome": "denied", "principal_id": principal.id}
    if not await svc.cache.add(_decision_key(h), json.dumps(decision), _state_ttl(state)):
        body = _code_form(session, "", "That code was already used. Start again on your device.")
        return render(request, "Connect a device", body, status=400)
    event = "device.approved" if choice == "approve" else "device.denied"
    await svc.audit.append(
        event, outcome="success" if choice == "approve" else "denied", actor=principal.id,
        client=state["client_id"], principal=principal.id, scopes=list(state["scopes"]),
    )  # fmt: skip
    if choice == "approve":
        body = "<p>Done. Return to your device: it will finish signing in by itself.</p>"
        return render(request, "Device approved", body)
    body = "<p>Denied. The device gets no access. You can close this page.</p>"
    return render(request, "Device denied", body)


def add_routes(app: web.Application) -> None:
    app.router.add_post(
        "/oauth/device_authorization", device_authorization, name="oauth_device_authorization"
    )
    app.router.add_get("/device", device_page, name="device")
    app.router.add_post("/device", device_lookup, name="device_lookup")
    app.router.add_post("/device/decision", device_decision, name="device_decision")
