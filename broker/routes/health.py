"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from aiohttp import web

from broker.errors import BrokerError
from broker.state import services

READY_TIMEOUT = 3.0


async def healthz(request: web.Request) -> web.Response:
    """The process is up; says nothing about its peers."""
    return web.json_response({"status": "ok"}, headers={"Cache-Control": "no-store"})


async def _check(probe: Awaitable[None]) -> str:
    try:
        await asyncio.wait_for(probe, READY_TIMEOUT)
    except BrokerError as error:
        return error.description
    except TimeoutError:
        return "no answer within the time limit"
    return "ok"


async def readyz(request: web.Request) -> web.Response:
    """Ready when Vault, SQL and the cache all answer; 503 names every one that does not."""
    svc = services(request)
    vault, sql, cache = await asyncio.gather(
        _check(svc.vault.health()), _check(svc.db.ping()), _check(svc.cache.ping())
    )
    checks = {"vault": vault, "sql": sql, "cache": cache}
    failed = sorted(name for name, result in checks.items() if result != "ok")
    body = {"status": "unavailable" if failed else "ready", "checks": checks, "failed": failed}
    return web.json_response(
        body, status=503 if failed else 200, headers={"Cache-Control": "no-store"}
    )


async def metrics(request: web.Request) -> web.Response:
    body = services(request).metrics.render()
    return web.Response(
        body=body,
        headers={
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8",
            "Cache-Control": "no-store",
        },
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics, name="metrics")
