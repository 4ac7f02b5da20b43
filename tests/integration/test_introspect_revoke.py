"""Token introspection (RFC 7662) and revocation (RFC 7009) against a broker on real OpenBao.

Tokens come from the real token endpoint (client_credentials, refresh_token) or, for users,
from `issuance.issue`, the one path every grant takes. Introspection must reveal nothing about
tokens the caller is not entitled to see; revocation must change nothing for another client's
token and refuse it (RFC 7009 §2.1), and answer 200 for unknown or invalid tokens (§2.2).

The helpers and fixtures here are shared with test_userinfo.py and test_admin_clients.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from adapters.base import Principal
from adapters.upstream.dev import DEV_ISSUER
from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault
from broker.oauth.clients import hash_secret
from broker.oauth.issuance import Issued, TokenRequest, issue, remember_principal
from broker.services import Services
from broker.settings import Settings
from tests.peers.broker import Checked, ContractClient, audit_events, make_settings, start_broker

LAUNCHER_AUD = "https://launcher.example.org"
RS_AUD = "https://rs.example.org"
OTHER_AUD = "https://other.example.org"
SECRETS = {
    "launcher": "launcher-secret-0123456789abcdefghij",
    "rs": "rs-secret-0123456789abcdefghijklmnopq",
    "other": "other-secret-0123456789abcdefghijklmn",
    "console": "console-secret-0123456789abcdefghijk",
}
_HASHES = {name: hash_secret(secret) for name, secret in SECRETS.items()}
USER_SCOPES = ["openid", "profile", "email", "groups", "offline_access", "launch:aws"]


def client_configs() -> list[dict[str, Any]]:
    """launcher (basic, two audiences), rs (post, a resource server), other, console (1st party)."""
    return [
        {"client_id": "launcher", "secret_hash": _HASHES["launcher"],
         "grant_types": ["client_credentials", "refresh_token"], "scopes": USER_SCOPES,
         "audiences": [LAUNCHER_AUD, RS_AUD]},
        {"client_id": "rs", "auth_method": "client_secret_post", "secret_hash": _HASHES["rs"],
         "grant_types": ["client_credentials"], "scopes": ["launch:aws"], "audiences": [RS_AUD]},
        {"client_id": "other", "secret_hash": _HASHES["other"],
         "grant_types": ["client_credentials", "refresh_token"], "scopes": USER_SCOPES,
         "audiences": [OTHER_AUD]},
        {"client_id": "console", "secret_hash": _HASHES["console"], "first_party": True,
         "grant_types": ["client_credentials", "refresh_token"], "scopes": USER_SCOPES},
    ]  # fmt: skip


@pytest.fixture
def oauth_settings(tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth) -> Settings:
    return make_settings(tmp_path, openbao.address, vault_approle, clients=client_configs())


@pytest_asyncio.fixture
async def svc(oauth_settings: Settings) -> AsyncIterator[Services]:
    services = await start_broker(oauth_settings)
    try:
        yield services
    finally:
        await services.close()


@pytest_asyncio.fixture
async def api(svc: Services) -> AsyncIterator[ContractClient]:
    async with TestClient(TestServer(app_with_services(svc))) as raw:
        yield ContractClient(raw)


def basic(client_id: str, secret: str | None = None) -> dict[str, str]:
    value = f"{client_id}:{secret or SECRETS[client_id]}".encode()
    return {"Authorization": "Basic " + base64.b64encode(value).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def raw_post(api: ContractClient, path: str, **kwargs: Any) -> Checked:
    """A request to an endpoint this module does not own (the token endpoint): not validated."""
    async with api.raw.post(path, allow_redirects=False, **kwargs) as response:
        body = await response.read()
        return Checked(response.status, dict(response.headers), body, {})


async def client_token(api: ContractClient, client_id: str, **form: str) -> dict[str, Any]:
    """A client_credentials token response from the real token endpoint."""
    data = {"grant_type": "client_credentials", **form}
    if client_id == "rs":
        response = await raw_post(
            api, "/oauth/token", data={**data, "client_id": "rs", "client_secret": SECRETS["rs"]}
        )
    else:
        response = await raw_post(api, "/oauth/token", data=data, headers=basic(client_id))
    assert response.status == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def person(subject: str, groups: Sequence[str] = (), *, mfa: bool = False) -> Principal:
    return Principal(
        idp="dev", issuer=DEV_ISSUER, subject=subject, display_name=subject.title(),
        email=f"{subject}@example.edu", groups=tuple(groups), mfa=mfa, auth_time=1_700_000_000,
    )  # fmt: skip


async def user_token(
    svc: Services,
    principal: Principal,
    *,
    client_id: str = "launcher",
    scopes: Sequence[str] = ("openid", "profile"),
    audience: Sequence[str] = (LAUNCHER_AUD,),
    refresh: bool = False,
    dpop_jkt: str | None = None,
) -> Issued:
    """A user's tokens through `issuance.issue`, as the authorization_code grant would get."""
    await remember_principal(svc, principal)
    client = await svc.oauth.clients.get(client_id)
    assert client is not None
    request = TokenRequest(
        grant_type="authorization_code", client=client, principal=principal,
        scopes=list(scopes), audience=list(audience), refresh=refresh, dpop_jkt=dpop_jkt,
    )  # fmt: skip
    return await issue(svc, request)


