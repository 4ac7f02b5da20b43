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
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import tomli_w
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from broker.app import create_app
from broker.devvault import DevVault, provision
from broker.logs import configure_logging
from broker.settings import SettingsError, load_settings
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


_EXTRA_LISTS = ("upstreams", "backends")
_EXTRA_TABLES = ("policy", "grants")


def read_extra_settings(path: Path) -> dict[str, Any]:
    """What a TOML file given to `broker dev --upstreams` adds to the dev settings:
    `[[upstreams]]` (OIDC providers, SAML IdPs), `[[backends]]` (repository hosts, clouds),
    `[policy]` (a directory of your own Cedar policies) and `[grants]`."""
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise SettingsError(str(path), [str(error)]) from None
    allowed = _EXTRA_LISTS + _EXTRA_TABLES
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        problem = f"only {', '.join(allowed)} belong here, not {', '.join(unknown)}"
        raise SettingsError(str(path), [problem])
    for key in _EXTRA_LISTS:
        if not isinstance(data.get(key, []), list):
            raise SettingsError(str(path), [f"{key} must be a list of tables ([[{key}]])"])
    return data


def dev_saml_pair(state: Path) -> tuple[Path, Path]:
    """A self-signed SP key and certificate under `state`, made once and kept (the IdPs you
    register the dev SP with keep trusting it across restarts)."""
    key_path, cert_path = state / "saml-sp-key.pem", state / "saml-sp-cert.pem"
    if key_path.exists() and cert_path.exists():
        return key_path, cert_path
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "binder-broker dev SAML SP")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    key_path.touch(mode=0o600, exist_ok=True)
    key_path.chmod(0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def _with_dev_sp(upstream: dict[str, Any], state: Path) -> dict[str, Any]:
    if upstream.get("type") != "saml" or ("sp_key" in upstream and "sp_cert" in upstream):
        return upstream
    key_path, cert_path = dev_saml_pair(state)
    return {"sp_key": {"file": str(key_path)}, "sp_cert": str(cert_path)} | upstream


def write_dev_settings(
    state: Path,
    *,
    host: str,
    port: int,
    vault_address: str,
    role_id: str,
    secret_id: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the dev settings file and the AppRole secret (0600) under `state`; `extra` is
    what `read_extra_settings` returned."""
    extra = extra or {}
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
        "upstreams": [{"type": "dev", "id": "dev"}]
        + [_with_dev_sp(u, state) for u in extra.get("upstreams", [])],
        "backends": list(extra.get("backends", [])),
    } | {key: extra[key] for key in _EXTRA_TABLES if key in extra}
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


async def run_dev(
    state: Path, port: int, *, host: str = "127.0.0.1", upstreams: Path | None = None
) -> int:
    """Run until SIGINT/SIGTERM. Returns the process exit code."""
    configure_logging("info")
    state = await asyncio.to_thread(_prepare_state, state)
    extra = read_extra_settings(upstreams) if upstreams else {}
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
            role_id=auth.role_id, secret_id=auth.secret_id, extra=extra,
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
        for upstream in settings.upstreams:
            if upstream.type == "saml":
                base = f"http://{host}:{port}/login/{upstream.id}"
                print(f"SAML SP {upstream.id}: metadata {base}/metadata, ACS {base}/callback")
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
