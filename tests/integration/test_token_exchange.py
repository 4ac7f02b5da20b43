"""RFC 8693 token exchange at `/oauth/token`, against a broker on real OpenBao, and against a
second broker running as a separate `broker serve` process on its own OpenBao (a peer binder
deployment whose tokens the first broker trusts through its discovery document and JWKS).

Every refusal is checked for its RFC 8693 §2.2.2 error code, for not echoing the token, and
for having issued nothing (no new `token.issued` audit record).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
import pytest
import pytest_asyncio
import tomli_w
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from adapters.base import Principal, principal_id
from adapters.upstream.dev import DEV_ISSUER
from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault, provision
from broker.errors import UpstreamFailed
from broker.oauth.bearer import revoke_access_token
from broker.oauth.clients import hash_secret
from broker.oauth.exchange import peer_principal
from broker.oauth.issuance import (
    ACCESS_TOKEN_TYPE,
    ID_TOKEN_TYPE,
    JWT_TOKEN_TYPE,
    Issued,
    TokenRequest,
    issue,
    load_principal,
    remember_principal,
)
from broker.oauth.peers import PeerKeys, verify_peer_token
from broker.services import Services
from broker.settings import TrustedIssuerConfig
from tests.peers.broker import Checked, ContractClient, make_settings, start_broker

ISSUER = "http://127.0.0.1:8080"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
AUD_A = "https://launcher-a.example.org"
AUD_B = "https://launcher-b.example.org"
AUD_OUTSIDE = "https://not-this-clients.example.org"
# The audience peer tokens must carry to be accepted by the first broker.
TRUSTED_AUD = "https://broker-one.example.org/peer-exchange"
SCOPES = ["openid", "profile", "email", "groups", "launch:aws", "repo:read"]
SECRETS = {
    "launcher": "launcher-secret-0123456789abcdefghij",
    "plain": "plain-secret-0123456789abcdefghijklm",
    "peer-launcher": "peer-launcher-secret-0123456789abcd",
    "peer-agent": "peer-agent-secret-0123456789abcdefg",
    "peer-elsewhere": "peer-elsewhere-secret-0123456789abc",
}
_HASHES = {name: hash_secret(secret) for name, secret in SECRETS.items()}
BROKER = str(Path(sys.executable).with_name("broker"))


def client_configs() -> list[dict[str, Any]]:
    """launcher: may exchange, two audiences; plain: client_credentials only."""
    return [
        {"client_id": "launcher", "secret_hash": _HASHES["launcher"],
         "grant_types": [EXCHANGE, "client_credentials"], "scopes": SCOPES,
         "audiences": [AUD_A, AUD_B]},
        {"client_id": "plain", "secret_hash": _HASHES["plain"],
         "grant_types": ["client_credentials"], "scopes": SCOPES, "audiences": [AUD_A]},
    ]  # fmt: skip


@dataclass
class Broker:
    svc: Services
    api: ContractClient


@asynccontextmanager
async def serving(
    tmp_path: Path, openbao: DevVault, approle: AppRoleAuth, trusted: Sequence[dict[str, Any]] = ()
) -> AsyncIterator[Broker]:
    """The first broker (on the shared OpenBao) with `trusted` as its trusted issuers."""
    settings = make_settings(
        tmp_path, openbao.address, approle, clients=client_configs(), trusted_issuers=list(trusted)
    )
    svc = await start_broker(settings)
    try:
        async with TestClient(TestServer(app_with_services(svc))) as raw:
            yield Broker(svc, ContractClient(raw))
    finally:
        await svc.close()


@pytest_asyncio.fixture
async def one(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[Broker]:
    async with serving(tmp_path, openbao, vault_approle) as broker:
        yield broker


def basic(client_id: str) -> dict[str, str]:
    value = f"{client_id}:{SECRETS[client_id]}".encode()
    return {"Authorization": "Basic " + base64.b64encode(value).decode()}


def person(subject: str) -> Principal:
    return Principal(
        idp="dev", issuer=DEV_ISSUER, subject=subject, display_name=subject.title(),
        email=f"{subject}@example.edu", groups=("staff",), auth_time=1_700_000_000,
    )  # fmt: skip


async def user_tokens(
    svc: Services,
    principal: Principal,
    *,
    client_id: str = "launcher",
    scopes: Sequence[str] = ("openid", "profile", "launch:aws", "repo:read"),
    audience: Sequence[str] = (AUD_A, AUD_B),
) -> Issued:
    """A user's tokens through `issuance.issue`, as the authorization_code grant gets them."""
    await remember_principal(svc, principal)
    client = await svc.oauth.clients.get(client_id)
    assert client is not None
    request = TokenRequest(
        grant_type="authorization_code", client=client, principal=principal,
        scopes=list(scopes), audience=list(audience),
    )  # fmt: skip
    return await issue(svc, request)


