"""`python -m services.core`: run the core service until SIGINT/SIGTERM."""

from __future__ import annotations

from services.core.app import run
from shared.runner import run_service
from shared.settings import CoreSettings


def main() -> None:
    run_service("core", CoreSettings, run)


if __name__ == "__main__":
    main()
