"""openapi.yaml describes exactly the routes the application serves."""

from __future__ import annotations

import re

import yaml
from aiohttp.test_utils import TestClient, TestServer

from broker.app import app_with_services
from broker.services import Services
from tests.peers.broker import SPEC_PATH, ContractClient, openapi


def _served(services: Services) -> set[tuple[str, str]]:
    app = app_with_services(services)
    served = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        methods = ["get", "post"] if route.method == "*" else [route.method.lower()]
        served |= {(path, m) for m in methods if m != "head"}
    return served


async def test_every_route_is_documented_and_nothing_else(broker: Services) -> None:
    spec = yaml.safe_load(SPEC_PATH.read_text())
    documented = {
        (path, method)
        for path, item in spec["paths"].items()
        for method in item
        if method in {"get", "post", "put", "delete", "patch"}
    }
    assert _served(broker) == documented


def test_the_document_is_valid_openapi_3_1() -> None:
    spec = openapi()
    assert spec.spec["openapi"].startswith("3.1")
    assert re.match(r"^\d+\.\d+\.\d+$", spec.spec["info"]["version"])


async def test_discovery_advertises_exactly_the_served_endpoints(broker: Services) -> None:
    app = app_with_services(broker)
    served = {r.canonical for r in app.router.resources()}
    async with TestClient(TestServer(app)) as raw:
        meta = (await ContractClient(raw).get("/.well-known/openid-configuration")).json()
    issuer = meta["issuer"]
    advertised = {v.removeprefix(issuer) for k, v in meta.items() if k.endswith("_endpoint")}
    assert advertised <= served
    oauth_paths = {
        p for p in served if p.startswith("/oauth/") and not p.startswith("/oauth/authorize/")
    }
    assert oauth_paths <= advertised
