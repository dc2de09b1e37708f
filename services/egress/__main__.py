"""`python -m services.egress`: run the egress workers until SIGINT/SIGTERM."""

from __future__ import annotations

from services.egress.app import run
from shared.runner import run_service
from shared.settings import EgressSettings


def main() -> None:
    run_service("egress", EgressSettings, run)


if __name__ == "__main__":
    main()