async def introspect(
    api: ContractClient, token: str, caller: str = "launcher", **extra: str
) -> Checked:
    if caller == "rs":
        data = {"token": token, "client_id": "rs", "client_secret": SECRETS["rs"], **extra}
        return await api.post("/oauth/introspect", data=data)
    return await api.post(
        "/oauth/introspect", data={"token": token, **extra}, headers=basic(caller)
    )


async def revoke(
    api: ContractClient, token: str, caller: str = "launcher", **extra: str
) -> Checked:
    return await api.post("/oauth/revoke", data={"token": token, **extra}, headers=basic(caller))


# --- introspection --------------------------------------------------------------------------


async def test_own_access_token_is_described(svc: Services, api: ContractClient) -> None:
    issued = await client_token(api, "launcher", scope="launch:aws")
    response = await introspect(api, issued["access_token"], token_type_hint="access_token")
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    claims = svc.tokens.verify(issued["access_token"])
    assert body["active"] is True
    assert body["client_id"] == "launcher" and body["sub"] == "launcher"
    assert body["scope"] == "launch:aws"
    assert body["aud"] == [LAUNCHER_AUD, RS_AUD]
    assert body["iss"] == "http://127.0.0.1:8080"
    assert (body["jti"], body["exp"], body["iat"]) == (claims["jti"], claims["exp"], claims["iat"])
    assert body["token_type"] == "Bearer" and "cnf" not in body and "act" not in body


async def test_a_dpop_bound_token_shows_its_key(svc: Services, api: ContractClient) -> None:
    issued = await user_token(svc, person("dora"), dpop_jkt="thumbprint-of-doras-key")
    body = (await introspect(api, issued.body["access_token"])).json()
    assert body["active"] is True and body["token_type"] == "DPoP"
    assert body["cnf"] == {"jkt": "thumbprint-of-doras-key"}
    assert body["sub"] == person("dora").id


async def test_an_audience_may_introspect_tokens_meant_for_it(api: ContractClient) -> None:
    for_rs = await client_token(api, "launcher", resource=RS_AUD)
    response = await introspect(api, for_rs["access_token"], caller="rs")
    assert response.status == 200
    body = response.json()
    assert body["active"] is True and body["client_id"] == "launcher" and body["aud"] == [RS_AUD]


async def test_tokens_of_other_audiences_reveal_nothing(api: ContractClient) -> None:
    for_launcher = await client_token(api, "launcher", resource=LAUNCHER_AUD)
    # rs is neither the client nor the audience; other is a stranger altogether.
    for caller in ("rs", "other"):
        response = await introspect(api, for_launcher["access_token"], caller=caller)
        assert response.status == 200
        assert response.json() == {"active": False}
        assert response.headers["Cache-Control"] == "no-store"
    # The token is valid for the right caller all along.
    assert (await introspect(api, for_launcher["access_token"])).json()["active"] is True


