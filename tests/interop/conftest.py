"""Helpers for interoperability tests: the broker served on a real loopback port, so that
independent clients (OpenBao, authlib, requests-oauthlib) reach it over TCP exactly as they
would a deployment, and a cookie-keeping "browser" that walks sign-in and consent.

- `serve_broker(tmp_path, openbao, approle, clients=[...], **sections)`: an async context
  manager yielding a `LiveBroker` (services, public URL, discovery document); the site and
  the services are closed on exit.
- `Browser`: an aiohttp session with a cookie jar that accepts cookies for 127.0.0.1; its
  `follow(url, stop_at)` walks redirects through the dev sign-in form and, when asked, the
  consent page, and returns the first redirect that leaves the broker for `stop_at`.
- `rp_openbao` (module): a private OpenBao dev server acting as a relying party, and
  `rp_root`, a synchronous hvac client with its root token. hvac is synchronous: call it
  through `asyncio.to_thread`, or the broker (served on this same event loop) cannot answer
  the discovery and JWKS requests OpenBao makes while hvac waits.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import aiohttp
import hvac
import pytest
import pytest_asyncio
from aiohttp import web

from adapters.base import principal_id
from adapters.upstream.dev import DEV_ISSUER
from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault
from broker.services import Services
from tests.peers.broker import make_settings, start_broker


def free_port() -> int:
    """A loopback port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def dev_sub(username: str) -> str:
    """The `sub` the broker gives a user signed in through the dev upstream."""
    return principal_id(DEV_ISSUER, username)


@dataclass
class LiveBroker:
    services: Services
    url: str
    metadata: dict[str, Any]

    def events(self, name: str) -> list[dict[str, Any]]:
        """Audit records named `name`, oldest first."""
        path = Path(self.services.settings.audit.path)
        lines = path.read_text().splitlines() if path.exists() else []
        return [r for r in map(json.loads, lines) if r["event"] == name]


@asynccontextmanager
async def serve_broker(
    tmp_path: Path,
    openbao: DevVault,
    approle: AppRoleAuth,
    *,
    clients: list[dict[str, Any]],
    **sections: Any,
) -> AsyncIterator[LiveBroker]:
    """Start the broker's services and serve its app on 127.0.0.1:<free port>."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = make_settings(
        tmp_path, openbao.address, approle, clients=clients,
        server={"public_url": url, "cookie_secure": False}, **sections,
    )  # fmt: skip
    services = await start_broker(settings)
    runner = web.AppRunner(app_with_services(services))
    try:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{url}/.well-known/openid-configuration") as response,
        ):
            assert response.status == 200
            metadata = await response.json()
        yield LiveBroker(services, url, metadata)
    finally:
        await runner.cleanup()
        await services.close()


_FLOW = re.compile(r'name="flow" value="([^"]+)"')
_HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')


class Browser:
    """A user agent: keeps cookies, follows redirects by hand, fills the broker's forms."""

    def __init__(self, broker_url: str, username: str = "ada", groups: tuple[str, ...] = ()):
        self.broker_url = broker_url
        self.username = username
        self.groups = groups
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.consent_pages = 0

    async def close(self) -> None:
        await self.http.close()

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def follow(self, url: str, stop_at: str, *, approve: bool = True) -> str:
        """Walk from `url` until a redirect to a URL starting with `stop_at`; return it.

        Signs in through the dev form when the broker asks, and answers a consent page
        (approve or deny).
        """
        method, data = "GET", None
        for _ in range(12):
            async with self.http.request(
                method, url, data=data, allow_redirects=False, headers={"Accept": "text/html"}
            ) as response:
                body = await response.text()
                if response.status in (301, 302, 303, 307):
                    location = urljoin(url, response.headers["Location"])
                    if location.startswith(stop_at):
                        return location
                    method, data, url = "GET", None, location
                    continue
                assert response.status == 200, f"{response.status} at {url}: {body[:500]}"
            method, url, data = "POST", *self._answer(url, body, approve)
        raise AssertionError("too many steps before reaching the client")

    def _answer(self, url: str, page: str, approve: bool) -> tuple[str, Any]:
        """The form submission a user would make on this broker page."""
        if (flow := _FLOW.search(page)) is not None:
            action = re.search(r'<form method="post" action="([^"]+)"', page)
            assert action is not None
            form = [("flow", flow.group(1)), ("username", self.username)]
            form += [("groups", g) for g in self.groups]
            return urljoin(url, action.group(1)), form
        if 'action="/oauth/authorize/consent"' in page:
            self.consent_pages += 1
            fields = dict(_HIDDEN.findall(page))
            fields["decision"] = "approve" if approve else "deny"
            return urljoin(url, "/oauth/authorize/consent"), fields
        raise AssertionError(f"unexpected page at {url}: {page[:500]}")

    async def approve_device(self, user_code: str, *, approve: bool = True) -> str:
        """Sign in, enter `user_code` on /device and approve (or deny); returns the last page."""
        url = f"{self.broker_url}/device"
        async with self.http.get(url, allow_redirects=False) as response:
            if response.status == 302:
                await self.follow(urljoin(url, response.headers["Location"]), url)
        async with self.http.get(url) as response:
            page = await response.text()
            assert response.status == 200, page
        csrf = dict(_HIDDEN.findall(page))["csrf"]
        async with self.http.post(url, data={"csrf": csrf, "user_code": user_code}) as response:
            page = await response.text()
            assert response.status == 200, page
        fields = dict(_HIDDEN.findall(page))
        fields["decision"] = "approve" if approve else "deny"
        async with self.http.post(f"{url}/decision", data=fields) as response:
            page = await response.text()
            assert response.status == 200, page
            return page


def query_of(url: str) -> dict[str, str]:
    """The single-valued query parameters of `url` (a repeated one fails the test)."""
    parsed = parse_qs(urlsplit(url).query)
    assert all(len(v) == 1 for v in parsed.values()), parsed
    return {k: v[0] for k, v in parsed.items()}


@pytest_asyncio.fixture(scope="module")
async def rp_openbao() -> AsyncIterator[DevVault]:
    """A private OpenBao acting as a relying party of the broker (not the broker's own)."""
    vault = await DevVault.start()
    try:
        yield vault
    finally:
        vault.stop()  # terminates and reaps its own child PID


@pytest.fixture(scope="module")
def rp_root(rp_openbao: DevVault) -> Iterator[hvac.Client]:
    client = hvac.Client(url=rp_openbao.address, token=rp_openbao.root_token)
    try:
        yield client
    finally:
        client.adapter.close()
