"""OpenBao stops under a running broker: readiness names Vault, signing fails closed with a
clear error, and nothing is half-written."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from broker.app import app_with_services
from broker.devvault import DevVault, provision
from broker.errors import UpstreamFailed
from broker.services import Services
from tests.peers.broker import ContractClient, make_settings, sign_in, start_broker


@pytest_asyncio.fixture
async def doomed(
    tmp_path: Path, fresh_openbao: DevVault
) -> AsyncIterator[tuple[Services, ContractClient, DevVault]]:
    auth = await provision(fresh_openbao.address, fresh_openbao.root_token)
    settings = make_settings(tmp_path, fresh_openbao.address, auth, keys={"max_staleness": 0})
    services = await start_broker(settings)
    async with TestClient(TestServer(app_with_services(services))) as raw:
        yield services, ContractClient(raw), fresh_openbao
    await services.close()


def _events(services: Services) -> list[str]:
    path = Path(services.settings.audit.path)
    return (
        [json.loads(line)["event"] for line in path.read_text().splitlines()]
        if path.exists()
        else []
    )


async def test_vault_stopped(doomed: tuple[Services, ContractClient, DevVault]) -> None:
    services, client, bao = doomed
    ready = await client.get("/readyz")
    assert ready.status == 200 and ready.json()["failed"] == []
    signed_in = await sign_in(client, "ada", ("students",))
    assert signed_in.status == 303
    session_cookie = signed_in.cookies["broker_session"]
    keys_before = services.keyring.jwks()

    bao.stop()

    ready = await client.get("/readyz")
    assert ready.status == 503
    body = ready.json()
    assert body["failed"] == ["vault"]
    assert body["checks"]["vault"] == "Vault is unreachable"
    assert body["checks"]["sql"] == "ok" and body["checks"]["cache"] == "ok"

    with pytest.raises(UpstreamFailed):
        await services.keyring.refresh()  # what the refresher does every refresh_interval
    with pytest.raises(UpstreamFailed, match="signing keys cannot be confirmed"):
        await services.tokens.mint(subject="u-1", audience="a", client_id="c")
    with pytest.raises(UpstreamFailed):
        await services.keyring.rotate(reason="manual")
    assert services.keyring.jwks() == keys_before  # no half-made key appeared

    # Through HTTP: the page says what is wrong, with a request id, and nothing is issued.
    home = await client.get(
        "/", cookies={"broker_session": session_cookie}, headers={"Accept": "text/html"}
    )
    csrf = re.search(r'name="csrf" value="([^"]+)"', home.text)
    assert csrf is not None
    events_before = _events(services)
    minted = await client.post(
        "/dev/token",
        data={"csrf": csrf.group(1)},
        cookies={"broker_session": session_cookie},
        headers={"Accept": "text/html"},
    )
    assert minted.status == 503
    assert "signing keys cannot be confirmed" in minted.text
    assert "request id" in minted.text and "Traceback" not in minted.text
    assert "eyJ" not in minted.text
    assert _events(services) == events_before  # no token.issued record
    assert "token.issued" not in events_before
    report = await services.audit.verify()
    assert report.ok, report.problem
