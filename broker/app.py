"""The aiohttp application: routes, middleware and the services' lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator

from aiohttp import web

from adapters.vault import AppRoleAuth, TokenAuth
from broker.credentials import run_cleanup
from broker.middleware import build_middlewares
from broker.oauth import admin, authorize, device, introspect, token, userinfo
from broker.oauth import exchange as _exchange  # noqa: F401  (no routes; registers its @grant)
from broker.routes import credentials, health, home, issuer, login, secrets
from broker.routes import git as git_gateway
from broker.routes import grants as reviewer_grants
from broker.routes import lti as lti_tool
from broker.services import Services, start_services
from broker.settings import Settings
from broker.state import DEV_MODE, SERVICES


def _application(settings: Settings, dev_mode: bool) -> web.Application:
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    app[DEV_MODE] = dev_mode
    app.middlewares.extend(build_middlewares(lambda: app[SERVICES].metrics))
    for module in (
        issuer,
        health,
        login,
        home,
        token,
        authorize,
        introspect,
        userinfo,
        admin,
        device,
        credentials,
        secrets,
        git_gateway,
        reviewer_grants,
        lti_tool,
    ):
        module.add_routes(app)
    return app


def create_app(
    settings: Settings,
    *,
    dev_mode: bool = False,
    vault_auth: TokenAuth | AppRoleAuth | None = None,
) -> web.Application:
    """An application whose services start with the server and close with it."""
    app = _application(settings, dev_mode)

    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        svc = await start_services(settings, dev_mode=dev_mode, vault_auth=vault_auth)
        app[SERVICES] = svc
        # What exists now (modules, settings, services) lives as long as the process: keep it
        # out of the cyclic collector, whose full passes over it stall every request in flight.
        gc.freeze()
        cleanup = asyncio.create_task(run_cleanup(svc))
        yield
        cleanup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cleanup
        await svc.close()

    app.cleanup_ctx.append(lifespan)
    return app


def app_with_services(services: Services) -> web.Application:
    """An application over services the caller started and will close (tests, benchmarks)."""
    app = _application(services.settings, services.dev_mode)
    app[SERVICES] = services
    return app
