"""OpenBao peer fixtures: a real `bao server -dev` on a free loopback port.

- `openbao` (session): one shared dev server; stopped (by its child PID) at teardown.
- `vault_approle` (session): `provision()` on it; the broker's AppRole login (never root).
- `vault` (function): a `VaultClient` logged in with that AppRole, closed after the test.
- `fresh_openbao` (function): a private dev server for tests that stop, seal or break it.
- `openbao_root` (session): a synchronous hvac client with the root token, for test set-up
  and for checking what the broker did from Vault's side.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import hvac
import pytest
import pytest_asyncio

from adapters.vault import AppRoleAuth, VaultClient
from broker.devvault import DevVault, provision


@pytest_asyncio.fixture(scope="session")
async def openbao() -> AsyncIterator[DevVault]:
    """The session's shared OpenBao dev server."""
    vault = await DevVault.start()
    try:
        yield vault
    finally:
        vault.stop()  # terminates and reaps its own child PID


@pytest.fixture(scope="session")
def openbao_root(openbao: DevVault) -> Iterator[hvac.Client]:
    """Root hvac client on the shared server; tests only, never handed to broker code."""
    client = hvac.Client(url=openbao.address, token=openbao.root_token)
    try:
        yield client
    finally:
        client.adapter.close()


@pytest_asyncio.fixture(scope="session")
async def vault_approle(openbao: DevVault) -> AppRoleAuth:
    """The broker's AppRole on the shared server (policy binder-broker only)."""
    return await provision(openbao.address, openbao.root_token)


@pytest_asyncio.fixture
async def vault(openbao: DevVault, vault_approle: AppRoleAuth) -> AsyncIterator[VaultClient]:
    """A VaultClient logged in with the broker's AppRole."""
    client = VaultClient(openbao.address, vault_approle)
    await client.login()
    try:
        yield client
    finally:
        await client.close()


@pytest_asyncio.fixture
async def fresh_openbao() -> AsyncIterator[DevVault]:
    """A private dev server for this test alone; stopped (if still running) at teardown."""
    vault = await DevVault.start()
    try:
        yield vault
    finally:
        vault.stop()  # terminates and reaps its own child PID