async def exchange(
    api: ContractClient,
    subject_token: str,
    subject_type: str = ACCESS_TOKEN_TYPE,
    *,
    client_id: str = "launcher",
    **params: str,
) -> Checked:
    data = {"grant_type": EXCHANGE, "subject_token": subject_token,
            "subject_token_type": subject_type, **params}  # fmt: skip
    return await api.post("/oauth/token", data=data, headers=basic(client_id))


async def issued_count(svc: Services) -> int:
    await svc.audit.flush()
    path = Path(svc.settings.audit.path)
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    return sum(1 for line in lines if line.strip() and json.loads(line)["event"] == "token.issued")


def last_issued(svc: Services) -> dict[str, Any]:
    lines = Path(svc.settings.audit.path).read_text().splitlines()
    records = [json.loads(x) for x in lines if x.strip()]
    found: dict[str, Any] = [r for r in records if r["event"] == "token.issued"][-1]
    return found


def assert_refused(response: Checked, error: str, *tokens: str) -> None:
    assert response.status == 400, response.text
    body = response.json()
    assert body["error"] == error, body
    assert response.headers["Cache-Control"] == "no-store"
    for token in tokens:
        assert token not in response.text
        assert token.split(".")[1] not in response.text  # not even the payload


# --- exchanging the broker's own tokens ------------------------------------------------------


