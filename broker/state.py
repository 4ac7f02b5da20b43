"""Typed access to the per-application state handlers need."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from broker.services import Services

SERVICES: web.AppKey[Services] = web.AppKey("services")
DEV_MODE: web.AppKey[bool] = web.AppKey("dev_mode", bool)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
