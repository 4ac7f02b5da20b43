"""LTI 1.3 launches against a platform built on the `lti1p3platform` library
(tests/peers/lti_platform.py): a resource-link launch through the cross-site hand-off that ends
signed in with a launch ticket for the launcher, a Deep Linking round trip whose response the
platform verifies, and an NRPS call made with a client-credentials assertion the platform
verifies against the tool's JWKS."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
import pytest_asyncio

from broker.sessions import FLOW_COOKIE, SESSION_COOKIE
from tests.peers.broker import audit_events
from tests.peers.lti_platform import (
    INSTRUCTOR,
    LEARNER,
    STUDENT,
    TEACHING_ASSISTANT,
    LtiPlatform,
    LtiPlatforms,
    LtiTool,
    Member,
    Scenario,
    launch_form,
    launch_through,
    run_lti_tool,
)

LAUNCHER = "http://127.0.0.1:9"  # never contacted: the broker only posts the browser there
TARGETS = [f"{LAUNCHER}/v2/gh/course/week1/HEAD", f"{LAUNCHER}/v2/gh/course/week2/HEAD"]


@pytest_asyncio.fixture(scope="module")
async def lms(lti_platforms: LtiPlatforms) -> LtiPlatform:
    platform = lti_platforms.start("lmsa")
    platform.roster["course-101"] = [
        Member("ada", "Ada Lovelace", [LEARNER]),
        Member("bob", "Bob Babbage", [LEARNER]),
        Member("prof", "Grace Hopper", [INSTRUCTOR]),
        Member("cy", "Cy Never", [LEARNER]),
    ]
    return platform


@pytest_asyncio.fixture(scope="module")
async def tool(
    tmp_path_factory: pytest.TempPathFactory, lti_vault: tuple[Any, Any], lms: LtiPlatform
) -> AsyncIterator[LtiTool]:
    async with run_lti_tool(
        tmp_path_factory.mktemp("lti"), lti_vault, {"lmsa": lms}, TARGETS
    ) as running:
        yield running


async def broker_jwks(tool: LtiTool) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{tool.url}/lti/jwks") as resp:
        assert resp.status == 200
        document: dict[str, Any] = await resp.json()
        return document


async def verify_ticket(tool: LtiTool, ticket: str, audience: str) -> dict[str, Any]:
    """What a launcher does: check the ticket against the broker's published keys."""
    keys = {k.key_id: k for k in jwt.PyJWKSet.from_dict(await broker_jwks(tool)).keys}
    header = jwt.get_unverified_header(ticket)
    claims: dict[str, Any] = jwt.decode(
        ticket,
        keys[header["kid"]],
        algorithms=[header["alg"]],
        audience=audience,
        issuer=tool.url,
        options={"require": ["iss", "aud", "exp", "iat", "sub", "jti"]},
    )
    return claims


async def test_tool_jwks_is_the_rs256_key_ring(tool: LtiTool) -> None:
    response = await tool.client.get("/lti/jwks")
    assert response.status == 200
    keys = response.json()["keys"]
    assert keys and all(k["alg"] == "RS256" and k["kty"] == "RSA" for k in keys)
    assert response.body == (await tool.client.get("/jwks.json")).body


