"""Request middleware: correlation id, error rendering, metrics and the request log.

Errors render as RFC 6749 §5.2 JSON (`error`, `error_description`, `request_id`, with
`Cache-Control: no-store`) for API routes, and as a readable HTML page for browser routes.
Unexpected exceptions never show a stack trace: the caller sees a correlation id, the log
holds the detail.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from broker.errors import (
    BrokerError,
    InvalidRequest,
    InvalidToken,
    NotFound,
    PayloadTooLarge,
    ServerError,
)
from broker.logs import PreboundLogger
from broker.metrics import Metrics
from broker.pages import esc, render
from broker.state import REQUEST_ID

log = structlog.get_logger("broker.http")
# The per-request line goes through a logger bound once per logging configuration: the lazy
# proxy above would assemble a new bound logger on every call.
request_log = PreboundLogger("broker.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
# The authorization endpoint is visited by browsers although it lives under /oauth/.
_BROWSER_PREFIXES = ("/oauth/authorize",)
_API_PREFIXES = (
    "/v1/",
    "/oauth/",
    "/.well-known/",
    "/jwks.json",
    "/healthz",
    "/readyz",
    "/metrics",
)


class MethodNotAllowed(BrokerError):
    error, status, title = "invalid_request", 405, "Method not allowed"


def _is_api(request: web.Request) -> bool:
    if request.path.startswith(_BROWSER_PREFIXES):
        return False
    if request.path.startswith(_API_PREFIXES):
        return True
    return "text/html" not in request.headers.get("Accept", "")


def error_response(request: web.Request, error: BrokerError) -> web.Response:
    request_id = request.get(REQUEST_ID, "-")
    if _is_api(request):
        body = {
            "error": error.error,
            "error_description": error.description,
            "request_id": request_id,
        }
        response = web.json_response(body, status=error.status, dumps=json.dumps)
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"
        if isinstance(error, InvalidToken):
            response.headers["WWW-Authenticate"] = (
                f'Bearer error="invalid_token", error_description="{error.description}"'
            )
        return response
    body_html = (
        f"<p>{esc(error.description)}</p>"
        f'<p class="muted">If you ask for help, quote the request id <code>{esc(request_id)}'
        '</code>.</p><p><a href="/">Back to the start page</a></p>'
    )
    return render(request, error.title, body_html, status=error.status)


def _from_http_exception(exc: web.HTTPException) -> BrokerError:
    if exc.status == 404:
        return NotFound("There is nothing at this address.")
    if exc.status == 405:
        return MethodNotAllowed("This address does not accept that method.")
    if exc.status == 413:
        return PayloadTooLarge("The request body is too large.")
    if 400 <= exc.status < 500:
        return InvalidRequest(exc.reason or "The request is not valid.")
    return ServerError()


def build_middlewares(
    metrics_of: Callable[[], Metrics],
) -> list[Callable[..., Awaitable[web.StreamResponse]]]:
    """The middleware chain, outermost first. `metrics_of` is read per request because the
    metrics object is created with the services, after the application."""

    @web.middleware
    async def correlate_and_render(request: web.Request, handler: Handler) -> web.StreamResponse:
        inbound = request.headers.get("X-Request-Id", "")
        # 128 random bits as 32 hex digits, like uuid4().hex without its cost.
        request_id = inbound if inbound and _REQUEST_ID.match(inbound) else secrets.token_hex(16)
        request[REQUEST_ID] = request_id
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        route = request.match_info.route.resource
        route_name = route.canonical if route is not None else "unmatched"
        try:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                error = _from_http_exception(exc)
                if "Allow" in exc.headers:
                    error.headers["Allow"] = exc.headers["Allow"]
                raise error from None
        except BrokerError as error:
            log.info(
                "request.error",
                error=error.error,
                status=error.status,
                detail=error.log_detail or error.description,
            )
            response = error_response(request, error)
            response.headers.update(error.headers)
        except web.HTTPException as redirect:
            response = redirect
        except Exception:
            log.exception("request.unhandled")
            response = error_response(request, ServerError())
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
        elapsed = time.perf_counter() - started
        response.headers["X-Request-Id"] = request_id
        metrics_of().request_handled(route_name, request.method, response.status, elapsed)
        request_log.info(
            "request",
            request_id=request_id,
            method=request.method,
            path=request.path,  # never the query string: it may carry codes or tokens
            status=response.status,
            ms=round(elapsed * 1000, 2),
        )
        if isinstance(response, web.HTTPException):
            raise response
        return response

    return [correlate_and_render]
