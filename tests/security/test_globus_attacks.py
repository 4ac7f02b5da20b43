"""Attacks on the Globus upstream through the broker's sign-in callback, with globus-sdk talking
to the stand-in Globus Auth (tests/peers/globus_auth.py) scripted to misbehave.

Each case asserts: the refusal (status, and the error code in the `sign_in` "rejected" audit
record), no session cookie, no successful sign-in, and no Globus token stored in Vault.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from adapters.base import principal_id
from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault
from broker.services import Services
from broker.sessions import SESSION_COOKIE
from tests.integration.test_globus_upstream import CALLBACK, at_globus, callback, globus_broker
from tests.peers.broker import Checked, ContractClient, audit_events
from tests.peers.globus_auth import GlobusAuthStandIn, ada

Scene = tuple[Services, ContractClient, GlobusAuthStandIn]


@pytest_asyncio.fixture
async def scene(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth, globus_auth: GlobusAuthStandIn
) -> AsyncIterator[Scene]:
    globus_auth.redirect_uris.append(CALLBACK)
    globus_auth.login_as(ada())
    svc = await globus_broker(tmp_path, openbao, vault_approle)
    try:
        async with TestClient(TestServer(app_with_services(svc))) as raw:
            yield svc, ContractClient(raw), globus_auth
    finally:
        await svc.close()


async def start(client: ContractClient) -> str:
    begun = await client.get("/login", params={"idp": "globus"}, headers={"Accept": "text/html"})
    assert begun.status == 302, begun.text
    return begun.headers["Location"]


def assert_refused(svc: Services, response: Checked, status: int, error: str) -> None:
    assert response.status == status, response.text
    assert SESSION_COOKIE not in response.cookies
    assert "Traceback" not in response.text
    records = audit_events(svc, "sign_in")
    assert [r["outcome"] for r in records] == ["rejected"], records
    assert records[0]["data"]["error"] == error and records[0]["data"]["idp"] == "globus"


async def stored_for_ada(svc: Services, scene_globus: GlobusAuthStandIn) -> bool:
    account = scene_globus.account
    assert account is not None
    pid = principal_id(scene_globus.issuer, account.primary.id)
    path = f"{svc.settings.vault.prefix}/upstream-tokens/globus/{pid}"
    return await svc.vault.kv_read(path) is not None


def _id_token(**overrides: Any) -> Callable[[GlobusAuthStandIn], None]:
    def script(globus: GlobusAuthStandIn) -> None:
        globus.id_token_overrides.update(overrides)

    return script


def _rogue_key(globus: GlobusAuthStandIn) -> None:
    globus.sign_with_rogue_key = True


def _unsigned(globus: GlobusAuthStandIn) -> None:
    globus.unsigned_id_token = True


def _expired(globus: GlobusAuthStandIn) -> None:
    globus.id_token_overrides.update(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)


def _token_error(status: int, body: dict[str, Any]) -> Callable[[GlobusAuthStandIn], None]:
    def script(globus: GlobusAuthStandIn) -> None:
        globus.token_error = (status, body)

    return script


def _authorize_error(globus: GlobusAuthStandIn) -> None:
    globus.authorize_error = "access_denied"


@pytest.mark.parametrize(
    ("script", "status", "error", "reason"),
    [
        pytest.param(
            _id_token(iss="https://auth.globus.org"), 400, "invalid_request", "id_token iss",
            id="id-token-issuer",
        ),
        pytest.param(
            _id_token(aud="another-client"), 400, "invalid_request", "InvalidAudienceError",
            id="id-token-aud",
        ),
        pytest.param(
            _rogue_key, 400, "invalid_request", "InvalidSignatureError",
            id="id-token-signed-by-another-key",
        ),
        pytest.param(_unsigned, 400, "invalid_request", "alg 'none'", id="id-token-alg-none"),
        pytest.param(
            _expired, 400, "invalid_request", "ExpiredSignatureError", id="id-token-expired"
        ),
        pytest.param(
            _token_error(400, {"error": "invalid_grant"}), 400, "invalid_request",
            "code exchange: HTTP 400", id="token-endpoint-refuses",
        ),
        pytest.param(
            _token_error(503, {"error": "temporarily_unavailable"}), 503,
            "temporarily_unavailable", "code exchange: HTTP 503", id="token-endpoint-down",
        ),
        pytest.param(
            _authorize_error, 403, "access_denied", "Globus error access_denied",
            id="authorize-access-denied",
        ),
    ],
)  # fmt: skip
async def test_hostile_globus_answer_is_rejected_and_nothing_issued(
    scene: Scene,
    script: Callable[[GlobusAuthStandIn], None],
    status: int,
    error: str,
    reason: str,
) -> None:
    svc, client, globus = scene
    script(globus)
    back = await at_globus(await start(client))
    response = await callback(client, back)
    assert_refused(svc, response, status, error)
    assert reason in audit_events(svc, "sign_in")[0]["data"]["reason"]
    assert not await stored_for_ada(svc, globus)


async def test_state_mismatch_is_rejected(scene: Scene) -> None:
    svc, client, globus = scene
    back = await at_globus(await start(client))
    parts = urlsplit(back)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query["state"] = "forged-" + query["state"]
    response = await client.get(f"{parts.path}?{urlencode(query)}", headers={"Accept": "text/html"})
    assert_refused(svc, response, 400, "invalid_request")
    assert "dependent" not in " ".join(globus.grants) and globus.grants == []
    assert not await stored_for_ada(svc, globus)


async def test_replayed_code_is_rejected(scene: Scene) -> None:
    """A code already exchanged, presented again in a fresh flow of the same browser: the
    state is right, but Globus refuses the code (single use), so nothing is issued."""
    svc, client, globus = scene
    first = await callback(client, await at_globus(await start(client)))
    assert first.status == 303 and SESSION_COOKIE in first.cookies, first.text
    replay_url = await at_globus(await start(client))
    fresh_state = parse_qs(urlsplit(replay_url).query)["state"][0]
    old = parse_qs(urlsplit(globus.callbacks[0]).query)
    forged = f"{CALLBACK}?{urlencode({'code': old['code'][0], 'state': fresh_state})}"
    before = len(audit_events(svc, "sign_in"))
    grants_before = list(globus.grants)
    response = await callback(client, forged)
    assert response.status == 400, response.text
    assert SESSION_COOKIE not in response.cookies
    [record] = audit_events(svc, "sign_in")[before:]
    assert record["outcome"] == "rejected" and record["data"]["error"] == "invalid_request"
    assert globus.grants[len(grants_before) :] == ["authorization_code"]  # refused there


async def test_endless_session_requirements_stop_after_two_reauthentications(
    scene: Scene,
) -> None:
    """Globus keeps asking for MFA the user cannot give: two round trips, then a refusal."""
    svc, client, globus = scene
    globus.require_mfa_for_dependent = True
    globus.mfa_never_satisfied = True
    response = await callback(client, await at_globus(await start(client)))
    for _ in range(2):
        assert response.status == 303, response.text
        assert response.headers["Location"].startswith(globus.base)
        response = await callback(client, await at_globus(response.headers["Location"]))
    assert response.status == 403, response.text
    assert SESSION_COOKIE not in response.cookies
    records = audit_events(svc, "sign_in")
    assert [r["outcome"] for r in records] == ["step_up", "step_up", "rejected"]
    assert records[-1]["data"]["error"] == "access_denied"
    assert not await stored_for_ada(svc, globus)
