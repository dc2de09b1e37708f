"""`switchboard streams migrate`: bring existing JetStream streams to the current configuration."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from shared.bus import Bus
from shared.settings import CommonSettings, load_settings
from shared.streams import NotDrained
from shared.streams import migrate_streams as migrate


def migrate_streams(say: Callable[[str], None]) -> int:
    """`switchboard streams migrate` against NATS_URL: see shared/streams.py, "Upgrades"."""
    settings = load_settings(CommonSettings)
    bus = Bus.of(settings, "switchboard-streams")

    async def run() -> list[str]:
        await bus.connect()
        try:
            return await migrate(bus.js, bus.stream_configs())
        finally:
            await bus.close()

    try:
        migrated = asyncio.run(run())
    except NotDrained as exc:
        say(f"error: {exc}")
        return 1
    say(f"migrated: {', '.join(migrated)}" if migrated else "every stream is up to date")
    return 0
