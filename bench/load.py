"""The load generator: one scenario per run, in its own process, result as JSON on stdout.

    python -m bench.load SCENARIO 'CONFIG-JSON'

It runs apart from the gateway's processes on purpose: the servers and the load share the
machine's cores, as they would on one host, and the report says so. A scenario is an async
function from its config to its result, registered in `SCENARIOS`; each lives in the module of
what it drives (`bench/api.py`, `bench/sms.py`, `bench/mail.py`, …).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from bench import api, mail, slow_agent, sms, soak
from bench.client import Config

SCENARIOS: dict[str, Callable[[Config], Coroutine[Any, Any, Config]]] = {
    "ceiling": api.ceiling,
    "api_turns": api.api_turns,
    "sms": sms.sms_capacity,
    "email": mail.email,
    "history": api.history,
    "memory": api.memory,
    "soak": soak.soak,
    "slow_agent": slow_agent.slow_agent,
}


def main() -> None:
    name, cfg = sys.argv[1], json.loads(sys.argv[2])
    try:
        import uvloop

        result: Config = uvloop.run(SCENARIOS[name](cfg))
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        result = asyncio.run(SCENARIOS[name](cfg))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
