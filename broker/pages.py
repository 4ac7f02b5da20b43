"""Plain, accessible HTML pages. Every value is escaped; no template language is needed."""

from __future__ import annotations

import html
import secrets
from functools import cache
from importlib import resources
from string import Template
from urllib.parse import urlsplit

from aiohttp import web

from broker.state import DEV_MODE, REQUEST_ID

DEV_BANNER = (
    '<div class="dev-banner" role="alert">DEVELOPMENT MODE: sign-in here checks no password. '
    "Never expose this broker to other people.</div>"
)


@cache
def _base() -> Template:
    return Template(resources.files("broker.web").joinpath("base.html").read_text("utf-8"))


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def origin_of(url: str) -> str:
    """`scheme://host[:port]` of `url`: what a CSP `form-action` source names.

    Browsers apply `form-action` to every redirect that follows a form post, so a page whose
    form can end in a redirect elsewhere (consent, a sign-in form, an auto-posting form) must
    name that origin.
    """
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def render(
    request: web.Request,
    title: str,
    body_html: str,
    *,
    status: int = 200,
    script: str = "",
    form_action: str = "",
) -> web.Response:
    """A full page. `body_html` must already be escaped by the caller (use `esc`).

    `script` is trusted inline JavaScript (a constant, never built from input), allowed by a
    per-response CSP nonce; `form_action` is one more origin forms may post to.
    """
    dev_mode = request.app.get(DEV_MODE, False)
    csp = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"
    csp += f"; form-action 'self' {form_action}".rstrip()
    if script:
        nonce = secrets.token_urlsafe(16)
        body_html += f'<script nonce="{nonce}">{script}</script>'
        csp += f"; script-src 'nonce-{nonce}'; connect-src 'self'"
    page = _base().substitute(
        title=esc(title),
        body=body_html,
        dev_banner=DEV_BANNER if dev_mode else "",
        request_id=esc(request.get(REQUEST_ID, "-")),
    )
    response = web.Response(text=page, status=status, content_type="text/html", charset="utf-8")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = csp
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