async def test_a_user_token_is_narrowed_in_scope_and_audience(one: Broker) -> None:
    alice = person("alice")
    original = await user_tokens(one.svc, alice)
    token = original.body["access_token"]
    response = await exchange(one.api, token, scope="launch:aws", audience=AUD_B)
    assert response.status == 200, response.text
    body = response.json()
    assert body["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert body["token_type"] == "Bearer" and body["scope"] == "launch:aws"
    assert "refresh_token" not in body and "id_token" not in body
    claims = one.svc.tokens.verify(body["access_token"], audience=AUD_B)
    assert claims["sub"] == alice.id and claims["aud"] == [AUD_B]
    assert claims["scope"] == "launch:aws" and claims["client_id"] == "launcher"
    assert "act" not in claims
    record = last_issued(one.svc)
    assert record["data"]["grant_type"] == EXCHANGE and record["actor"] == alice.id
    assert record["data"]["subject_jti"] == original.jti
    assert record["data"]["subject_iss"] == ISSUER
    assert record["data"]["token_jti"] == claims["jti"]
    # The new token never outlives the one it was exchanged for.
    assert claims["exp"] <= one.svc.tokens.verify(token, audience=None)["exp"]

    # Without `scope`: what both the client and the subject token allow; `resource` works too.
    again = await exchange(one.api, token, resource=AUD_A)
    assert again.status == 200, again.text
    assert again.json()["scope"] == "openid profile launch:aws repo:read"
    assert one.svc.tokens.verify(again.json()["access_token"], audience=AUD_A)["aud"] == [AUD_A]


async def test_a_client_exchanges_its_own_client_credentials_token(one: Broker) -> None:
    response = await one.api.post(
        "/oauth/token", data={"grant_type": "client_credentials", "scope": "launch:aws repo:read"},
        headers=basic("launcher"),
    )  # fmt: skip
    assert response.status == 200, response.text
    own = response.json()["access_token"]
    exchanged = await exchange(one.api, own, scope="repo:read", audience=AUD_A)
    assert exchanged.status == 200, exchanged.text
    claims = one.svc.tokens.verify(exchanged.json()["access_token"], audience=AUD_A)
    assert claims["sub"] == "launcher" and claims["scope"] == "repo:read"


async def test_requested_token_types(one: Broker) -> None:
    bob = person("bob")
    original = await user_tokens(one.svc, bob)
    token = original.body["access_token"]

    as_jwt = await exchange(one.api, token, requested_token_type=JWT_TOKEN_TYPE, scope="profile")
    assert as_jwt.status == 200, as_jwt.text
    assert as_jwt.json()["issued_token_type"] == JWT_TOKEN_TYPE
    assert as_jwt.json()["token_type"] == "Bearer"
    assert one.svc.tokens.verify(as_jwt.json()["access_token"])["sub"] == bob.id

    as_id = await exchange(
        one.api, token, requested_token_type=ID_TOKEN_TYPE, scope="openid profile", audience=AUD_A
    )
    assert as_id.status == 200, as_id.text
    body = as_id.json()
    assert body["issued_token_type"] == ID_TOKEN_TYPE and body["token_type"] == "N_A"
    claims = one.svc.tokens.verify(body["access_token"], kind="id", audience=AUD_A)
    assert claims["sub"] == bob.id and claims["azp"] == "launcher" and claims["name"] == "Bob"
    with pytest.raises(Exception, match="expected type"):
        one.svc.tokens.verify(body["access_token"])  # an ID token is not an access token

    before = await issued_count(one.svc)
    for unsupported in ("urn:ietf:params:oauth:token-type:refresh_token", "urn:example:saml"):
        refused = await exchange(one.api, token, requested_token_type=unsupported)
        assert_refused(refused, "invalid_request", token)
    assert await issued_count(one.svc) == before


async def test_an_id_token_is_a_subject_token_for_the_identity_scopes(one: Broker) -> None:
    carol = person("carol")
    original = await user_tokens(one.svc, carol, scopes=("openid", "profile", "launch:aws"))
    id_token = original.body["id_token"]
    response = await exchange(one.api, id_token, ID_TOKEN_TYPE, audience=AUD_A)
    assert response.status == 200, response.text
    # An ID token carries no scope: it stands for who the user is, not for launch:aws.
    assert response.json()["scope"] == "openid profile email groups"
    claims = one.svc.tokens.verify(response.json()["access_token"], audience=AUD_A)
    assert claims["sub"] == carol.id

    before = await issued_count(one.svc)
    wider = await exchange(one.api, id_token, ID_TOKEN_TYPE, scope="launch:aws")
    assert_refused(wider, "invalid_scope", id_token)
    # Each token passes only as the type it is.
    as_access = await exchange(one.api, id_token, ACCESS_TOKEN_TYPE)
    assert_refused(as_access, "invalid_request", id_token)
    as_id = await exchange(one.api, original.body["access_token"], ID_TOKEN_TYPE)
    assert_refused(as_id, "invalid_request", original.body["access_token"])
    assert await issued_count(one.svc) == before


async def test_actor_tokens_nest_act_claims(one: Broker) -> None:
    alice, bob, carol = person("alice"), person("bob"), person("carol")
    subject = (await user_tokens(one.svc, alice)).body["access_token"]
    bob_token = (await user_tokens(one.svc, bob)).body["access_token"]
    carol_token = (await user_tokens(one.svc, carol)).body["access_token"]

    first = await exchange(
        one.api, subject, actor_token=bob_token, actor_token_type=ACCESS_TOKEN_TYPE
    )
    assert first.status == 200, first.text
    first_token = first.json()["access_token"]
    claims = one.svc.tokens.verify(first_token)
    assert claims["sub"] == alice.id
    assert claims["act"] == {"sub": bob.id, "iss": ISSUER}
    assert last_issued(one.svc)["data"]["actor_sub"] == bob.id

    second = await exchange(
        one.api, first_token, actor_token=carol_token, actor_token_type=JWT_TOKEN_TYPE
    )
    assert second.status == 200, second.text
    claims = one.svc.tokens.verify(second.json()["access_token"])
    assert claims["sub"] == alice.id
    assert claims["act"] == {"sub": carol.id, "iss": ISSUER, "act": {"sub": bob.id, "iss": ISSUER}}

    # Without an actor token the chain the subject token carries is kept, not dropped.
    kept = await exchange(one.api, first_token, scope="profile")
    assert kept.status == 200, kept.text
    assert one.svc.tokens.verify(kept.json()["access_token"])["act"] == claims["act"]["act"]


async def test_actor_token_and_type_go_together(one: Broker) -> None:
    subject = (await user_tokens(one.svc, person("alice"))).body["access_token"]
    actor = (await user_tokens(one.svc, person("bob"))).body["access_token"]
    before = await issued_count(one.svc)
    assert_refused(await exchange(one.api, subject, actor_token=actor), "invalid_request", actor)
    assert_refused(
        await exchange(one.api, subject, actor_token_type=ACCESS_TOKEN_TYPE), "invalid_request"
    )
    missing_type = await one.api.post(
        "/oauth/token", data={"grant_type": EXCHANGE, "subject_token": subject},
        headers=basic("launcher"),
    )  # fmt: skip
    assert_refused(missing_type, "invalid_request", subject)
    saml = await exchange(one.api, subject, "urn:ietf:params:oauth:token-type:saml2")
    assert_refused(saml, "invalid_request", subject)
    bad_actor = await exchange(
        one.api, subject, actor_token="not.a.token", actor_token_type=ACCESS_TOKEN_TYPE
    )
    assert_refused(bad_actor, "invalid_request")
    assert "actor_token" in bad_actor.json()["error_description"]
    assert await issued_count(one.svc) == before


async def test_scope_can_only_narrow(one: Broker) -> None:
    token = (await user_tokens(one.svc, person("dan"), scopes=("profile",))).body["access_token"]
    before = await issued_count(one.svc)
    wider = await exchange(one.api, token, scope="profile launch:aws")
    assert_refused(wider, "invalid_scope", token)
    assert "launch:aws" in wider.json()["error_description"]
    not_the_clients = await exchange(one.api, token, scope="profile admin")
    assert_refused(not_the_clients, "invalid_scope", token)
    assert await issued_count(one.svc) == before


async def test_an_audience_outside_the_clients_list_is_invalid_target(one: Broker) -> None:
    token = (await user_tokens(one.svc, person("erin"))).body["access_token"]
    before = await issued_count(one.svc)
    for params in ({"audience": AUD_OUTSIDE}, {"resource": AUD_OUTSIDE}):
        assert_refused(await exchange(one.api, token, **params), "invalid_target", token)
    assert await issued_count(one.svc) == before


async def test_a_revoked_subject_token_is_refused(one: Broker) -> None:
    original = await user_tokens(one.svc, person("frank"))
    token = original.body["access_token"]
    await revoke_access_token(one.svc, original.jti, original.expires_at)
    before = await issued_count(one.svc)
    response = await exchange(one.api, token)
    assert_refused(response, "invalid_request", token)
    assert "revoked" in response.json()["error_description"]
    assert await issued_count(one.svc) == before


async def test_another_clients_token_is_refused(one: Broker) -> None:
    """A token issued to `plain` for AUD_A: `launcher` neither holds it nor is its audience."""
    theirs = await user_tokens(one.svc, person("gina"), client_id="plain", audience=(AUD_A,))
    token = theirs.body["access_token"]
    before = await issued_count(one.svc)
    assert_refused(await exchange(one.api, token, audience=AUD_A), "invalid_request", token)
    assert await issued_count(one.svc) == before


async def test_a_client_not_allowed_the_grant_is_unauthorized(one: Broker) -> None:
    token = (await user_tokens(one.svc, person("hal"), client_id="plain")).body["access_token"]
    before = await issued_count(one.svc)
    response = await exchange(one.api, token, client_id="plain")
    assert_refused(response, "unauthorized_client", token)
    assert await issued_count(one.svc) == before


async def test_a_forgotten_user_is_refused(one: Broker) -> None:
    """A genuine token for a principal the broker has no record of."""
    minted = await one.svc.tokens.mint(
        subject="u-nobody", audience=AUD_A, client_id="launcher", scope=("profile",)
    )
    before = await issued_count(one.svc)
    assert_refused(await exchange(one.api, minted.token), "invalid_request", minted.token)
    assert await issued_count(one.svc) == before


# --- forged subject tokens ---------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64json(value: Any) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


@dataclass
class Forger:
    """The broker's current key and a known user: what each forgery starts from."""

    svc: Services
    subject: str

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": self.subject, "aud": [AUD_A], "iat": now,
                  "exp": now + 600, "jti": "forged-jti", "client_id": "launcher",
                  "scope": "openid profile launch:aws", "auth_time": now}  # fmt: skip
        return claims | changes

    def header(self, **changes: Any) -> dict[str, Any]:
        key = self.svc.keyring.signer()
        return {"alg": key.alg, "typ": "at+jwt", "kid": key.kid} | changes

    def sign(self, claims: dict[str, Any]) -> str:
        key = self.svc.keyring.signer()
        assert key.private_key is not None, "tests run with signing = 'local'"
        return jwt.encode(claims, key.private_key, algorithm=key.alg, headers=self.header())


