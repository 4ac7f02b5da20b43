"""node oidc-provider (OpenID Certified) as a real upstream OP on loopback.

- `start_oidc_op(clients=..., accounts=..., ...)` runs `node tests/peers/oidc_op/server.mjs`
  on a free port (after `npm install` once if node_modules is missing), waits until its
  discovery document answers and returns an `OidcOp`; `op.stop()` terminates it by PID.
- `scripted_login(http, authorize_url, login, password)` plays the browser at the OP: it
  follows redirects, fills the devInteractions login form, confirms consent and returns the
  URL the OP finally redirects to (the relying party's callback, with code, state and iss).
  `http` must keep cookies for IP hosts: `aiohttp.ClientSession(cookie_jar=op_cookie_jar())`.

See server.mjs for what the OP offers (PKCE required, RFC 9207 iss, refresh tokens rotated
on each use, the `groups` scope with `groups` and `eduperson_scoped_affiliation`).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

NODE_DIR = Path(__file__).resolve().parent / "oidc_op"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def op_cookie_jar() -> aiohttp.CookieJar:
    """A cookie jar that keeps cookies of 127.0.0.1 (aiohttp's default drops IP hosts)."""
    return aiohttp.CookieJar(unsafe=True)


def ensure_node_modules() -> None:
    """`npm install` once; a file lock keeps parallel test processes from racing."""
    if (NODE_DIR / "node_modules" / "oidc-provider").is_dir():
        return
    with open(Path(tempfile.gettempdir()) / "binder-broker-oidc-op-npm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (NODE_DIR / "node_modules" / "oidc-provider").is_dir():
            subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund"],
                cwd=NODE_DIR,
                check=True,
                timeout=300,
                capture_output=True,
            )


@dataclass
class OidcOp:
    """A running node oidc-provider."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    config: dict[str, Any] = field(repr=False)

    @property
    def issuer(self) -> str:
        return str(self.config.get("issuer") or f"http://127.0.0.1:{self.port}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Terminate our own child by PID and reap it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


async def start_oidc_op(
    *,
    clients: list[dict[str, Any]],
    accounts: list[dict[str, Any]],
    workdir: Path,
    port: int | None = None,
    conform_id_token_claims: bool = True,
    extra_params: list[str] | None = None,
    timeout: float = 20.0,
) -> OidcOp:
    """Start an OP; see server.mjs for the shape of `clients` and `accounts`."""
    if shutil.which("node") is None:
        raise RuntimeError("node is not installed")
    ensure_node_modules()
    port = port or free_port()
    config = {
        "port": port,
        "clients": clients,
        "accounts": accounts,
        "conform_id_token_claims": conform_id_token_claims,
        "extra_params": extra_params or [],
    }
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"oidc-op-{port}.json"
    config_path.write_text(json.dumps(config))
    log_path = workdir / f"oidc-op-{port}.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            ["node", str(NODE_DIR / "server.mjs"), str(config_path)],
            cwd=NODE_DIR,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    op = OidcOp(port=port, process=process, log_path=log_path, config=config)
    deadline = time.monotonic() + timeout
    url = f"{op.issuer}/.well-known/openid-configuration"
    async with aiohttp.ClientSession() as http:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"oidc-provider exited early:\n{op.log()}")
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return op
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                op.stop()
                raise RuntimeError(f"oidc-provider did not start:\n{op.log()}")
            await asyncio.sleep(0.05)


class _Forms(HTMLParser):
    """The first form of a page: its action and its input fields."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._in_form = False
        self._done = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form" and not self._done and self.action is None:
            self.action = values.get("action", "")
            self._in_form = True
        elif tag == "input" and self._in_form and values.get("name"):
            self.fields[values["name"]] = values.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form" and self._in_form:
            self._in_form = False
            self._done = True


async def scripted_login(
    http: aiohttp.ClientSession, authorize_url: str, login: str, password: str
) -> str:
    """Sign in at the OP as a browser would; returns the redirect URL back to the client.

    Raises AssertionError with the OP's page when something other than the expected
    login/consent pages and redirects comes back (a wrong password answers 401).
    """
    op_origin = "{0.scheme}://{0.netloc}".format(urlsplit(authorize_url))
    url, method, data = authorize_url, "GET", None
    for _ in range(12):
        async with http.request(method, url, data=data, allow_redirects=False) as response:
            body = await response.text()
            status, location = response.status, response.headers.get("Location")
        if status in (301, 302, 303, 307, 308) and location:
            target = urljoin(url, location)
            if not target.startswith(op_origin + "/"):
                return target
            url, method, data = target, "GET", None
            continue
        if status != 200:
            raise AssertionError(f"OP answered {status} at {url}:\n{body[:2000]}")
        form = _Forms()
        form.feed(body)
        if form.action is None:
            raise AssertionError(f"no form on the OP page {url}:\n{body[:2000]}")
        fields = dict(form.fields)
        if fields.get("prompt") == "login":
            fields.update(login=login, password=password)
        url, method, data = urljoin(url, form.action), "POST", fields
    raise AssertionError("too many steps at the OP")
