"""The broker itself as a test peer: settings on a real OpenBao, started services, and an
HTTP client that checks every response against `openapi.yaml`.

- `make_settings(tmp_path, vault_address, auth, **sections)` builds validated settings.
- `broker_settings` (function): settings on the shared OpenBao, SQLite under tmp_path,
  in-memory cache, the dev upstream.
- `broker` (function): started `Services` (migrated SQLite), closed after the test.
- `client` (function): a `ContractClient` over the app; each response is validated against
  the OpenAPI document before the test sees it.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import pytest_asyncio
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from werkzeug.datastructures import Headers, ImmutableMultiDict

from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault
from broker.services import Services, start_services
from broker.settings import Settings, parse_settings
from broker.storage import Database

SPEC_PATH = Path(__file__).resolve().parents[2] / "openapi.yaml"
_SPEC: OpenAPI | None = None


def openapi() -> OpenAPI:
    global _SPEC
    if _SPEC is None:
        _SPEC = OpenAPI.from_file_path(str(SPEC_PATH))
    return _SPEC


def make_settings(
    tmp_path: Path, vault_address: str, auth: AppRoleAuth, *, mode: str = "dev", **sections: Any
) -> Settings:
    """Settings for a broker on `vault_address`, state under `tmp_path`."""
    data: dict[str, Any] = {
        "server": {"public_url": "http://127.0.0.1:8080", "cookie_secure": False},
        "vault": {
            "address": vault_address,
            "auth": {"method": "approle", "role_id": auth.role_id, "secret_id": auth.secret_id},
        },
        "database": {"url": f"sqlite:///{tmp_path / 'broker.db'}"},
        "cache": {"url": "memory://"},
        "audit": {"path": str(tmp_path / "audit.log")},
        "upstreams": [{"type": "dev", "id": "dev"}] if mode == "dev" else [],
    }
    for section, values in sections.items():
        if isinstance(values, Mapping) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    return parse_settings(data, mode=mode)


async def start_broker(settings: Settings, *, dev_mode: bool = True) -> Services:
    db = Database(settings.database.url)
    try:
        await db.upgrade()
    finally:
        await db.close()
    return await start_services(settings, dev_mode=dev_mode)


@pytest.fixture
def broker_settings(tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth) -> Settings:
    return make_settings(tmp_path, openbao.address, vault_approle)


@pytest_asyncio.fixture
async def broker(broker_settings: Settings) -> AsyncIterator[Services]:
    services = await start_broker(broker_settings)
    try:
        yield services
    finally:
        await services.close()


@dataclass
class Checked:
    """A response already read and validated against openapi.yaml."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    cookies: Mapping[str, str]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


class _Req:
    def __init__(self, response: ClientResponse, body: bytes | None, ctype: str) -> None:
        url = urlsplit(str(response.url))
        self.host_url = f"{url.scheme}://{url.netloc}"
        self.path = url.path
        self.method = response.method.lower()
        self.body = body
        self.content_type = ctype
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(list(response.url.query.items())),
            header=Headers(dict(response.request_info.headers)),
        )


class _Resp:
    def __init__(self, response: ClientResponse, body: bytes) -> None:
        self.status_code = response.status
        self.content_type = response.headers.get("Content-Type", "")
        self.headers = Headers(dict(response.headers))
        self.data = body


class ContractClient:
    """Wraps aiohttp's TestClient; every response is checked against the OpenAPI document."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.raw = client

    async def request(self, method: str, path: str, **kwargs: Any) -> Checked:
        kwargs.setdefault("allow_redirects", False)
        body = kwargs.get("data")
        ctype = "application/x-www-form-urlencoded" if isinstance(body, dict) else ""
        async with self.raw.request(method, path, **kwargs) as response:
            content = await response.read()
            raw_body = urlencode(body).encode() if isinstance(body, dict) else None
            openapi().validate_response(_Req(response, raw_body, ctype), _Resp(response, content))
            cookies = {k: v.value for k, v in response.cookies.items()}
            return Checked(response.status, CIMultiDict(response.headers), content, cookies)

    async def get(self, path: str, **kwargs: Any) -> Checked:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Checked:
        return await self.request("POST", path, **kwargs)


@pytest_asyncio.fixture
async def client(broker: Services) -> AsyncIterator[ContractClient]:
    async with TestClient(TestServer(app_with_services(broker))) as raw:
        yield ContractClient(raw)


async def sign_in(
    client: ContractClient, username: str, groups: tuple[str, ...] = (), next_url: str = "/"
) -> Checked:
    """Sign in through the dev upstream as a browser would; returns the callback response."""
    page = await client.get("/login", params={"next": next_url}, headers={"Accept": "text/html"})
    assert page.status == 200, page.text
    flow = re.search(r'name="flow" value="([^"]+)"', page.text)
    assert flow is not None
    form: dict[str, Any] = {"flow": flow.group(1), "username": username}
    data = [(k, v) for k, v in form.items()] + [("groups", g) for g in groups]
    async with client.raw.post(
        "/login/dev/callback", data=data, allow_redirects=False, headers={"Accept": "text/html"}
    ) as response:
        body = await response.read()
        cookies = {k: v.value for k, v in response.cookies.items()}
        return Checked(response.status, CIMultiDict(response.headers), body, cookies)


def audit_events(svc: Services, event: str | None = None) -> list[dict[str, Any]]:
    """The audit records written so far (all, or only those of `event`)."""
    path = Path(svc.settings.audit.path)
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if event is None or r["event"] == event]
