"""Running a service process: settings, logging, uvloop, and a clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from shared.settings import S, load_settings
from shared.telemetry import configure_logging

log = logging.getLogger("switchboard")


def run_service(
    name: str, settings_type: type[S], run: Callable[[S, asyncio.Event], Awaitable[None]]
) -> None:
    settings = load_settings(settings_type)
    configure_logging(name, settings.log_level, settings.log_format)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop)
        log.info("stopped", extra={"service": name})

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        asyncio.run(main())