async def test_revoked_forged_and_foreign_tokens_are_inactive(
    svc: Services, api: ContractClient
) -> None:
    issued = await client_token(api, "launcher")
    token = issued["access_token"]
    assert (await revoke(api, token)).status == 200
    head, payload, signature = token.split(".")
    forged_payload = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged_payload["scope"] = "launch:aws admin"
    forged = ".".join(
        [head, base64.urlsafe_b64encode(json.dumps(forged_payload).encode()).decode().rstrip("="),
         signature]
    )  # fmt: skip
    id_token = await svc.tokens.mint(
        kind="id", subject="u-1", audience="launcher", client_id="launcher"
    )
    for candidate in (token, forged, id_token.token, "not-a-token", "a.b.c"):
        response = await introspect(api, candidate)
        assert response.status == 200
        assert response.json() == {"active": False}


async def test_refresh_tokens_are_described_only_to_their_client(
    svc: Services, api: ContractClient
) -> None:
    alice = person("alice")
    issued = await user_token(svc, alice, scopes=["openid", "offline_access"], refresh=True)
    refresh = issued.body["refresh_token"]
    body = (await introspect(api, refresh, token_type_hint="refresh_token")).json()
    assert body["active"] is True and body["token_type"] == "refresh_token"
    assert body["client_id"] == "launcher" and body["sub"] == alice.id
    assert body["scope"] == "openid offline_access"
    assert isinstance(body["exp"], int) and isinstance(body["iat"], int)
    # Another client learns nothing, whatever the hint says.
    for hint in ("refresh_token", "access_token"):
        other = await introspect(api, refresh, caller="other", token_type_hint=hint)
        assert other.json() == {"active": False}
    # A used (rotated) refresh token is no longer active.
    rotated = await raw_post(
        api, "/oauth/token", data={"grant_type": "refresh_token", "refresh_token": refresh},
        headers=basic("launcher"),
    )  # fmt: skip
    assert rotated.status == 200, rotated.text
    assert (await introspect(api, refresh)).json() == {"active": False}
    successor = rotated.json()["refresh_token"]
    assert (await introspect(api, successor)).json()["active"] is True


async def test_introspection_needs_an_authenticated_confidential_client(
    svc: Services, api: ContractClient
) -> None:
    issued = await client_token(api, "launcher")
    token = issued["access_token"]
    no_auth = await api.post("/oauth/introspect", data={"token": token})
    wrong = await api.post(
        "/oauth/introspect", data={"token": token}, headers=basic("launcher", "wrong-secret")
    )
    public = await api.post("/oauth/introspect", data={"token": token, "client_id": "broker-cli"})
    for response in (no_auth, wrong, public):
        assert response.status == 401
        body = response.json()
        assert body["error"] == "invalid_client"
        assert "active" not in body and token not in response.text
    assert wrong.headers["WWW-Authenticate"].startswith("Basic")
    missing = await api.post("/oauth/introspect", data={}, headers=basic("launcher"))
    assert missing.status == 400 and missing.json()["error"] == "invalid_request"


# --- revocation -----------------------------------------------------------------------------


async def test_revoking_an_access_token(svc: Services, api: ContractClient) -> None:
    issued = await client_token(api, "launcher")
    token = issued["access_token"]
    jti = svc.tokens.verify(token)["jti"]
    assert (await api.get("/v1/whoami", headers=bearer(token))).status == 200
    response = await revoke(api, token, token_type_hint="access_token")
    assert response.status == 200 and response.body == b""
    whoami = await api.get("/v1/whoami", headers=bearer(token))
    assert whoami.status == 401 and whoami.json()["error"] == "invalid_token"
    assert (await introspect(api, token)).json() == {"active": False}
    records = audit_events(svc, "token.revoked")
    assert [(r["actor"], r["data"]["token_jti"], r["data"]["client"]) for r in records] == [
        ("launcher", jti, "launcher")
    ]
    assert token not in Path(svc.settings.audit.path).read_text()
    # Revoking again is fine and records nothing more.
    assert (await revoke(api, token)).status == 200
    assert len(audit_events(svc, "token.revoked")) == 1


async def test_revoked_user_token_is_refused_at_userinfo(
    svc: Services, api: ContractClient
) -> None:
    issued = await user_token(svc, person("bob"), scopes=["openid", "profile"])
    token = issued.body["access_token"]
    assert (await api.get("/oauth/userinfo", headers=bearer(token))).status == 200
    assert (await revoke(api, token)).status == 200
    refused = await api.get("/oauth/userinfo", headers=bearer(token))
    assert refused.status == 401 and refused.json()["error"] == "invalid_token"
    assert "invalid_token" in refused.headers["WWW-Authenticate"]


