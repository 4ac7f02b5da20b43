"""OpenStackBackend decisions that need no Keystone: request checks, user-name mapping,
the clouds.yaml it writes, and its errors. Keystone itself: tests/integration."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
import yaml

from adapters.base import Grant, Principal
from adapters.downstream.openstack import OpenStackBackend
from adapters.errors import AccessDenied, ConfigurationError, InvalidRequest, UpstreamFailed

PASSWORD = "service-password-that-must-not-leak"


class RecordingSigner:
    """A TokenSigner that returns a fixed opaque token and records what it was asked."""

    issuer = "http://127.0.0.1:8080"

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], str, int]] = []

    async def sign(self, claims: Mapping[str, Any], *, audience: str, ttl: int) -> str:
        self.calls.append((dict(claims), audience, ttl))
        return "header.payload.signature-that-must-not-leak"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def backend(http: aiohttp.ClientSession, **overrides: Any) -> OpenStackBackend:
    options: dict[str, Any] = {
        "id": "js2",
        "auth_url": f"http://127.0.0.1:{_closed_port()}/",
        "region": "IU: main",
        "interface": "public",
        "service_user": "binder-broker",
        "service_password": PASSWORD,
        "service_user_domain": "Default",
        "service_project": "service",
        "service_project_domain": "Default",
        "user_domain": "access",
        "user_name": "email",
        "projects": {"ds100": "p-ds100"},
        "default_project": None,
        "roles": ["member"],
        "access_rules": [],
        "max_ttl": 3600,
        "http": http,
        "signer": RecordingSigner(),
    }
    options.update(overrides)
    return OpenStackBackend(**options)


def grant(project: str | None = "ds100", **principal: Any) -> Grant:
    fields: dict[str, Any] = {
        "idp": "campus",
        "issuer": "https://idp.example.edu",
        "subject": "s-123",
        "email": "student@campus.example.edu",
    }
    fields.update(principal)
    return Grant(
        principal=Principal(**fields), action="launch", resource="js2", ttl=600, project=project
    )


async def test_unknown_project_is_invalid_before_any_sign_in(
    http: aiohttp.ClientSession,
) -> None:
    signer = RecordingSigner()
    with pytest.raises(InvalidRequest, match="unknown project 'physics'"):
        await backend(http, signer=signer).issue(grant("physics"))
    assert signer.calls == []


async def test_no_project_and_no_default_is_invalid(http: aiohttp.ClientSession) -> None:
    with pytest.raises(InvalidRequest, match="needs a project"):
        await backend(http).issue(grant(None))


async def test_principal_without_the_mapped_field_is_denied(
    http: aiohttp.ClientSession,
) -> None:
    signer = RecordingSigner()
    with pytest.raises(AccessDenied, match="no email"):
        await backend(http, signer=signer).issue(grant(email=None))
    with pytest.raises(AccessDenied, match="no preferred username"):
        await backend(http, signer=signer, user_name="preferred_username").issue(grant())
    assert signer.calls == []


@pytest.mark.parametrize(
    ("user_name", "claims", "expected"),
    [
        pytest.param("email", {}, "student@campus.example.edu", id="email"),
        pytest.param("subject", {}, "s-123", id="subject"),
        pytest.param(
            "preferred_username", {"preferred_username": "jdoe"}, "jdoe", id="preferred-username"
        ),
    ],
)
async def test_federation_assertion_names_the_mapped_user(
    http: aiohttp.ClientSession, user_name: str, claims: dict[str, Any], expected: str
) -> None:
    signer = RecordingSigner()
    b = backend(http, signer=signer, user_name=user_name)
    with pytest.raises(UpstreamFailed):  # nothing listens: the sign-in itself cannot happen
        await b.issue(grant(claims=claims))
    [(sent, audience, ttl)] = signer.calls
    assert sent["sub"] == expected
    assert sent["broker_principal"] == grant().principal.id
    assert audience.endswith("/v3") and 0 < ttl <= 60


async def test_unreachable_keystone_error_carries_no_secret(
    http: aiohttp.ClientSession,
) -> None:
    b = backend(http)
    with pytest.raises(UpstreamFailed) as issued:
        await b.issue(grant())
    with pytest.raises(UpstreamFailed) as revoked:
        await b.revoke("lease-1", {"user_id": "u1", "application_credential_id": "c1"})
    for error in (issued.value, revoked.value):
        for text in (str(error), error.description, error.log_detail):
            assert PASSWORD not in text and "signature-that-must-not-leak" not in text
    assert PASSWORD not in repr(b)


async def test_without_a_signer_issue_is_a_configuration_error(
    http: aiohttp.ClientSession,
) -> None:
    with pytest.raises(ConfigurationError):
        await backend(http, signer=None).issue(grant())


async def test_revoke_needs_the_handle(http: aiohttp.ClientSession) -> None:
    with pytest.raises(InvalidRequest):
        await backend(http).revoke("lease-1", {})


async def test_non_positive_max_ttl_is_refused(http: aiohttp.ClientSession) -> None:
    with pytest.raises(ConfigurationError):
        backend(http, max_ttl=0)


async def test_clouds_yaml_and_env_survive_awkward_values(http: aiohttp.ClientSession) -> None:
    b = backend(http)
    awkward = 'se"cr: et\\#'
    secret = b._secret("cred-1", awkward)
    cloud = yaml.safe_load(secret["clouds_yaml"])["clouds"]["js2"]
    assert cloud["auth"]["application_credential_secret"] == awkward
    assert cloud["auth"]["auth_url"].endswith("/v3") and "//v3" not in cloud["auth"]["auth_url"]
    assert cloud["region_name"] == "IU: main"
    assert cloud["identity_api_version"] == 3
    assert secret["env"]["OS_REGION_NAME"] == "IU: main"
    no_region = backend(http, region=None)._secret("cred-1", "x")
    assert "OS_REGION_NAME" not in no_region["env"]
    assert "region_name" not in yaml.safe_load(no_region["clouds_yaml"])["clouds"]["js2"]
