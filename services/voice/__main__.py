"""`python -m services.voice`: serve the Twilio Voice webhooks until SIGINT/SIGTERM."""

from __future__ import annotations

from services.voice.app import run
from shared.runner import run_service
from shared.settings import VoiceSettings


def main() -> None:
    run_service("voice", VoiceSettings, run)


if __name__ == "__main__":
    main()
