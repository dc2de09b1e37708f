"""`python -m services.api`: serve the HTTP API until SIGINT/SIGTERM."""

from __future__ import annotations

from services.api.app import run
from shared.runner import run_service
from shared.settings import ApiSettings


def main() -> None:
    run_service("api", ApiSettings, run)


if __name__ == "__main__":
    main()
