"""Before `up` starts anything, every port it needs must be free; after it starts a server, the
process answering on that port must be the one it started (not an older gateway still running)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Port:
    number: int
    variable: str  # the environment variable that moves it
    what: str


def busy(host: str, port: int) -> bool:
    """True when something listens on host:port. SO_REUSEADDR as the servers themselves use it, so
    a port held only by connections in TIME_WAIT counts as free, as it is for them."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def check_free(host: str, ports: list[Port]) -> list[str]:
    """One message per port in use, naming the port, what needs it and what to set."""
    return [
        f"port {p.number} on {host} ({p.what}) is already in use: stop what listens there "
        f"(another `switchboard up`?) or set {p.variable} to a free port"
        for p in ports
        if busy(host, p.number)
    ]


def listens(pid: int, port: int) -> bool:
    """True when process `pid` itself holds a listening socket on `port`."""
    try:
        connections = psutil.Process(pid).net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections
    )
