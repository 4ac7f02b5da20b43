"""Key rotation against a real OpenBao.

Time is driven by a settable clock so that hours of schedule run in a second; Vault, the
key material and the verifier (python-jose, caching JWKS like a real downstream) are real.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from jose import jwt as jose_jwt

from adapters.vault import AppRoleAuth, VaultClient
from broker.devvault import DevVault, provision
from broker.errors import InvalidToken
from broker.keyring import KeyRing
from broker.tokens import TokenService

JWKS_MAX_AGE = 3600
REFRESH = 30
MAX_TTL = 7200
SKEW = 60
ROTATION = 6 * 3600
ISSUER = "https://broker.example.edu"


@dataclass
class Clock:
    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class CachingVerifier:
    """A downstream that fetches the JWKS only when its cached copy is older than max-age."""

    ring: KeyRing
    clock: Clock
    fetched_at: float = -1e18
    jwks: dict[str, Any] = field(default_factory=dict)
    fetches: int = 0

    def verify(self, token: str) -> dict[str, Any]:
        if self.clock() - self.fetched_at >= JWKS_MAX_AGE:
            self.jwks = json.loads(self.ring.jwks())
            self.fetched_at = self.clock()
            self.fetches += 1
        claims: dict[str, Any] = jose_jwt.decode(
            token,
            self.jwks,
            algorithms=["ES256", "RS256"],
            audience="launcher",
            issuer=ISSUER,
            options={"verify_exp": False},  # the fake clock is hours ahead of the real one
        )
        return claims


def make_ring(
    vault: VaultClient, clock: Clock, *, signing: str = "local", alg: str = "ES256"
) -> KeyRing:
    return KeyRing(
        vault,
        prefix="binder-broker",
        algorithm=alg,
        signing=signing,  # type: ignore[arg-type]
        rotation_interval=ROTATION,
        publish_ahead=JWKS_MAX_AGE + REFRESH,
        max_token_ttl=MAX_TTL,
        clock_skew=SKEW,
        refresh_interval=REFRESH,
        max_staleness=300,
        clock=clock,
    )


def make_tokens(ring: KeyRing, clock: Clock) -> TokenService:
    return TokenService(
        ring,
        issuer=ISSUER,
        access_token_ttl=MAX_TTL,
        id_token_ttl=600,
        max_ttl=MAX_TTL,
        clock_skew=SKEW,
        clock=clock,
    )


@pytest_asyncio.fixture
async def bao_auth(fresh_openbao: DevVault) -> AsyncIterator[tuple[str, AppRoleAuth]]:
    yield fresh_openbao.address, await provision(fresh_openbao.address, fresh_openbao.root_token)


async def _client(address: str, auth: AppRoleAuth) -> VaultClient:
    vault = VaultClient(address, auth)
    await vault.login()
    return vault


@pytest.mark.parametrize(
    ("signing", "alg"),
    [("local", "ES256"), ("local", "RS256"), ("transit", "ES256"), ("transit", "RS256")],
)
async def test_caching_verifier_never_fails_across_rotations(
    bao_auth: tuple[str, AppRoleAuth], signing: str, alg: str
) -> None:
    clock = Clock()
    vault = await _client(*bao_auth)
    ring = make_ring(vault, clock, signing=signing, alg=alg)
    try:
        await ring.start()
        tokens = make_tokens(ring, clock)
        verifier = CachingVerifier(ring, clock)
        outstanding: list[tuple[float, str]] = []
        signers: set[str] = set()
        rotations = 0
        # Two days in 10-minute steps: a token every step, scheduled rotation when due,
        # and every still-valid token re-verified by the caching downstream each step.
        for _step in range(2 * 24 * 6):
            clock.now += 600
            await ring.refresh()
            if ring.rotation_due():
                await ring.rotate(reason="scheduled")
                rotations += 1
            minted = await tokens.mint(subject="u-1", audience="launcher", client_id="c")
            signers.add(minted.kid)
            outstanding.append((minted.expires_at, minted.token))
            outstanding = [(exp, tok) for exp, tok in outstanding if exp > clock.now]
            for _exp, token in outstanding:
                assert verifier.verify(token)["sub"] == "u-1"
        assert rotations >= 7
        assert len(signers) >= 7  # every rotated key really signed
        # Retired keys were removed once their last token expired: the set stays small.
        assert len(ring.keyset.published(clock.now)) <= 3
        assert verifier.fetches >= 40
    finally:
        await ring.close()
        await vault.close()


async def test_new_key_is_published_before_it_signs_and_old_key_lingers(
    bao_auth: tuple[str, AppRoleAuth],
) -> None:
    clock = Clock()
    vault = await _client(*bao_auth)
    ring = make_ring(vault, clock)
    try:
        await ring.start()
        tokens = make_tokens(ring, clock)
        first = ring.signer().kid
        last_old = await tokens.mint(subject="u", audience="launcher", client_id="c")
        new = await ring.rotate(reason="manual")
        published = {k.kid for k in ring.keyset.published(clock.now)}
        assert published == {first, new.kid}
        assert ring.signer().kid == first  # not yet: downstream caches may not have it
        clock.now += JWKS_MAX_AGE + REFRESH - 1
        assert ring.signer().kid == first
        last_old = await tokens.mint(subject="u", audience="launcher", client_id="c")
        clock.now += 1
        assert ring.signer().kid == new.kid
        # The old key stays until the last token it signed has expired (plus skew).
        clock.now = last_old.expires_at + SKEW - 1
        assert first in {k.kid for k in ring.keyset.published(clock.now)}
        assert tokens.verify(last_old.token, audience="launcher")["jti"] == last_old.jti
        clock.now = last_old.expires_at + SKEW + 1
        assert first not in {k.kid for k in ring.keyset.published(clock.now)}
        assert first.encode() not in ring.jwks()
    finally:
        await ring.close()
        await vault.close()


async def test_replicas_converge_and_restart_keeps_keys(bao_auth: tuple[str, AppRoleAuth]) -> None:
    clock = Clock()
    vault_a, vault_b = await _client(*bao_auth), await _client(*bao_auth)
    ring_a, ring_b = make_ring(vault_a, clock), make_ring(vault_b, clock)
    try:
        await ring_a.start()
        await ring_b.start()  # finds A's first key instead of creating its own
        assert ring_a.jwks() == ring_b.jwks()
        await ring_a.rotate(reason="manual")
        assert ring_a.jwks() != ring_b.jwks()
        await ring_b.refresh()  # what B's refresher does every refresh_interval
        assert ring_a.jwks() == ring_b.jwks()
        # Both replicas decide the schedule is due at once: only one new key results.
        clock.now += ROTATION + 1
        await ring_a.refresh()
        await ring_b.refresh()
        assert ring_a.rotation_due() and ring_b.rotation_due()
        before = {k.kid for k in ring_a.keyset.keys}
        await asyncio.gather(ring_a.rotate(reason="scheduled"), ring_b.rotate(reason="scheduled"))
        await ring_a.refresh()
        await ring_b.refresh()
        assert len({k.kid for k in ring_a.keyset.keys} - before) == 1  # one new key, not two
        assert ring_a.jwks() == ring_b.jwks()
        # A restarted replica loads the very same keys from Vault.
        jwks_before = ring_a.jwks()
        await ring_a.close()
        restarted = make_ring(vault_a, clock)
        await restarted.start()
        assert restarted.jwks() == jwks_before
        assert restarted.signer().kid == ring_b.signer().kid
        await restarted.close()
    finally:
        await ring_a.close()
        await ring_b.close()
        await vault_a.close()
        await vault_b.close()


async def test_transit_private_keys_never_reach_kv(
    bao_auth: tuple[str, AppRoleAuth], fresh_openbao: DevVault
) -> None:
    clock = Clock()
    vault = await _client(*bao_auth)
    ring = make_ring(vault, clock, signing="transit")
    try:
        await ring.start()
        await ring.rotate(reason="manual")
        entry = await vault.kv_read("binder-broker/signing-keys")
        assert entry is not None
        assert all("private_pem" not in record for record in entry.data["keys"])
        assert all(k.private_key is None for k in ring.keyset.keys)
        token = (
            await make_tokens(ring, clock).mint(subject="u", audience="launcher", client_id="c")
        ).token
        assert CachingVerifier(ring, clock).verify(token)["sub"] == "u"
    finally:
        await ring.close()
        await vault.close()


async def test_a_remembered_verification_still_checks_time_audience_kind_and_bytes(
    bao_auth: tuple[str, AppRoleAuth],
) -> None:
    """`TokenService.verify` remembers tokens it verified; a repeat must refuse what a first
    verification would: another audience or kind, other bytes, an expired token."""
    clock = Clock()
    vault = await _client(*bao_auth)
    ring = make_ring(vault, clock)
    try:
        await ring.start()
        tokens = make_tokens(ring, clock)
        minted = await tokens.mint(subject="u", audience="launcher", client_id="c", ttl=600)
        for _ in range(2):  # the second answer comes from the memo
            claims = tokens.verify(minted.token, audience="launcher")
            assert claims["jti"] == minted.jti
        claims["sub"] = "someone-else"  # a caller changing its copy changes nothing
        assert tokens.verify(minted.token, audience="launcher")["sub"] == "u"
        head, body, signature = minted.token.split(".")
        flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
        for bad, audience, kind in [
            (minted.token, "other", "access"),
            (minted.token, "launcher", "id"),
            (f"{head}.{body}.{flipped}", "launcher", "access"),
            (f"{head}.{body}.", "launcher", "access"),
        ]:
            with pytest.raises(InvalidToken):
                tokens.verify(bad, audience=audience, kind=kind)  # type: ignore[arg-type]
        clock.now = minted.expires_at + SKEW + 1
        with pytest.raises(InvalidToken):
            tokens.verify(minted.token, audience="launcher")
    finally:
        await ring.close()
        await vault.close()
