"""Attacks on the OIDC upstream adapter through the broker's sign-in callback.

Two hostile OPs (tests/peers/rogue_op.py) stand in where a certified OP would refuse to
misbehave. Each case asserts: a 4xx HTML error page with the request id and no stack trace,
no session cookie, no new successful `sign_in` audit record, and a `sign_in` "rejected"
record naming the upstream and the failed check.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from adapters.errors import InvalidToken
from adapters.jwks import JwksCache
from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault
from broker.services import Services
from broker.sessions import SESSION_COOKIE
from tests.peers.broker import Checked, ContractClient, audit_events, make_settings, start_broker
from tests.peers.rogue_op import RogueOp

PUBLIC = "http://127.0.0.1:8080"
SECRET_A = "rogue-a-secret-0123456789"


def callback(upstream: str) -> str:
    return f"{PUBLIC}/login/{upstream}/callback"


@pytest_asyncio.fixture(scope="module")
async def rogues() -> AsyncIterator[tuple[RogueOp, RogueOp]]:
    a = await RogueOp.start("broker-a", SECRET_A, [callback("rogue-a")])
    b = await RogueOp.start("broker-b", None, [callback("rogue-b")])
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


def upstream_for(op: RogueOp, id: str, secret: str | None) -> dict[str, Any]:
    """The `[[upstreams]]` entry for one rogue OP."""
    entry: dict[str, Any] = {
        "type": "oidc", "id": id, "display_name": id, "issuer": op.issuer,
        "client_id": op.client_id, "scopes": ["openid", "profile", "email"],
        "id_token_algs": ["RS256"],
    }  # fmt: skip
    return entry | ({"client_secret": secret} if secret else {})


@dataclass
class Scene:
    svc: Services
    client: ContractClient
    a: RogueOp
    b: RogueOp


@pytest_asyncio.fixture
async def scene(
    tmp_path: Path,
    openbao: DevVault,
    vault_approle: AppRoleAuth,
    rogues: tuple[RogueOp, RogueOp],
) -> AsyncIterator[Scene]:
    a, b = rogues
    a.reset()
    b.reset()
    upstreams = [upstream_for(a, "rogue-a", SECRET_A), upstream_for(b, "rogue-b", None)]
    settings = make_settings(
        tmp_path, openbao.address, vault_approle, mode="production", upstreams=upstreams
    )
    svc = await start_broker(settings, dev_mode=False)
    try:
        async with TestClient(TestServer(app_with_services(svc))) as raw:
            yield Scene(svc, ContractClient(raw), a, b)
    finally:
        await svc.close()


async def at_op(scene: Scene, upstream: str) -> dict[str, str]:
    """Begin at the broker and let the OP answer; the callback parameters it sends back."""
    start = await scene.client.get(
        "/login", params={"idp": upstream}, headers={"Accept": "text/html"}
    )
    assert start.status == 302, start.text
    async with (
        aiohttp.ClientSession() as http,
        http.get(start.headers["Location"], allow_redirects=False) as answer,
    ):
        assert answer.status == 302, await answer.text()
        back = answer.headers["Location"]
    assert back.startswith(callback(upstream) + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(back).query).items()}


async def deliver(scene: Scene, upstream: str, params: dict[str, str]) -> Checked:
    return await scene.client.get(
        f"/login/{upstream}/callback?{urlencode(params)}", headers={"Accept": "text/html"}
    )


def forge(mutate: Callable[[dict[str, Any]], None]) -> Callable[[Scene], None]:
    """rogue-a signs honestly with its published key, but over mutated claims."""

    def setup(scene: Scene) -> None:
        def craft(claims: dict[str, Any], header: dict[str, Any]) -> str:
            mutate(claims)
            return scene.a.sign(claims)

        scene.a.craft = craft

    return setup


def with_craft(make: Callable[[Scene, dict[str, Any]], str]) -> Callable[[Scene], None]:
    def setup(scene: Scene) -> None:
        scene.a.craft = lambda claims, header: make(scene, claims)

    return setup


def set_error(scene: Scene) -> None:
    scene.a.error = "access_denied"


async def honest(scene: Scene) -> dict[str, str]:
    return await at_op(scene, "rogue-a")


async def state_mismatch(scene: Scene) -> dict[str, str]:
    # The broker finds the flow by `flow`; the OP's `state` must still be that flow's id.
    params = await at_op(scene, "rogue-a")
    return params | {"flow": params["state"], "state": "attacker-chosen-state"}


async def iss_of_other_op(scene: Scene) -> dict[str, str]:
    return await at_op(scene, "rogue-a") | {"iss": scene.b.issuer}


async def code_of_other_op(scene: Scene) -> dict[str, str]:
    from_b = await at_op(scene, "rogue-b")  # the victim's code at B
    at_a = await at_op(scene, "rogue-a")  # the flow the browser now has, at A
    return at_a | {"code": from_b["code"]}


async def replayed_nonce(scene: Scene) -> dict[str, str]:
    # A whole sign-in succeeds in another browser; its ID token is then replayed.
    async with TestClient(TestServer(app_with_services(scene.svc))) as other:
        params = await at_op(Scene(scene.svc, ContractClient(other), scene.a, scene.b), "rogue-a")
        ok = await ContractClient(other).get(
            f"/login/rogue-a/callback?{urlencode(params)}", headers={"Accept": "text/html"}
        )
        assert ok.status == 303, ok.text
    captured = scene.a.issued_id_tokens[-1]
    scene.a.craft = lambda claims, header: captured
    return await at_op(scene, "rogue-a")


def now() -> int:
    return int(time.time())


Setup = Callable[[Scene], None]
Attack = Callable[[Scene], Awaitable[dict[str, str]]]


def nothing(scene: Scene) -> None:
    return None


CASES = [
    pytest.param(
        forge(lambda c: c.update(iss="https://evil.example")), honest, 400,
        "InvalidIssuerError", id="wrong-iss",
    ),
    pytest.param(
        forge(lambda c: c.update(aud="some-other-client")), honest, 400,
        "InvalidAudienceError", id="wrong-aud",
    ),
    pytest.param(
        forge(lambda c: c.update(aud=["broker-a", "other-rp"], azp="other-rp")), honest, 400,
        "azp", id="azp-mismatch",
    ),
    pytest.param(
        forge(lambda c: c.update(nonce="attacker-nonce")), honest, 400, "nonce",
        id="nonce-mismatch",
    ),
    pytest.param(nothing, replayed_nonce, 400, "nonce", id="nonce-replayed"),
    pytest.param(nothing, state_mismatch, 400, "state", id="state-mismatch"),
    pytest.param(
        with_craft(lambda s, c: RogueOp.unsigned(c, {"kid": s.a.kid})), honest, 400,
        "alg 'none'", id="alg-none",
    ),
    pytest.param(
        with_craft(lambda s, c: s.a.hs256_with_public_key(c)), honest, 400, "alg 'HS256'",
        id="hs256-with-public-key",
    ),
    pytest.param(
        with_craft(lambda s, c: s.a.sign(c, alg="RS512")), honest, 400, "alg 'RS512'",
        id="alg-not-allowed",
    ),
    pytest.param(
        with_craft(lambda s, c: s.a.sign(c, kid="not-published", key=s.a.stray_key)), honest,
        400, "not-published", id="unknown-kid",
    ),
    pytest.param(
        forge(lambda c: c.update(iat=now() - 7200, exp=now() - 3600)), honest, 400,
        "ExpiredSignatureError", id="expired",
    ),
    pytest.param(
        forge(lambda c: c.update(iat=now() + 3600, exp=now() + 7200)), honest, 400,
        "ImmatureSignatureError", id="iat-in-future",
    ),
    pytest.param(nothing, iss_of_other_op, 400, "mix-up", id="mix-up-iss-param"),
    pytest.param(
        nothing, code_of_other_op, 400, "invalid_grant", id="mix-up-code-to-other-upstream"
    ),
    pytest.param(set_error, honest, 403, "access_denied", id="op-error-response"),
]  # fmt: skip


@pytest.mark.parametrize(("setup", "attack", "status", "reason"), CASES)
async def test_oidc_attack_is_rejected_and_nothing_issued(
    scene: Scene, setup: Setup, attack: Attack, status: int, reason: str
) -> None:
    setup(scene)
    params = await attack(scene)
    before = len(audit_events(scene.svc, "sign_in"))
    response = await deliver(scene, "rogue-a", params)

    assert response.status == status, response.text
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.headers["X-Request-Id"] in response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    assert SESSION_COOKIE not in response.cookies
    assert "Location" not in response.headers
    new = audit_events(scene.svc, "sign_in")[before:]
    assert [e for e in new if e["outcome"] == "success"] == []
    rejected = [e for e in new if e["outcome"] == "rejected"]
    assert len(rejected) == 1, new
    assert rejected[0]["data"]["idp"] == "rogue-a"
    assert rejected[0]["data"]["error"] == ("access_denied" if status == 403 else "invalid_request")
    assert reason in rejected[0]["data"]["reason"], rejected[0]["data"]
    # No token of the OP's shows up in what the user sees or in the audit trail.
    for token in scene.a.issued_id_tokens[-1:]:
        assert token not in response.text and token not in str(rejected[0])


async def test_honest_rogue_sign_in_works(scene: Scene) -> None:
    """The control case: the same harness with untampered answers signs in."""
    params = await at_op(scene, "rogue-a")
    response = await deliver(scene, "rogue-a", params)
    assert response.status == 303, response.text
    assert SESSION_COOKIE in response.cookies
    [record] = audit_events(scene.svc, "sign_in")
    assert record["outcome"] == "success" and record["data"]["idp"] == "rogue-a"


async def test_unknown_kids_refetch_the_key_set_at_most_once_per_interval(
    scene: Scene,
) -> None:
    """Tokens with made-up kids must not let an attacker drive traffic to the OP."""
    async with aiohttp.ClientSession() as http:
        jwks = JwksCache(http, f"{scene.a.issuer}/jwks", min_refresh=3600)
        hits = scene.a.jwks_hits
        await jwks.key_for(scene.a.kid, "RS256")
        for n in range(5):
            with pytest.raises(InvalidToken):
                await jwks.key_for(f"made-up-{n}", "RS256")
        with pytest.raises(InvalidToken):
            await jwks.key_for(scene.a.kid, "ES256")  # a published kid, but an RSA key
    assert scene.a.jwks_hits - hits == 1
