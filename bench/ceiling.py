"""The ceiling: a bare Litestar endpoint that decodes the API's turn body with msgspec and answers
with a reply of the same shape, served the way every service serves HTTP (uvicorn + httptools +
uvloop, one worker). Nothing the gateway does per turn can be cheaper than this.

    python -m bench.ceiling PORT
"""

from __future__ import annotations

import asyncio
import sys

from litestar import Litestar, get, post

from services.api.schemas import PostTurn, TurnResult
from shared.http import serve_until
from shared.runner import run_service
from shared.settings import CommonSettings


@post("/v1/conversations/{conversation_id:str}/turns", status_code=200)
async def turn(conversation_id: str, data: PostTurn) -> TurnResult:
    return TurnResult(
        turn_id="turn_ceiling",
        conversation_id=conversation_id,
        text=data.user_message,
        session_status="active",
        message_seqs=[1, 2],
        tool_calls=[],
        evidence=[],
    )


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def main() -> None:
    port = int(sys.argv[1])
    app = Litestar([turn, healthz], openapi_config=None, logging_config=None)

    async def run(settings: CommonSettings, stop: asyncio.Event) -> None:
        await serve_until(app, settings.host, port, stop, "ceiling")

    run_service("bench-ceiling", CommonSettings, run)


if __name__ == "__main__":
    main()