async def test_resource_link_launch_signs_in_and_posts_a_ticket(
    tool: LtiTool, lms: LtiPlatform
) -> None:
    scenario = Scenario(
        user_id="ada",
        roles=[LEARNER, STUDENT],
        name="Ada Lovelace",
        email="ada@uni.example.edu",
        target=TARGETS[1],
        custom={"repo": "course/week2", "urlpath": "lab/tree/intro.ipynb"},
    )
    answer = await launch_through(tool, lms, scenario)
    assert answer.status == 200, answer.text
    assert not lms.errors, lms.errors
    # The platform was asked exactly as LTI requires (checked by the platform, shown here).
    asked = lms.auth_requests[-1]
    assert asked["client_id"] == lms.client_id and asked["lti_message_hint"]
    action, fields = launch_form(answer.text)
    assert action == TARGETS[1]  # the allowed target, exactly
    assert set(fields) == {"lti_ticket"}
    assert "form-action 'self' http://127.0.0.1:9" in answer.headers["Content-Security-Policy"]
    ticket = await verify_ticket(tool, fields["lti_ticket"], audience=LAUNCHER)
    assert ticket["target_link_uri"] == TARGETS[1]
    assert ticket["exp"] - ticket["iat"] == 60
    assert ticket["lti"]["custom"] == scenario.custom
    assert ticket["lti"]["context"] == {"id": "course-101", "title": "Data Science 101"}
    assert ticket["lti"]["resource_link"]["id"] == "link-1"
    assert ticket["lti"]["roles"] == ["Learner"]
    # Signed in at the broker: the session cookie is set, the flow cookie cleared.
    assert answer.cookies.get(SESSION_COOKIE)
    assert answer.cookies.get(FLOW_COOKIE) == ""
    session = await tool.services.sessions.load(answer.cookies[SESSION_COOKIE])
    assert session is not None
    principal = session.principal
    assert principal.issuer == lms.issuer and principal.subject == "ada"
    assert principal.id == ticket["sub"]
    assert principal.display_name == "Ada Lovelace" and principal.email == "ada@uni.example.edu"
    assert set(principal.groups) == {
        "lti:lmsa:course-101",
        "lti:lmsa:course-101#Learner",
        "lti:lmsa#Student",
    }
    assert principal.claims["lti_context_title"] == "Data Science 101"
    events = audit_events(tool.services)
    assert any(e["event"] == "sign_in" and e["outcome"] == "success" for e in events)
    launch = [e for e in events if e["event"] == "lti.launch"][-1]
    assert launch["data"]["context"] == "course-101" and launch["data"]["target"] == TARGETS[1]


async def test_same_site_post_needs_no_handoff(tool: LtiTool, lms: LtiPlatform) -> None:
    answer = await launch_through(
        tool, lms, Scenario(user_id="bob", roles=[LEARNER]), cross_site=False
    )
    assert answer.status == 200 and answer.cookies.get(SESSION_COOKIE)
    assert launch_form(answer.text)[0] == TARGETS[0]


async def test_deep_linking_round_trip(tool: LtiTool, lms: LtiPlatform) -> None:
    """The instructor picks a notebook; the platform verifies the signed response (signature
    via the tool JWKS, iss = client id, aud = platform, deployment, nonce, its data back) and
    stores the ltiResourceLink; a launch of that link lands on the chosen notebook."""
    picker = await launch_through(
        tool, lms, Scenario(user_id="prof", roles=[INSTRUCTOR], deep_linking=True)
    )
    assert picker.status == 200, picker.text
    assert "Place a notebook link" in picker.text and "Data Science 101" in picker.text
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', picker.text))
    chosen = await tool.client.post(
        "/lti/lmsa/deep-link",
        data={"request": fields["request"], "csrf": fields["csrf"], "target": TARGETS[1]},
        headers={"Accept": "text/html"},
    )
    assert chosen.status == 200, chosen.text
    action, response = launch_form(chosen.text)
    assert action == f"{lms.url}/deep_link_return" and set(response) == {"JWT"}
    header = jwt.get_unverified_header(response["JWT"])
    assert header["alg"] == "RS256"
    async with (
        aiohttp.ClientSession() as http,
        http.post(action, data=response) as placed,
    ):
        assert placed.status == 200, lms.errors
    assert lms.deep_link_items[-1] == {
        "type": "ltiResourceLink",
        "title": "Notebook 2",
        "url": TARGETS[1],
    }
    # The form is single use.
    again = await tool.client.post(
        "/lti/lmsa/deep-link",
        data={"request": fields["request"], "csrf": fields["csrf"], "target": TARGETS[1]},
        headers={"Accept": "text/html"},
    )
    assert again.status == 400
    # A student launches the placed link.
    placed_url = lms.deep_link_items[-1]["url"]
    answer = await launch_through(
        tool, lms, Scenario(user_id="ada", roles=[LEARNER], target=placed_url)
    )
    assert answer.status == 200 and launch_form(answer.text)[0] == placed_url
    assert any(e["event"] == "lti.deep_link" for e in audit_events(tool.services))


async def test_deep_link_target_must_be_allowed(tool: LtiTool, lms: LtiPlatform) -> None:
    picker = await launch_through(
        tool, lms, Scenario(user_id="prof", roles=[INSTRUCTOR], deep_linking=True)
    )
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', picker.text))
    chosen = await tool.client.post(
        "/lti/lmsa/deep-link",
        data={
            "request": fields["request"],
            "csrf": fields["csrf"],
            "target": "https://evil.example",
        },
        headers={"Accept": "text/html"},
    )
    assert chosen.status == 400 and "JWT" not in chosen.text