def _expired(f: Forger) -> str:
    now = int(time.time())
    skew = f.svc.settings.tokens.clock_skew
    return f.sign(f.claims(iat=now - 3600, exp=now - skew - 5))


def _not_yet_valid(f: Forger) -> str:
    now = int(time.time())
    skew = f.svc.settings.tokens.clock_skew
    return f.sign(f.claims(iat=now + skew + 60, exp=now + skew + 600))


def _wrong_issuer_claim(f: Forger) -> str:
    """Signed with the broker's key but naming a peer-looking issuer: no trusted issuer."""
    return f.sign(f.claims(iss="https://elsewhere.example.org"))


def _other_key_with_broker_kid(f: Forger) -> str:
    attacker = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(f.claims(), attacker, algorithm="ES256", headers=f.header())


def _unknown_kid(f: Forger) -> str:
    attacker = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(f.claims(), attacker, algorithm="ES256", headers=f.header(kid="attacker-kid"))


def _alg_none(f: Forger) -> str:
    return f"{_b64json(f.header(alg='none'))}.{_b64json(f.claims())}."


def _hs256_with_public_key(f: Forger) -> str:
    pem = f.svc.keyring.signer().public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = f"{_b64json(f.header(alg='HS256'))}.{_b64json(f.claims())}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def _tampered_scope(f: Forger) -> str:
    genuine = f.sign(f.claims(scope="profile"))
    header, _, signature = genuine.split(".")
    return f"{header}.{_b64json(f.claims(scope='openid profile launch:aws'))}.{signature}"


