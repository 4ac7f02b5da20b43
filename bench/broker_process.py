"""The broker as a benchmark's server process (the `--serve` mode of the load benchmarks).

`serve_broker` starts the services from a settings file, registers the bench user, lets the
benchmark `prepare` what it needs (a stored secret, ...), serves on 127.0.0.1:`port`, writes
a broker access token for the bench user with `scope` to `token_file` (the driver waits for
that file), and stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.services import Services

SUBJECT = "bench-user"


async def serve_broker(
    config_path: str, port: int, token_file: str, *, scope: Sequence[str],
    ttl: int | None = None, prepare: Callable[[Services], Awaitable[None]] | None = None,
) -> None:  # fmt: skip
    from aiohttp import web

    from adapters.base import Principal
    from broker.app import app_with_services
    from broker.logs import configure_logging
    from broker.oauth.issuance import remember_principal
    from broker.settings import load_settings
    from tests.peers.broker import start_broker

    configure_logging("warning")
    settings = load_settings(Path(config_path), mode="production")
    svc = await start_broker(settings, dev_mode=False)
    principal = Principal(idp="bench", issuer="urn:bench", subject=SUBJECT)
    await remember_principal(svc, principal)
    if prepare is not None:
        await prepare(svc)
    minted = await svc.tokens.mint(
        subject=principal.id, audience=settings.server.public_url, client_id="bench",
        scope=scope, ttl=ttl,
    )  # fmt: skip
    runner = web.AppRunner(app_with_services(svc), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    Path(token_file).write_text(minted.token)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()
    await svc.close()
