"""`switchboard up`'s port checks: a port in use is named with its variable, and a listener that
is not the process just started is refused (the old false "✓")."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from services.supervisor.cli import verify_listener
from services.supervisor.embedded import ChildProcess, StartError
from services.supervisor.ports import Port, busy, check_free, listens


def test_a_port_in_use_is_named_with_the_variable_to_set() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert busy("127.0.0.1", port)
        assert listens(os.getpid(), port)
        problems = check_free("127.0.0.1", [Port(port, "SWITCHBOARD_API_PORT", "api: HTTP API")])
    assert problems == [
        f"port {port} on 127.0.0.1 (api: HTTP API) is already in use: stop what listens there "
        "(another `switchboard up`?) or set SWITCHBOARD_API_PORT to a free port"
    ]
    assert not busy("127.0.0.1", port)
    assert check_free("127.0.0.1", [Port(port, "SWITCHBOARD_API_PORT", "api")]) == []


def test_a_port_answered_by_another_process_is_not_taken_for_the_new_one(tmp_path: Path) -> None:
    with socket.socket() as taken:  # an old gateway still holding the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        child = ChildProcess(
            "api", [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "api.log"
        )
        try:
            with pytest.raises(StartError, match=f"port {port} .* not from the api just started"):
                verify_listener(child, [Port(port, "SWITCHBOARD_API_PORT", "HTTP API")], 0.5)
        finally:
            child.stop()
