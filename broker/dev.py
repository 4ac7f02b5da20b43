"""`broker dev`: a complete local broker with nothing to set up.

Starts an OpenBao dev server as a child process, provisions it (KV, transit, the
least-privilege policy and an AppRole the broker then uses instead of the root token), writes
a settings file under the state directory (SQLite, in-memory cache, the dev sign-in adapter),
migrates the database and serves. On Ctrl-C or SIGTERM it stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import sys
from pathlib import Path

import tomli_w
from aiohttp import web

from broker.app import create_app
from broker.devvault import DevVault, provision
from broker.logs import configure_logging
from broker.settings import load_settings
from broker.storage import Database


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def write_dev_settings(state: Path, *, host: str, port: int, vault_address: str, role_id: str,
                       secret_id: str) -> Path:  # fmt: skip
    """Write the dev settings file and the AppRole secret (0600) under `state`."""
    secret_file = state / "vault-secret-id"
    secret_file.touch(mode=0o600, exist_ok=True)
    secret_file.chmod(0o600)
    secret_file.write_text(secret_id, encoding="utf-8")
    settings = {
        "server": {
            "public_url": f"http://{host}:{port}",
            "bind_host": host,
            "bind_port": port,
            "cookie_secure": False,
        },
        "vault": {
            "address": vault_address,
            "auth": {
                "method": "approle",
                "role_id": role_id,
                "secret_id": {"file": str(secret_file)},
            },
        },
        "database": {"url": f"sqlite:///{state / 'broker.db'}"},
        "cache": {"url": "memory://"},
        "audit": {"path": str(state / "audit.log")},
        "upstreams": [{"type": "dev", "id": "dev"}],
    }
    path = state / "broker.toml"
    path.write_text(
        "# Written by `broker dev`; rewritten on every start.\n" + tomli_w.dumps(settings),
        encoding="utf-8",
    )
    return path


def _prepare_state(state: Path) -> Path:
    state = state.resolve()
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    return state


def _cli_name() -> str:
    """How the user can call this same `broker` (the venv's may not be on PATH)."""
    ours = Path(sys.executable).with_name("broker")
    found = shutil.which("broker")
    return "broker" if found and Path(found).resolve() == ours.resolve() else str(ours)


def _banner(base: str, vault: DevVault, settings_path: Path) -> str:
    cli = _cli_name()
    return f"""
binder-broker dev is running. DEVELOPMENT MODE: sign-in checks no password.

  Start page   {base}/
  Sign in      {base}/login
  Discovery    {base}/.well-known/openid-configuration
  JWKS         {base}/jwks.json
  Readiness    {base}/readyz
  OpenBao      {vault.address}  (dev server in memory; the broker signs in with AppRole)
  Settings     {settings_path}

Try:
  curl -s {base}/.well-known/openid-configuration
  curl -s {base}/jwks.json
  {cli} login --issuer {base}      (device flow; then `{cli} token`)
  {cli} keys rotate --config {settings_path}
  {cli} audit verify --config {settings_path}

Sign in at {base}/login, then press "Mint a test access token" on the start page.
Press Ctrl-C to stop (OpenBao stops too).
""".strip("\n")


async def run_dev(state: Path, port: int, *, host: str = "127.0.0.1") -> int:
    """Run until SIGINT/SIGTERM. Returns the process exit code."""
    configure_logging("info")
    state = await asyncio.to_thread(_prepare_state, state)
    if port == 0 or not _port_free(host, port):
        chosen = _free_port(host)
        if port:
            print(f"port {port} is busy; using {chosen} instead", flush=True)
        port = chosen
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    vault = await DevVault.start(log_path=state / "openbao.log")
    runner: web.AppRunner | None = None
    try:
        auth = await provision(vault.address, vault.root_token)
        settings_path = write_dev_settings(
            state, host=host, port=port, vault_address=vault.address,
            role_id=auth.role_id, secret_id=auth.secret_id,
        )  # fmt: skip
        settings = load_settings(settings_path, mode="dev")
        db = Database(settings.database.url)
        try:
            await db.upgrade()
        finally:
            await db.close()
        runner = web.AppRunner(create_app(settings, dev_mode=True), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        print(_banner(f"http://{host}:{port}", vault, settings_path), flush=True)
        await stop.wait()
        print("stopping…", flush=True)
    finally:
        if runner is not None:
            await runner.cleanup()
        vault.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    print(f"stopped (OpenBao pid {vault.pid} ended; state kept in {state})", flush=True)
    return 0