async def test_instructor_sees_who_launched_through_nrps(tool: LtiTool, lms: LtiPlatform) -> None:
    for user in ("ada", "bob"):
        learner = await launch_through(tool, lms, Scenario(user_id=user, roles=[LEARNER]))
        assert learner.status == 200
    # A learner may not see the list.
    denied = await tool.client.get(
        "/lti/lmsa/members",
        params={"context": "course-101"},
        headers={"Accept": "application/json"},
    )
    assert denied.status == 403 and denied.json()["error"] == "access_denied"
    teacher = await launch_through(
        tool, lms, Scenario(user_id="ta", roles=[INSTRUCTOR, TEACHING_ASSISTANT])
    )
    assert teacher.status == 200
    tokens_before = len(lms.token_requests)
    listed = await tool.client.get(
        "/lti/lmsa/members",
        params={"context": "course-101"},
        headers={"Accept": "application/json"},
    )
    assert listed.status == 200, listed.text
    assert not lms.errors, lms.errors
    body = listed.json()
    by_id = {m["user_id"]: m for m in body["members"]}
    assert set(by_id) == {"ada", "bob", "prof", "cy"}
    assert by_id["ada"]["launched"] and by_id["bob"]["launched"]
    assert not by_id["cy"]["launched"] and by_id["cy"]["last_launch"] is None
    assert by_id["prof"]["roles"] == ["Instructor"] and by_id["ada"]["name"] == "Ada Lovelace"
    assert body["launched"] == sum(1 for m in body["members"] if m["launched"]) >= 2
    # One client-credentials request, with an assertion the platform verified.
    assert len(lms.token_requests) == tokens_before + 1
    request = lms.token_requests[-1]
    assert request["grant_type"] == "client_credentials"
    assert request["scope"].endswith("contextmembership.readonly")
    assertion = jwt.decode(request["client_assertion"], options={"verify_signature": False})
    assert assertion["sub"] == lms.client_id and assertion["aud"] == lms.token_url
    assert assertion["iss"] == tool.url
    # The HTML page for a browser, and the platform token reused.
    page = await tool.client.get(
        "/lti/lmsa/members", params={"context": "course-101"}, headers={"Accept": "text/html"}
    )
    assert page.status == 200 and "of 4 course members have launched" in page.text
    assert len(lms.token_requests) == tokens_before + 1


async def test_the_chooser_refuses_to_begin_an_lti_sign_in(tool: LtiTool) -> None:
    page = await tool.client.get("/login", params={"idp": "lmsa"}, headers={"Accept": "text/html"})
    assert page.status == 400
    assert "starts in your course" in page.text
    chooser = await tool.client.get("/login", headers={"Accept": "text/html"})
    assert "idp=lmsa" not in chooser.text  # never offered: launches start in the course


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        pytest.param({"iss": "https://other.example"}, "iss", id="unknown-issuer"),
        pytest.param(
            {"target_link_uri": "https://evil.example/"}, "target_link_uri", id="open-redirect"
        ),
        pytest.param({"lti_deployment_id": "deployment-x"}, "deployment", id="unknown-deployment"),
        pytest.param({"client_id": "someone-else"}, "client_id", id="other-client"),
        pytest.param({"login_hint": ""}, "login_hint", id="no-login-hint"),
    ],
)
async def test_login_initiation_refusals(
    tool: LtiTool, lms: LtiPlatform, change: dict[str, str], reason: str
) -> None:
    params = {
        "iss": lms.issuer,
        "login_hint": "ada",
        "target_link_uri": TARGETS[0],
        "client_id": lms.client_id,
        "lti_deployment_id": lms.deployment_id,
    } | change
    answer = await tool.client.get(
        "/lti/lmsa/login", params=params, headers={"Accept": "text/html"}
    )
    assert answer.status == 400
    assert FLOW_COOKIE not in answer.cookies and "Location" not in answer.headers
    rejected = [e for e in audit_events(tool.services, "sign_in") if e["outcome"] == "rejected"]
    assert reason in rejected[-1]["data"]["reason"]
