"""Tokens/s of `TokenService.mint` against a bare PyJWT ES256 encode with the same key object.

Both run in this process, in the same run, alternating rounds so machine noise hits both; the
ratio is what counts (goal: mint >= 70 % of bare). The key ring is real: it starts an OpenBao
dev server, provisions it and loads its key from Vault, as the broker does.

    python bench/mint.py [--tokens 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import statistics
import time

import jwt

from adapters.vault import VaultClient
from broker.devvault import DevVault, provision
from broker.keyring import KeyRing
from broker.tokens import TokenService


async def main(tokens: int, rounds: int) -> None:
    dev = await DevVault.start()
    try:
        auth = await provision(dev.address, dev.root_token)
        vault = VaultClient(dev.address, auth)
        await vault.login()
        ring = KeyRing(
            vault, prefix="binder-broker", algorithm="ES256", signing="local",
            rotation_interval=30 * 86400, publish_ahead=3630, max_token_ttl=86400,
            clock_skew=60, refresh_interval=30, max_staleness=300,
        )  # fmt: skip
        await ring.start()
        service = TokenService(
            ring, issuer="https://broker.example.edu", access_token_ttl=600, id_token_ttl=600,
            max_ttl=86400, clock_skew=60,
        )  # fmt: skip
        key = ring.signer()
        assert key.private_key is not None

        async def broker_round() -> float:
            started = time.perf_counter()
            for _ in range(tokens):
                await service.mint(
                    subject="u-0123456789abcdef", audience="https://launcher.example.org",
                    client_id="binderhub", scope=("openid", "launch:aws"), auth_time=1_700_000_000,
                    acr="urn:mace:incommon:iap:silver",
                )  # fmt: skip
            return tokens / (time.perf_counter() - started)

        def bare_round() -> float:
            started = time.perf_counter()
            for _ in range(tokens):
                now = int(time.time())
                claims = {
                    "iss": "https://broker.example.edu", "sub": "u-0123456789abcdef",
                    "aud": "https://launcher.example.org", "iat": now, "exp": now + 600,
                    "jti": secrets.token_urlsafe(18), "auth_time": 1_700_000_000,
                    "client_id": "binderhub", "scope": "openid launch:aws",
                    "acr": "urn:mace:incommon:iap:silver",
                }  # fmt: skip
                jwt.encode(claims, key.private_key, algorithm="ES256",
                           headers={"kid": key.kid, "typ": "at+jwt"})  # fmt: skip
            return tokens / (time.perf_counter() - started)

        await broker_round()  # warm-up
        bare_round()
        broker_rates, bare_rates = [], []
        for _ in range(rounds):
            bare_rates.append(bare_round())
            broker_rates.append(await broker_round())
        broker_median, bare_median = statistics.median(broker_rates), statistics.median(bare_rates)
        machine = f"{platform.machine()}, {os.cpu_count()} cores"
        print(f"machine: {machine}, Python {platform.python_version()}")
        print(f"tokens per round: {tokens}, rounds: {rounds}")
        print(f"bare PyJWT ES256 encode : {bare_median:8.0f} tokens/s (median)")
        print(f"TokenService.mint       : {broker_median:8.0f} tokens/s (median)")
        ratio = broker_median / bare_median
        verdict = "OK" if ratio >= 0.7 else "BELOW GOAL"
        print(f"ratio                   : {ratio:8.1%}  (goal >= 70 %) {verdict}")
        await ring.close()
        await vault.close()
    finally:
        dev.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.tokens, args.rounds))
