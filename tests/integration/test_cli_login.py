"""`broker login` and `broker token` as real subprocesses against a broker on a real port.

The broker (real OpenBao, SQLite, dev sign-in) listens on loopback; the command line is the
installed `broker` script with its own `BROKER_CONFIG_DIR`. A test "user" approves the code
the command prints, through the broker's /device pages over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import stat
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault
from broker.oauth.clients import CLI_CLIENT_ID
from broker.oauth.device import DEVICE_CODE_GRANT
from broker.services import Services
from tests.integration.test_device_flow import Browser, assert_audit_intact, audit_events
from tests.peers.broker import ContractClient, make_settings, start_broker

BROKER = str(Path(sys.executable).with_name("broker"))
USER_CODE_LINE = re.compile(r"^\s+([BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4})\s*$")
# Generous bounds so a stuck process fails the test instead of hanging it; not timing checks.
STEP_LIMIT = 60.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Live:
    svc: Services
    client: ContractClient
    issuer: str
    config_dir: Path


LiveFactory = Callable[..., Coroutine[Any, Any, Live]]


@pytest_asyncio.fixture
async def live_broker(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[LiveFactory]:
    """A factory: `await live_broker(**settings_sections)` → a broker served on a real port."""
    opened: list[tuple[Services, TestClient[Any, Any]]] = []

    async def start(port: int | None = None, **sections: Any) -> Live:
        port = port or _free_port()
        issuer = f"http://127.0.0.1:{port}"
        oauth = {"device_poll_interval": 1, **sections.pop("oauth", {})}
        settings = make_settings(
            tmp_path, openbao.address, vault_approle,
            server={"public_url": issuer, "cookie_secure": False}, oauth=oauth, **sections,
        )  # fmt: skip
        svc = await start_broker(settings)
        raw: TestClient[Any, Any] = TestClient(
            TestServer(app_with_services(svc), host="127.0.0.1", port=port)
        )
        await raw.start_server()
        opened.append((svc, raw))
        return Live(svc, ContractClient(raw), issuer, tmp_path / "cli-config")

    yield start
    for svc, raw in opened:
        await raw.close()
        await svc.close()


async def run_cli(live: Live, *args: str) -> tuple[int, str, str]:
    """Run `broker ARGS` to completion; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        BROKER, *args, env={**os.environ, "BROKER_CONFIG_DIR": str(live.config_dir)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), STEP_LIMIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def login(live: Live, decision: str = "approve") -> tuple[int, str, str]:
    """`broker login --issuer …`; a browser signed in as alice approves (or denies) the code
    the command prints. Returns (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        BROKER, "login", "--issuer", live.issuer,
        env={**os.environ, "BROKER_CONFIG_DIR": str(live.config_dir)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    printed: list[str] = []
    try:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), STEP_LIMIT)).decode()
            assert line, "broker login ended without printing a code: " + "".join(printed)
            printed.append(line)
            found = USER_CODE_LINE.match(line)
            if found:
                break
        assert f"{live.issuer}/device" in "".join(printed)
        browser = Browser(live.client)
        await browser.sign_in("alice")
        answered = await browser.approve(found.group(1), decision=decision)
        assert answered.status == 200, answered.text
        rest, err = await asyncio.wait_for(proc.communicate(), STEP_LIMIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, "".join(printed) + rest.decode(), err.decode()


def stored(live: Live) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((live.config_dir / "tokens.json").read_text())
    return data


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_login_then_token(live_broker: LiveFactory) -> None:
    live = await live_broker()
    code, out, err = await login(live)
    assert code == 0, (out, err)
    assert "Signed in" in out
    tokens_file = live.config_dir / "tokens.json"
    assert mode(tokens_file) == 0o600
    assert mode(live.config_dir) == 0o700
    data = stored(live)
    assert data["default"] == live.issuer
    entry = data["issuers"][live.issuer]
    assert entry["client_id"] == CLI_CLIENT_ID
    assert entry["token_endpoint"] == f"{live.issuer}/oauth/token"
    assert entry["refresh_token"] and entry["expires_at"] > 0

    code, out, err = await run_cli(live, "token")
    assert code == 0, err
    token = out.strip()
    assert "\n" not in token  # stdout holds the token and nothing else
    # Addressed to the broker itself, with every scope the CLI client may ask for by default.
    claims = live.svc.tokens.verify(token, audience=live.issuer)
    assert claims["client_id"] == CLI_CLIENT_ID
    assert claims["scope"] == (
        "openid profile email groups offline_access repo:read grants secrets"
    )
    # Still fresh (ttl 600 s): printed as stored, no refresh.
    assert token == entry["access_token"]
    assert stored(live) == data
    [issued] = audit_events(live.svc, "token.issued")
    assert issued["data"]["grant_type"] == DEVICE_CODE_GRANT
    # The same issuer, named explicitly, gives the same answer.
    code, out, _ = await run_cli(live, "token", "--issuer", live.issuer + "/")
    assert code == 0 and out.strip() == token
    await assert_audit_intact(live.svc)


async def test_token_refreshes_a_token_about_to_expire(live_broker: LiveFactory) -> None:
    # Access tokens live 30 s: always "within 60 s" of expiry, so `broker token` refreshes.
    live = await live_broker(tokens={"access_token_ttl": 30})
    code, out, err = await login(live)
    assert code == 0, (out, err)
    before = stored(live)["issuers"][live.issuer]

    code, out, err = await run_cli(live, "token")
    assert code == 0, err
    token = out.strip()
    assert token != before["access_token"]
    assert live.svc.tokens.verify(token, audience=live.issuer)["client_id"] == CLI_CLIENT_ID
    after = stored(live)["issuers"][live.issuer]
    assert after["access_token"] == token
    assert after["refresh_token"] != before["refresh_token"]  # rotated and stored
    assert mode(live.config_dir / "tokens.json") == 0o600
    refreshes = [
        r for r in audit_events(live.svc, "token.issued")
        if r["data"]["grant_type"] == "refresh_token"
    ]  # fmt: skip
    assert len(refreshes) == 1
    # And again, with the rotated refresh token.
    code, out, err = await run_cli(live, "token")
    assert code == 0, err
    assert stored(live)["issuers"][live.issuer]["refresh_token"] != after["refresh_token"]
    await assert_audit_intact(live.svc)


async def test_denied_login_stores_nothing(live_broker: LiveFactory) -> None:
    live = await live_broker()
    code, _, err = await login(live, decision="deny")
    assert code == 1
    assert "denied" in err
    assert not (live.config_dir / "tokens.json").exists()
    assert audit_events(live.svc, "token.issued") == []


async def test_token_without_login_says_what_to_do(live_broker: LiveFactory) -> None:
    live = await live_broker()
    code, out, err = await run_cli(live, "token")
    assert code == 1
    assert out == ""
    assert "run broker login --issuer" in err
    code, out, err = await run_cli(live, "token", "--issuer", live.issuer)
    assert code == 1 and f"run broker login --issuer {live.issuer}" in err


async def test_login_refuses_plain_http_to_another_host(live_broker: LiveFactory) -> None:
    live = await live_broker()
    code, _, err = await run_cli(live, "login", "--issuer", "http://broker.example.org")
    assert code == 2 and "https://" in err
    assert not (live.config_dir / "tokens.json").exists()
