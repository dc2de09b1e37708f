"""CPU time of every process of the gateway, read from the kernel before and after a window.

`switchboard up` is the root of the tree: it runs nats-server, valkey-server, each service and the
Twilio fake as children. The load generator adds itself. The cost of a turn is the CPU time all of
them spent in the window divided by the turns completed in it, so a saving in one process that
moves work into another (into nats-server, say) shows up as no saving at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psutil


def process_name(proc: psutil.Process) -> str:
    """`core` for `python -m services.core`, `nats-server` for the broker, and so on."""
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return f"pid {proc.pid}"
    if "-m" in cmdline:
        module = cmdline[cmdline.index("-m") + 1] if cmdline.index("-m") + 1 < len(cmdline) else ""
        if module.startswith("services."):
            name = module.removeprefix("services.")
            return "supervisor" if name == "supervisor" else name
        if module.startswith("bench"):
            return "load generator"
    # valkey-server rewrites its command line into a title ("valkey-server 127.0.0.1:6379").
    return str(proc.name())


@dataclass
class CpuSnapshot:
    seconds: dict[str, float]  # process name -> user + system CPU seconds so far


class GatewayCpu:
    """The gateway's process tree (found once, at the start) plus this process."""

    def __init__(self, root_pid: int | None) -> None:
        procs: list[psutil.Process] = [psutil.Process()]
        if root_pid is not None:
            root = psutil.Process(root_pid)
            procs += [root, *root.children(recursive=True)]
        self.procs = {process_name(p): p for p in procs}

    def snapshot(self) -> CpuSnapshot:
        seconds: dict[str, float] = {}
        for name, proc in self.procs.items():
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue  # a restarted service: its CPU before the restart is lost to the count
            seconds[name] = times.user + times.system
        return CpuSnapshot(seconds)

    @staticmethod
    def per_operation(
        before: CpuSnapshot, after: CpuSnapshot, operations: int, seconds: float
    ) -> dict[str, Any]:
        """CPU milliseconds per operation, in total and per process (largest first), and how
        many cores the whole gateway kept busy over the `seconds` of the window."""
        spent = {
            name: after.seconds[name] - before.seconds.get(name, 0.0)
            for name in after.seconds
            if name in before.seconds
        }
        total = sum(spent.values())
        per_op = max(operations, 1)
        by_process = {
            name: round(seconds * 1000 / per_op, 3)
            for name, seconds in sorted(spent.items(), key=lambda item: -item[1])
        }
        return {
            "ms_per_op": round(total * 1000 / per_op, 3),
            "cpu_seconds": round(total, 3),
            "cores_busy": round(total / seconds, 2) if seconds > 0 else 0.0,
            "by_process": by_process,
        }
