"""The API service: `create_app(settings)` builds the Litestar app; `run` serves it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Litestar, MediaType, Request, Response
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from nats.aio.msg import Msg

from services.api.auth import BOOTSTRAP_KEY_ID, KeyRing, authenticate
from services.api.console import console_router
from services.api.gateway import Gateway
from services.api.openapi import complete_document, openapi_config, swagger_assets
from services.api.routes.admin import AgentController, IdentityController, KeyController
from services.api.routes.conversations import ConversationController
from services.api.routes.dead_letters import DeadLetterController
from services.api.routes.dependencies import APP_DEPENDENCIES
from services.api.routes.handoffs import EventStreamController, HandoffController, InboxController
from services.api.routes.operators import ApprovalController, OperatorController
from services.api.routes.platform import SimulationController, WebhookController
from services.api.routes.routing import RouteController
from shared.bus import TRANSIENT
from shared.errors import ErrorResponse, RateLimited, SwitchboardError, error_body
from shared.http import probe_handlers, serve_until, trace_requests
from shared.service import Service
from shared.settings import ApiSettings

log = logging.getLogger("switchboard.api")
MAX_BODY = 1024 * 1024


def _error(
    status: int,
    code: str,
    message: str,
    details: dict[str, object] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[ErrorResponse]:
    return Response(
        error_body(code, message, details),
        status_code=status,
        media_type=MediaType.JSON,
        headers=headers,
    )


def on_domain_error(
    request: Request[Any, Any, Any], exc: SwitchboardError
) -> Response[ErrorResponse]:
    if exc.status >= 500:
        log.error("request failed: %s", exc.code, extra={"path": request.url.path})
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None
    return _error(exc.status, exc.code, exc.message, exc.details, headers)


def on_validation_error(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[ErrorResponse]:
    errors = exc.extra if isinstance(exc.extra, list) else []
    details: dict[str, object] = {"errors": errors}
    message = "the request is malformed"
    missing = _missing_body_fields(request, errors)
    if missing is not None:  # no body at all: name what it needs
        message = "the request body is missing" + (
            f"; it needs {', '.join(missing)}" if missing else ""
        )
        details["missing"] = missing
    elif errors and isinstance(errors[0], dict) and errors[0].get("message"):
        first = errors[0]
        source = first.get("source") or ""
        where = str(getattr(source, "value", source))
        message = f"{first['message']}" + (f" (in the {where})" if where else "")
    return _error(422, "invalid_request", message, details)


def _missing_body_fields(request: Request[Any, Any, Any], errors: list[Any]) -> list[str] | None:
    """The required fields of the body, when the error is that there is no body (Litestar reports
    it as a KeyError on `data`); None for any other validation error."""
    if not any(
        isinstance(e, dict) and e.get("key") == "data" and e.get("message") == "'data'"
        for e in errors
    ):
        return None
    field = request.route_handler.parsed_data_field
    body_type = field.annotation if field is not None else None
    if not (isinstance(body_type, type) and issubclass(body_type, msgspec.Struct)):
        return []
    return [f.name for f in msgspec.structs.fields(body_type) if f.required]


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorResponse]:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    if exc.status_code == 400:  # malformed JSON and friends: the body is unusable
        return _error(422, "invalid_request", exc.detail)
    # 405 carries `Allow` (RFC 9110 §15.5.6): the methods this path does declare.
    return _error(exc.status_code, code, exc.detail, headers=exc.headers or None)


def on_undecodable_body(
    request: Request[Any, Any, Any], exc: RecursionError | UnicodeDecodeError
) -> Response[ErrorResponse]:
    # Litestar parses JSON generically before msgspec validates it, and lets these two escape:
    # nesting thousands of levels deep, and bytes that are not UTF-8. The body's fault, not ours.
    if isinstance(exc, RecursionError):
        return _error(422, "invalid_request", "the body is nested too deeply")
    return _error(422, "invalid_request", "the body is not valid UTF-8")


def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorResponse]:
    if isinstance(exc, TRANSIENT):  # Valkey or NATS is down or restarting: the client may retry
        log.warning(
            "dependency unavailable: %s", type(exc).__name__, extra={"path": request.url.path}
        )
        return _error(503, "unavailable", "a dependency is unavailable; try again shortly")
    log.exception("unhandled error", extra={"path": request.url.path})
    return _error(500, "internal_error", "something went wrong on our side")


def create_app(settings: ApiSettings) -> Litestar:
    service = Service("api", settings)
    metrics, subjects, bus = service.metrics, service.subjects, service.bus
    gateway = Gateway(settings, bus, service.store)
    keyring = KeyRing(service.store)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with service.opened():

            async def forget(msg: Msg) -> None:
                keyring.forget(msg.data.decode(errors="replace"))

            revocations = await bus.nc.subscribe(subjects.key_revoked, cb=forget)
            await gateway.inbox.open()
            try:
                await gateway.screens.start()
                if settings.bootstrap_api_key:
                    # A fixed id: a changed bootstrap secret replaces (revokes) the previous one.
                    await keyring.create(
                        "bootstrap",
                        ("admin",),
                        secret=settings.bootstrap_api_key,
                        key_id=BOOTSTRAP_KEY_ID,
                    )
                    # Other replicas may hold the previous bootstrap key in their cache: drop it.
                    await bus.publish_core(subjects.key_revoked, BOOTSTRAP_KEY_ID.encode())
                log.info("api ready", extra={"port": settings.api_port})
                yield
            finally:
                await gateway.screens.aclose()
                await gateway.inbox.close()
                await revocations.unsubscribe()

    app = Litestar(
        route_handlers=[
            ConversationController,
            IdentityController,
            AgentController,
            KeyController,
            OperatorController,
            ApprovalController,
            WebhookController,
            SimulationController,
            DeadLetterController,
            RouteController,
            HandoffController,
            InboxController,
            EventStreamController,
            console_router,
            *probe_handlers(service.ready, metrics),
            swagger_assets(),
        ],
        lifespan=[lifespan],
        middleware=[trace_requests, authenticate],
        dependencies=APP_DEPENDENCIES,
        state=State({"gateway": gateway, "keyring": keyring, "metrics": metrics}),
        exception_handlers={
            SwitchboardError: on_domain_error,
            ValidationException: on_validation_error,
            HTTPException: on_http_error,
            RecursionError: on_undecodable_body,
            UnicodeDecodeError: on_undecodable_body,
            Exception: on_unexpected,
        },
        openapi_config=openapi_config(),
        request_max_body_size=MAX_BODY,
        debug=False,
        logging_config=None,
    )
    complete_document(app)
    return app


async def run(settings: ApiSettings, stop: asyncio.Event) -> None:
    await serve_until(create_app(settings), settings.host, settings.api_port, stop, "api")
