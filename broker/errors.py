"""The broker's error hierarchy (defined in `adapters.errors` so adapters can raise it)."""

from adapters.errors import (
    AccessDenied,
    BrokerError,
    ConfigurationError,
    Conflict,
    InvalidClient,
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    InvalidToken,
    NotFound,
    PayloadTooLarge,
    ServerError,
    UnauthorizedClient,
    UnsupportedGrantType,
    UpstreamFailed,
)

__all__ = [
    "AccessDenied",
    "BrokerError",
    "ConfigurationError",
    "Conflict",
    "InvalidClient",
    "InvalidGrant",
    "InvalidRequest",
    "InvalidScope",
    "InvalidTarget",
    "InvalidToken",
    "NotFound",
    "PayloadTooLarge",
    "ServerError",
    "UnauthorizedClient",
    "UnsupportedGrantType",
    "UpstreamFailed",
]
