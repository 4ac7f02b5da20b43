"""The vault_secret backend against a real OpenBao: the user's own secret, the lifetime
capped by the grant and the backend, nothing for a user who stored none."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from adapters.base import Grant, Principal
from adapters.downstream.secrets import VaultSecretBackend
from adapters.errors import NotFound
from adapters.vault import AppRoleAuth, VaultClient
from broker.devvault import DevVault
from policies.decision import Limits
from policies.engine import Resource
from tests.peers.broker import make_settings, start_broker

ADA = Principal(idp="dev", issuer="urn:test", subject="ada")
BOB = Principal(idp="dev", issuer="urn:test", subject="bob")


def grant(principal: Principal, max_ttl: int | None) -> Grant:
    return Grant(principal, "launch", "home-token", limits=Limits(max_ttl=max_ttl))


async def test_issues_only_the_callers_secret_for_the_clipped_lifetime(vault: VaultClient) -> None:
    backend = VaultSecretBackend(
        "home-token", vault=vault, prefix="binder-broker", name="home-token", max_ttl=900
    )
    await vault.kv_write(backend.path_for(ADA.id), {"token": "ada-s3cret"})
    before = datetime.now(UTC)
    credential = await backend.issue(grant(ADA, max_ttl=300))
    assert credential.secret == {"token": "ada-s3cret"}
    assert credential.kind == "secret" and credential.backend == "home-token"
    assert 299 <= (credential.expires_at - before).total_seconds() <= 301
    assert "ada-s3cret" not in repr(credential)
    long_grant = await backend.issue(grant(ADA, max_ttl=86400))
    assert (long_grant.expires_at - before).total_seconds() <= 901  # the backend's cap wins
    with pytest.raises(NotFound):
        await backend.issue(grant(BOB, max_ttl=300))


async def test_configured_backends_are_built_and_known_to_the_policy(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> None:
    settings = make_settings(
        tmp_path,
        openbao.address,
        vault_approle,
        backends=[{"type": "vault_secret", "id": "home-token", "name": "home-token"}],
    )
    services = await start_broker(settings)
    try:
        assert isinstance(services.backends["home-token"], VaultSecretBackend)
        small = {"ttl_seconds": 600, "cpu": 1, "memory_gb": 2, "disk_gb": 1, "gpu": 0}
        decision = services.policy.decide(ADA, "launch", Resource("Backend", "home-token"), small)
        assert decision.allowed and decision.reasons == ("launch-small",)
        assert decision.limits.max_ttl == 3600
    finally:
        await services.close()
