"""The broker as an operator runs it: `broker dev`, `broker serve` replicas, `broker keys`,
start-up refusal on an invalid policy. Real processes, real OpenBao, real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from broker.devvault import DevVault, provision

BROKER = str(Path(sys.executable).with_name("broker"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"broker exited early with {process.returncode}")
        try:
            if _get(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready in {timeout} s")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_broker_dev_serves_and_leaves_no_child_after_sigint(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [BROKER, "dev", "--state-dir", str(tmp_path / "state"), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        assert process.stdout is not None
        banner = b""
        deadline = time.monotonic() + 60
        while b"Press Ctrl-C" not in banner and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            banner += line
        text = banner.decode()
        assert "DEVELOPMENT MODE" in text
        base = re.search(r"Start page\s+(http://127\.0\.0\.1:\d+)/", text)
        assert base is not None, text
        status, body, headers = _get(base.group(1) + "/.well-known/openid-configuration")
        assert status == 200 and json.loads(body)["issuer"] == base.group(1)
        status, body, headers = _get(base.group(1) + "/jwks.json")
        assert status == 200 and json.loads(body)["keys"][0]["kty"] == "EC"
        assert headers["Cache-Control"].startswith("public, max-age=")
        status, body, _ = _get(base.group(1) + "/readyz")
        assert status == 200, body
        children = _children(process.pid)
        assert children, "broker dev should have started OpenBao as its child"
        assert (tmp_path / "state" / "vault-secret-id").stat().st_mode & 0o077 == 0
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        for pid in children:
            assert not _alive(pid), f"child {pid} survived SIGINT"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def served_config(tmp_path: Path, fresh_openbao: DevVault) -> Iterator[Path]:
    auth = asyncio.run(provision(fresh_openbao.address, fresh_openbao.root_token))
    secret = tmp_path / "secret-id"
    secret.write_text(auth.secret_id)
    secret.chmod(0o600)
    config = {
        "server": {"public_url": "http://127.0.0.1:8080"},
        "vault": {
            "address": fresh_openbao.address,
            "auth": {
                "method": "approle",
                "role_id": auth.role_id,
                "secret_id": {"file": str(secret)},
            },
        },
        "database": {"url": f"sqlite:///{tmp_path / 'broker.db'}"},
        "audit": {"path": str(tmp_path / "audit.log")},
        "keys": {"refresh_interval": 1, "jwks_max_age": 60},
    }
    path = tmp_path / "broker.toml"
    path.write_text(tomli_w.dumps(config))
    yield path


def _serve(config: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [BROKER, "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_two_replicas_publish_the_same_jwks_and_follow_a_rotation(served_config: Path) -> None:
    subprocess.run([BROKER, "db", "upgrade", "--config", str(served_config)], check=True)
    ports = [_free_port(), _free_port()]
    replicas = [_serve(served_config, p) for p in ports]
    try:
        for port, process in zip(ports, replicas, strict=True):
            _wait_ready(f"http://127.0.0.1:{port}/readyz", process)
        first = [_get(f"http://127.0.0.1:{p}/jwks.json")[1] for p in ports]
        assert first[0] == first[1]
        rotated = subprocess.run(
            [BROKER, "keys", "rotate", "--config", str(served_config)],
            capture_output=True,
            text=True,
            check=True,
        )
        new_kid = re.search(r"new key (\S+)", rotated.stdout)
        assert new_kid is not None
        deadline = time.monotonic() + 15
        seen: list[bytes] = []
        while time.monotonic() < deadline:
            seen = [_get(f"http://127.0.0.1:{p}/jwks.json")[1] for p in ports]
            if all(new_kid.group(1).encode() in body for body in seen):
                break
            time.sleep(0.3)
        assert seen[0] == seen[1]
        assert len(json.loads(seen[0])["keys"]) == 2
        audit = subprocess.run(
            [BROKER, "audit", "verify", "--config", str(served_config)],
            capture_output=True,
            text=True,
        )
        assert audit.returncode == 0, audit.stdout
    finally:
        for process in replicas:
            process.terminate()
            process.wait(timeout=15)


def test_invalid_policy_stops_start_up(served_config: Path, tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "site.cedar").write_text(
        '@id("broken")\npermit (principal, action, resource) when { principal.nope };\n'
    )
    text = served_config.read_text() + f'\n[policy]\ndirectory = "{policies}"\n'
    served_config.write_text(text)
    process = _serve(served_config, _free_port())
    try:
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode not in (0, None)
    message = stderr.decode()
    assert "site.cedar" in message and "cannot be loaded" in message
    assert "Traceback" not in message
