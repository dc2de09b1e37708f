"""`python -m services.email`: the inbound SMTP server until SIGINT/SIGTERM."""

from __future__ import annotations

from services.email.app import run
from shared.runner import run_service
from shared.settings import EmailSettings


def main() -> None:
    run_service("email", EmailSettings, run)


if __name__ == "__main__":
    main()