async def test_revoking_a_refresh_token_revokes_its_family(
    svc: Services, api: ContractClient
) -> None:
    issued = await user_token(svc, person("carol"), scopes=["openid", "offline_access"],
                              refresh=True)  # fmt: skip
    first = issued.body["refresh_token"]
    for access in (issued.body["access_token"],):  # live before the revocation
        assert (await introspect(api, access)).json()["active"] is True
    rotated = await raw_post(
        api, "/oauth/token", data={"grant_type": "refresh_token", "refresh_token": first},
        headers=basic("launcher"),
    )  # fmt: skip
    assert rotated.status == 200, rotated.text
    current = rotated.json()["refresh_token"]
    issued_before = len(audit_events(svc, "token.issued"))
    response = await revoke(api, current, token_type_hint="refresh_token")
    assert response.status == 200 and response.body == b""
    refused = await raw_post(
        api, "/oauth/token", data={"grant_type": "refresh_token", "refresh_token": current},
        headers=basic("launcher"),
    )  # fmt: skip
    assert refused.status == 400 and refused.json()["error"] == "invalid_grant"
    assert "access_token" not in refused.json()
    assert len(audit_events(svc, "token.issued")) == issued_before
    assert not await svc.oauth.refresh.family_active(issued.refresh_family or "")
    [record] = audit_events(svc, "token.revoked")
    assert record["data"]["refresh_family"] == issued.refresh_family
    assert record["data"]["client"] == "launcher"
    assert (await introspect(api, current)).json() == {"active": False}
    # RFC 7009 §2.1: the access tokens issued with the family go too, the rotated one as well.
    for access in (issued.body["access_token"], rotated.json()["access_token"]):
        assert (await introspect(api, access)).json() == {"active": False}
        refused_use = await api.get("/oauth/userinfo", headers=bearer(access))
        assert refused_use.status == 401 and refused_use.json()["error"] == "invalid_token"


async def test_another_clients_tokens_are_refused_and_left_alone(
    svc: Services, api: ContractClient
) -> None:
    access = (await client_token(api, "launcher"))["access_token"]
    issued = await user_token(svc, person("dave"), scopes=["openid", "offline_access"],
                              refresh=True)  # fmt: skip
    refresh = issued.body["refresh_token"]
    for token in (access, refresh):
        response = await revoke(api, token, caller="other")
        assert response.status == 400, response.text
        assert response.json()["error"] == "unauthorized_client"
        assert response.headers["Cache-Control"] == "no-store"
        assert token not in response.text
    assert audit_events(svc, "token.revoked") == []
    refused = audit_events(svc, "token.revoke_refused")
    assert [(r["outcome"], r["actor"], r["data"]["kind"]) for r in refused] == [
        ("denied", "other", "access_token"),
        ("denied", "other", "refresh_token"),
    ]
    assert (
        refused[0]["data"]["token_jti"]
        == jwt.decode(access, options={"verify_signature": False})["jti"]
    )
    assert refused[1]["data"]["refresh_family"]
    assert access not in json.dumps(refused) and refresh not in json.dumps(refused)
    assert (await api.get("/v1/whoami", headers=bearer(access))).status == 200
    assert (await introspect(api, access)).json()["active"] is True
    still = await raw_post(
        api, "/oauth/token", data={"grant_type": "refresh_token", "refresh_token": refresh},
        headers=basic("launcher"),
    )  # fmt: skip
    assert still.status == 200, still.text


async def test_revocation_of_unknown_tokens_and_by_strangers(
    svc: Services, api: ContractClient
) -> None:
    for garbage in ("rt_unknown", "not.a.jwt", "x"):
        response = await revoke(api, garbage)
        assert response.status == 200 and response.body == b""
    access = (await client_token(api, "launcher"))["access_token"]
    stranger = await api.post("/oauth/revoke", data={"token": access})
    assert stranger.status == 401 and stranger.json()["error"] == "invalid_client"
    wrong = await api.post(
        "/oauth/revoke", data={"token": access}, headers=basic("launcher", "guess")
    )
    assert wrong.status == 401
    missing = await api.post("/oauth/revoke", data={}, headers=basic("launcher"))
    assert missing.status == 400 and missing.json()["error"] == "invalid_request"
    assert audit_events(svc, "token.revoked") == []
    assert (await api.get("/v1/whoami", headers=bearer(access))).status == 200