FORGERIES: dict[str, Callable[[Forger], str]] = {
    "expired": _expired,
    "not-yet-valid": _not_yet_valid,
    "untrusted-iss": _wrong_issuer_claim,
    "other-key-broker-kid": _other_key_with_broker_kid,
    "unknown-kid": _unknown_kid,
    "alg-none": _alg_none,
    "hs256-with-public-key": _hs256_with_public_key,
    "tampered-payload": _tampered_scope,
}


@pytest.mark.parametrize("forge", FORGERIES.values(), ids=FORGERIES.keys())
async def test_forged_subject_tokens_issue_nothing(
    one: Broker, forge: Callable[[Forger], str]
) -> None:
    alice = person("alice")
    await remember_principal(one.svc, alice)
    forger = Forger(one.svc, alice.id)
    control = forger.sign(forger.claims())
    assert (await exchange(one.api, control, scope="profile")).status == 200  # the control
    before = await issued_count(one.svc)
    forged = forge(forger)
    response = await exchange(one.api, forged, scope="profile")
    assert_refused(response, "invalid_request", forged)
    assert "subject_token" in response.json()["error_description"]
    # As an actor token it is refused just the same.
    as_actor = await exchange(
        one.api, control, scope="profile", actor_token=forged, actor_token_type=ACCESS_TOKEN_TYPE
    )
    assert_refused(as_actor, "invalid_request", forged)
    assert await issued_count(one.svc) == before


