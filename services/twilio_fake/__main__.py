"""`python -m services.twilio_fake`: the local Twilio REST stand-in on SWITCHBOARD_TWILIO_FAKE_PORT."""

from __future__ import annotations

import asyncio
import logging
import os

from services.twilio_fake.app import build, serve
from shared.runner import run_service
from shared.settings import TwilioSettings


async def run(settings: TwilioSettings, stop: asyncio.Event) -> None:
    fake = build(
        {settings.twilio_account_sid: settings.twilio_auth_token, **settings.subaccounts()},
        os.environ.get("SWITCHBOARD_TWILIO_SPEC"),
    )
    port = int(os.environ.get("SWITCHBOARD_TWILIO_FAKE_PORT", "8099"))
    server = await serve(fake, settings.host, port)
    logging.getLogger("switchboard.twilio_fake").info(
        "fake Twilio REST API ready", extra={"port": server.port}
    )
    await stop.wait()
    await server.stop()


def main() -> None:
    run_service("twilio-fake", TwilioSettings, run)


if __name__ == "__main__":
    main()
