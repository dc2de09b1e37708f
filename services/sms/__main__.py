"""`python -m services.sms`: serve the Twilio SMS webhooks until SIGINT/SIGTERM."""

from __future__ import annotations

from services.sms.app import run
from shared.runner import run_service
from shared.settings import SmsSettings


def main() -> None:
    run_service("sms", SmsSettings, run)


if __name__ == "__main__":
    main()
