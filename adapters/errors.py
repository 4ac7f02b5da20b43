"""The broker's error hierarchy.

It lives here, below `broker/`, because adapters must raise these types and may not import
`broker`; `broker.errors` re-exports it. Each class carries its OAuth 2.0 `error` code
(RFC 6749 §5.2, RFC 8693 §2.2.2) and HTTP status, so any layer can raise and one middleware
renders. `description` is shown to the caller; `log_detail` goes to the log only and must
never hold a token or secret either.
"""

from __future__ import annotations

from typing import ClassVar


class BrokerError(Exception):
    """Base of every error the broker renders to a caller."""

    error: ClassVar[str] = "server_error"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Something went wrong"

    def __init__(self, description: str = "", *, log_detail: str = "") -> None:
        super().__init__(description or self.title)
        self.description = description or self.title
        self.log_detail = log_detail
        self.headers: dict[str, str] = {}  # extra response headers, e.g. Allow


class InvalidRequest(BrokerError):
    error, status, title = "invalid_request", 400, "The request is not valid"


class InvalidClient(BrokerError):
    error, status, title = "invalid_client", 401, "Client authentication failed"


class InvalidGrant(BrokerError):
    error, status, title = "invalid_grant", 400, "The grant is not valid"


class UnauthorizedClient(BrokerError):
    error, status, title = "unauthorized_client", 400, "The client may not use this grant"


class UnsupportedGrantType(BrokerError):
    error, status, title = "unsupported_grant_type", 400, "Unsupported grant type"


class InvalidScope(BrokerError):
    error, status, title = "invalid_scope", 400, "The requested scope is not allowed"


class InvalidTarget(BrokerError):
    error, status, title = (
        "invalid_target",
        400,
        "The requested audience or resource is not allowed",
    )


class InvalidToken(BrokerError):
    error, status, title = "invalid_token", 401, "The token is not valid"


class AccessDenied(BrokerError):
    """A policy said no. `reasons` are the ids of the deciding policies."""

    error, status, title = "access_denied", 403, "Access denied"

    def __init__(
        self, description: str = "", *, reasons: tuple[str, ...] = (), log_detail: str = ""
    ) -> None:
        super().__init__(description, log_detail=log_detail)
        self.reasons = reasons


class NotFound(BrokerError):
    error, status, title = "not_found", 404, "Not found"


class Conflict(BrokerError):
    error, status, title = "conflict", 409, "The resource changed; try again"


class PayloadTooLarge(BrokerError):
    error, status, title = "invalid_request", 413, "The request body is too large"


class ConfigurationError(BrokerError):
    """Settings or policies that cannot be loaded; stops start-up."""

    error, status, title = "server_error", 500, "The broker is misconfigured"


class UpstreamFailed(BrokerError):
    """A peer the broker depends on (Vault, an IdP, a cloud API) failed or is unreachable."""

    error, status, title = (
        "temporarily_unavailable",
        503,
        "A service the broker needs is unavailable",
    )


class ServerError(BrokerError):
    error, status, title = "server_error", 500, "Internal error"