async def test_a_dpop_bound_subject_token_needs_a_proof_by_its_key(one: Broker) -> None:
    alice = person("alice")
    await remember_principal(one.svc, alice)
    forger = Forger(one.svc, alice.id)
    bound = forger.sign(forger.claims(cnf={"jkt": "thumbprint-of-alices-key"}))
    before = await issued_count(one.svc)
    response = await exchange(one.api, bound, scope="profile")
    assert_refused(response, "invalid_request", bound)
    assert "DPoP" in response.json()["error_description"]
    assert await issued_count(one.svc) == before


# --- a peer deployment: a second broker as a separate process --------------------------------


@dataclass
class Peer:
    url: str
    config: Path
    process: subprocess.Popen[bytes]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def peer_clients() -> list[dict[str, Any]]:
    """Clients of the peer: two whose tokens are for the first broker, one for elsewhere."""
    peer_scopes = ["profile", "email", "groups", "launch:aws"]
    return [
        {"client_id": name, "secret_hash": _HASHES[name], "grant_types": ["client_credentials"],
         "scopes": peer_scopes, "audiences": [audience]}
        for name, audience in (("peer-launcher", TRUSTED_AUD), ("peer-agent", TRUSTED_AUD),
                               ("peer-elsewhere", "https://somewhere-else.example.org"))
    ]  # fmt: skip


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def peer(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Peer]:
    """A second broker, `broker serve` in its own process on its own OpenBao (so its own keys),
    whose public URL is the loopback URL it really listens on. One per module: a process and an
    OpenBao take seconds to start. Stopped by PID at teardown."""
    tmp = tmp_path_factory.mktemp("peer")
    vault = await DevVault.start()
    process: subprocess.Popen[bytes] | None = None
    try:
        auth = await provision(vault.address, vault.root_token)
        secret = tmp / "secret-id"
        secret.write_text(auth.secret_id)
        secret.chmod(0o600)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        config = {
            "server": {"public_url": url},
            "vault": {"address": vault.address, "auth": {
                "method": "approle", "role_id": auth.role_id, "secret_id": {"file": str(secret)}}},
            "database": {"url": f"sqlite:///{tmp / 'peer.db'}"},
            "audit": {"path": str(tmp / "peer-audit.log")},
            "clients": peer_clients(),
            # A rotation reaches the peer's JWKS within a second (see the kid refetch test).
            "keys": {"refresh_interval": 1, "jwks_max_age": 60},
        }  # fmt: skip
        path = tmp / "peer.toml"
        path.write_text(tomli_w.dumps(config))
        upgrade = await asyncio.create_subprocess_exec(
            BROKER, "db", "upgrade", "--config", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await upgrade.communicate()
        assert upgrade.returncode == 0, err.decode()
        log = (tmp / "peer.log").open("wb")
        process = subprocess.Popen(
            [BROKER, "serve", "--config", str(path), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        await _wait_ready(f"{url}/readyz", process, tmp / "peer.log")
        yield Peer(url, path, process)
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        vault.stop()


async def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"the peer broker exited: {log.read_text()[-2000:]}")
            with suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise AssertionError(f"the peer broker was not ready: {log.read_text()[-2000:]}")


async def peer_token(peer: Peer, client_id: str) -> str:
    """A client_credentials token from the peer's real token endpoint."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{peer.url}/oauth/token",
            data={"grant_type": "client_credentials"},
            headers=basic(client_id),
        ) as response,  # fmt: skip
    ):
        body = await response.json()
        assert response.status == 200, body
        token: str = body["access_token"]
        return token


def trusting(peer: Peer, **changes: Any) -> list[dict[str, Any]]:
    return [{"issuer": peer.url, "audience": TRUSTED_AUD} | changes]


async def test_a_peer_token_is_exchanged_for_a_peer_principal(
    peer: Peer, tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> None:
    async with serving(tmp_path, openbao, vault_approle, trusting(peer)) as one:
        subject = await peer_token(peer, "peer-launcher")
        response = await exchange(one.api, subject, scope="launch:aws", audience=AUD_A)
        assert response.status == 200, response.text
        claims = one.svc.tokens.verify(response.json()["access_token"], audience=AUD_A)
        expected = principal_id(peer.url, "peer-launcher")
        assert claims["sub"] == expected and claims["iss"] == ISSUER
        assert claims["scope"] == "launch:aws" and "act" not in claims
        remembered = await load_principal(one.svc, expected)
        assert remembered is not None
        assert remembered.idp == f"peer:{peer.url}" and remembered.subject == "peer-launcher"
        # Whatever groups the peer asserts live in its own namespace, never in ours.
        assert all(g.startswith(f"peer:{peer.url}#") for g in remembered.groups)
        assert "broker-admins" not in remembered.groups
        record = last_issued(one.svc)
        assert record["actor"] == expected and record["data"]["subject_iss"] == peer.url
        # The peer's scope bounds the exchange too: it never granted repo:read.
        before = await issued_count(one.svc)
        wider = await exchange(one.api, subject, scope="repo:read")
        assert_refused(wider, "invalid_scope", subject)
        assert await issued_count(one.svc) == before


async def test_a_peer_actor_token_yields_act(
    peer: Peer, tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> None:
    async with serving(tmp_path, openbao, vault_approle, trusting(peer)) as one:
        subject = await peer_token(peer, "peer-launcher")
        actor = await peer_token(peer, "peer-agent")
        response = await exchange(
            one.api, subject, actor_token=actor, actor_token_type=ACCESS_TOKEN_TYPE
        )
        assert response.status == 200, response.text
        claims = one.svc.tokens.verify(response.json()["access_token"])
        assert claims["sub"] == principal_id(peer.url, "peer-launcher")
        assert claims["act"] == {"sub": "peer-agent", "iss": peer.url}


async def test_a_peer_token_for_another_audience_is_refused(
    peer: Peer, tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> None:
    async with serving(tmp_path, openbao, vault_approle, trusting(peer)) as one:
        elsewhere = await peer_token(peer, "peer-elsewhere")
        before = await issued_count(one.svc)
        response = await exchange(one.api, elsewhere)
        assert_refused(response, "invalid_request", elsewhere)
        assert "not meant for this broker" in response.json()["error_description"]
        assert await issued_count(one.svc) == before


async def test_a_token_of_an_unlisted_issuer_is_refused(
    peer: Peer, tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> None:
    """The peer is genuine and the audience right, but this broker does not list the peer."""
    other = [{"issuer": "https://other-peer.example.org", "audience": TRUSTED_AUD}]
    async with serving(tmp_path, openbao, vault_approle, other) as one:
        token = await peer_token(peer, "peer-launcher")
        before = await issued_count(one.svc)
        response = await exchange(one.api, token)
        assert_refused(response, "invalid_request", token)
        assert "not trusted" in response.json()["error_description"]
        assert await issued_count(one.svc) == before


def _peer_forgeries(peer_jwk: dict[str, Any], genuine: str) -> dict[str, str]:
    """Tokens claiming to be the peer's, made without the peer's private key."""
    header = jwt.get_unverified_header(genuine)
    head, _, signature = genuine.split(".")
    claims = jwt.decode(genuine, options={"verify_signature": False})
    attacker = ec.generate_private_key(ec.SECP256R1())
    public_pem = jwt.PyJWK(peer_jwk).key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs_input = f"{_b64json(header | {'alg': 'HS256'})}.{_b64json(claims)}"
    hs_mac = hmac.new(public_pem, hs_input.encode(), hashlib.sha256).digest()
    return {
        "alg-none": f"{_b64json(header | {'alg': 'none'})}.{_b64json(claims)}.",
        "hs256-with-public-key": f"{hs_input}.{_b64(hs_mac)}",
        "other-key-peer-kid": jwt.encode(claims, attacker, algorithm="ES256", headers=header),
        "unknown-kid": jwt.encode(
            claims, attacker, algorithm="ES256", headers=header | {"kid": "attacker-kid"}
        ),
        "tampered-sub": f"{head}.{_b64json(claims | {'sub': 'peer-admin'})}.{signature}",
    }


async def test_forged_peer_tokens_issue_nothing(
    peer: Peer, tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> None:
    async with serving(tmp_path, openbao, vault_approle, trusting(peer)) as one:
        genuine = await peer_token(peer, "peer-launcher")
        async with aiohttp.ClientSession() as http, http.get(f"{peer.url}/jwks.json") as resp:
            peer_jwk = (await resp.json())["keys"][0]
        control = await exchange(one.api, genuine)
        assert control.status == 200, control.text
        before = await issued_count(one.svc)
        for name, forged in _peer_forgeries(peer_jwk, genuine).items():
            response = await exchange(one.api, forged)
            assert_refused(response, "invalid_request", forged)
            assert "subject_token" in response.json()["error_description"], name
        assert await issued_count(one.svc) == before


async def test_a_configured_jwks_uri_skips_discovery_and_an_unreachable_one_is_503(
    peer: Peer, tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> None:
    (tmp_path / "direct").mkdir()
    (tmp_path / "dead").mkdir()
    direct = trusting(peer, jwks_uri=f"{peer.url}/jwks.json")
    async with serving(tmp_path / "direct", openbao, vault_approle, direct) as one:
        token = await peer_token(peer, "peer-launcher")
        response = await exchange(one.api, token, scope="profile")
        assert response.status == 200, response.text
    dead = trusting(peer, jwks_uri=f"http://127.0.0.1:{_free_port()}/jwks.json")
    async with serving(tmp_path / "dead", openbao, vault_approle, dead) as one:
        before = await issued_count(one.svc)
        response = await exchange(one.api, token, scope="profile")
        assert response.status == 503, response.text
        assert response.json()["error"] == "temporarily_unavailable"
        assert token not in response.text
        assert await issued_count(one.svc) == before


async def test_a_discovery_document_naming_another_issuer_is_not_trusted(peer: Peer) -> None:
    """The peer reached as `localhost` serves a document naming `127.0.0.1`: OIDC Discovery
    §4.3 says that document is not the configured issuer's, so none of its keys are used."""
    alias = TrustedIssuerConfig(
        issuer=f"http://localhost:{urlsplit(peer.url).port}", audience=TRUSTED_AUD
    )
    token = await peer_token(peer, "peer-launcher")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(UpstreamFailed, match="names another issuer"):
            await verify_peer_token(
                http, alias, token, expected="access", clock_skew=60, keys=PeerKeys()
            )


async def test_an_unknown_kid_refetches_the_jwks_at_most_once_a_minute(peer: Peer) -> None:
    """Last in the module: it rotates the peer's key (the old one keeps signing for a minute)."""
    clock = [1_000.0]
    keys = PeerKeys(clock=lambda: clock[0])
    config = TrustedIssuerConfig(issuer=peer.url, audience=TRUSTED_AUD)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{peer.url}/jwks.json") as response:
            current = (await response.json())["keys"][0]["kid"]
        assert await keys.find(http, config, current, "ES256") is not None
        rotated = await asyncio.create_subprocess_exec(
            BROKER, "keys", "rotate", "--config", str(peer.config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await rotated.communicate()
        assert rotated.returncode == 0, err.decode()
        found = re.search(r"new key (\S+)", out.decode())
        assert found is not None, out.decode()
        new_kid = found.group(1)
        deadline = time.monotonic() + 20
        published: list[str] = []
        while new_kid not in published and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            async with http.get(f"{peer.url}/jwks.json") as response:
                published = [k["kid"] for k in (await response.json())["keys"]]
        assert new_kid in published, "the peer never published its new key"

        clock[0] += 30  # within the minute: the cached set is used, no refetch
        assert await keys.find(http, config, new_kid, "ES256") is None
        clock[0] += 31  # a minute after the last fetch: one refetch finds the new key
        assert await keys.find(http, config, new_kid, "ES256") is not None
        assert await keys.find(http, config, current, "ES256") is not None


def test_peer_groups_are_namespaced_by_issuer() -> None:
    principal = peer_principal(
        "https://peer.example", {"sub": "u1", "groups": ["broker-admins", "students", 7]}
    )
    assert principal.groups == (
        "peer:https://peer.example#broker-admins",
        "peer:https://peer.example#students",
    )
