"""Attacks on the LTI 1.3 launch: each is refused with a readable page (400 invalid_request),
nothing is issued (no session cookie, no launch ticket) and a `sign_in` rejection is audited
with the check that failed. The tokens come from a real `lti1p3platform` platform and are
tampered with and re-signed by it (or by another key, or not at all)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from broker.sessions import SESSION_COOKIE
from tests.peers.broker import audit_events
from tests.peers.lti_platform import (
    CLAIM,
    LEARNER,
    LtiPlatform,
    LtiPlatforms,
    LtiTool,
    Scenario,
    launch_through,
    rsa_pem_pair,
    run_lti_tool,
)

TARGETS = ["http://127.0.0.1:9/v2/gh/course/week1/HEAD"]


@pytest_asyncio.fixture(scope="module")
async def platforms(lti_platforms: LtiPlatforms) -> dict[str, LtiPlatform]:
    return {"lmsa": lti_platforms.start("atka"), "lmsb": lti_platforms.start("atkb")}


@pytest_asyncio.fixture(scope="module")
async def tool(
    tmp_path_factory: pytest.TempPathFactory,
    lti_vault: tuple[Any, Any],
    platforms: dict[str, LtiPlatform],
) -> AsyncIterator[LtiTool]:
    async with run_lti_tool(
        tmp_path_factory.mktemp("lti-attacks"), lti_vault, platforms, TARGETS
    ) as running:
        yield running


def refused(tool: LtiTool, answer: Any, reason: str) -> None:
    """Rejected, readable, nothing issued, audited with `reason`."""
    assert answer.status == 400, answer.body[:500]
    assert "text/html" in answer.headers["Content-Type"]
    assert "could not be verified" in answer.text or "expired" in answer.text
    assert SESSION_COOKIE not in answer.cookies
    assert "lti_ticket" not in answer.text
    rejected = [e for e in audit_events(tool.services, "sign_in") if e["outcome"] == "rejected"]
    assert rejected and rejected[-1]["data"]["idp"] == "lmsa"
    assert rejected[-1]["data"]["error"] == "invalid_request"
    assert reason in rejected[-1]["data"]["reason"], rejected[-1]["data"]["reason"]


def without(*claims: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda c: {k: v for k, v in c.items() if k not in claims}


def setting(**values: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda c: c | values


OTHER_PEM, _ = rsa_pem_pair()


@pytest.mark.parametrize(
    ("scenario", "reason"),
    [
        pytest.param(
            {"tamper": setting(**{CLAIM + "deployment_id": "deployment-unknown"})},
            "deployment_id",
            id="unknown-deployment",
        ),
        pytest.param({"tamper": setting(aud="another-tool")}, "InvalidAudience", id="wrong-aud"),
        pytest.param(
            {"tamper": lambda c: without("azp")(c) | {"aud": ["another-tool", "broker-at-atka"]}},
            "azp",
            id="aud-without-azp",
        ),
        pytest.param({"tamper": setting(azp="another-tool")}, "azp", id="azp-other-tool"),
        pytest.param({"sign_with": (OTHER_PEM, None)}, "InvalidSignature", id="other-key"),
        pytest.param({"alg_none": True}, "alg 'none'", id="alg-none"),
        pytest.param(
            {"tamper": setting(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)},
            "Expired",
            id="expired",
        ),
        pytest.param({"tamper": without("sub")}, "sub", id="missing-sub"),
        pytest.param({"tamper": without(CLAIM + "roles")}, "roles", id="missing-roles"),
        pytest.param({"tamper": without(CLAIM + "version")}, "version", id="missing-version"),
        pytest.param(
            {"tamper": without(CLAIM + "resource_link")}, "resource_link", id="missing-link"
        ),
        pytest.param(
            {"tamper": without(CLAIM + "target_link_uri")}, "target_link_uri", id="missing-target"
        ),
        pytest.param(
            {"tamper": setting(**{CLAIM + "message_type": "LtiSubmissionReviewRequest"})},
            "message_type",
            id="unsupported-message",
        ),
        pytest.param({"tamper": without("nonce")}, "nonce", id="missing-nonce"),
        pytest.param({"tamper": setting(iss="http://127.0.0.1:1/x")}, "Issuer", id="wrong-iss"),
    ],
)
async def test_tampered_launch_is_refused(
    tool: LtiTool, platforms: dict[str, LtiPlatform], scenario: dict[str, Any], reason: str
) -> None:
    lms = platforms["lmsa"]
    if scenario.get("sign_with"):
        scenario = scenario | {"sign_with": (scenario["sign_with"][0], lms.kid)}
    answer = await launch_through(tool, lms, Scenario(user_id="eve", roles=[LEARNER], **scenario))
    refused(tool, answer, reason)


async def test_launch_for_platform_a_signed_by_platform_b(
    tool: LtiTool, platforms: dict[str, LtiPlatform]
) -> None:
    """B's key (published in B's JWKS, which the broker also trusts for B) signs a token
    that claims to come from A: A's JWKS has no such key."""
    a, b = platforms["lmsa"], platforms["lmsb"]
    answer = await launch_through(
        tool, a, Scenario(user_id="eve", roles=[LEARNER], sign_with=(b.private_pem, b.kid))
    )
    refused(tool, answer, "no key")


async def test_platform_b_token_posted_to_platform_a(
    tool: LtiTool, platforms: dict[str, LtiPlatform]
) -> None:
    """A genuine launch of B (iss B, aud B's client id) replayed into a flow at A."""
    a, b = platforms["lmsa"], platforms["lmsb"]
    genuine = await launch_through(tool, b, Scenario(user_id="bo", roles=[LEARNER]))
    assert genuine.status == 200
    answer = await launch_through(
        tool, a, Scenario(user_id="eve", roles=[LEARNER]), id_token=b.id_tokens[-1]
    )
    refused(tool, answer, "no key")


async def test_replayed_id_token(tool: LtiTool, platforms: dict[str, LtiPlatform]) -> None:
    lms = platforms["lmsa"]
    first = await launch_through(tool, lms, Scenario(user_id="ada", roles=[LEARNER]))
    assert first.status == 200
    answer = await launch_through(
        tool, lms, Scenario(user_id="ada", roles=[LEARNER]), id_token=lms.id_tokens[-1]
    )
    refused(tool, answer, "id_token replayed")


async def test_replayed_nonce(tool: LtiTool, platforms: dict[str, LtiPlatform]) -> None:
    """A freshly signed token (new iat, so a new id_token) that reuses a consumed nonce."""
    lms = platforms["lmsa"]
    first = await launch_through(tool, lms, Scenario(user_id="ada", roles=[LEARNER]))
    assert first.status == 200
    used = lms.auth_requests[-1]["nonce"]
    answer = await launch_through(
        tool, lms, Scenario(user_id="ada", roles=[LEARNER], tamper=setting(nonce=used, jti="new"))
    )
    refused(tool, answer, "nonce replayed")


async def test_launch_without_the_login_of_this_browser(
    tool: LtiTool, platforms: dict[str, LtiPlatform]
) -> None:
    """A captured (id_token, state) posted from another browser: no flow cookie, no hand-off."""
    lms = platforms["lmsa"]
    answer = await tool.client.post(
        "/lti/lmsa/launch",
        data={"id_token": "x.y.z", "state": "not-a-flow"},
        headers={"Accept": "text/html"},
    )
    refused(tool, answer, "no LTI login of this browser")
    assert lms.errors == []
