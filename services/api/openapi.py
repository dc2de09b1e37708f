"""The OpenAPI document, made to say exactly what the API does.

Litestar derives operations and bodies from the handlers' types; this module adds what types cannot
say, in one place, by rule: every operation needs the `x-api-key` security scheme; every error is
the one `Error` body; and each operation lists every status it can answer, from what the handler is
(a path with ids can be 404, a body can be 413/422, a scope above `client` can be 403) plus the
statuses its handler names in `opt={"errors": (...)}` (409, 504). Request body schemas are
msgspec's own JSON Schema of the structs that validate them, so what the document calls valid is
exactly what the API accepts. Swagger UI is served from the `swagger-ui-bundle` package, never from a CDN.
"""

from __future__ import annotations

from typing import Any, cast, get_args

import msgspec
from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import (
    Components,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Reference,
    RequestBody,
    Schema,
    SecurityScheme,
)
from litestar.routes import HTTPRoute
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

SCHEMA_PATH = "/schema"
ASSETS = f"{SCHEMA_PATH}/assets"
SECURITY = "apiKey"

_ERRORS: dict[int, str] = {
    401: "No `x-api-key` header, or an unknown key (`unauthenticated`).",
    403: "The key's scope is below what this route needs (`forbidden`; `details.needed`).",
    404: "An id in the path or body is unknown (`not_found`).",
    409: "Conflicts with the current state: `conversation_closed`, `illegal_transition` or "
    "`conflict` (`details.status` is the current status), `idempotency_key_in_use` (the first "
    "request with this key is still running), `identity_conflict` (both end users named).",
    413: "The body is larger than 1 MiB (`body_too_large`).",
    422: "The request does not match this document (`invalid_request`, `details.errors` says "
    "where), a value is unusable (`invalid_request` with a reason, e.g. a phone number that is "
    "not one), or an `Idempotency-Key` came before with another body (`idempotency_key_reused`).",
    429: "Over a rate limit (`rate_limited`): per API key, or turns per end user. `Retry-After` "
    "says how many seconds to wait.",
    503: "A dependency (NATS, Valkey, core) is unavailable (`unavailable`); retry shortly.",
    504: "The agent did not answer within `SWITCHBOARD_TURN_TIMEOUT_SECONDS` (`turn_timeout`); "
    "the turn is accepted and will appear in the transcript.",
}

ERROR_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    required=["error"],
    additional_properties=False,
    properties={
        "error": Schema(
            type=OpenAPIType.OBJECT,
            required=["code", "message", "details"],
            additional_properties=False,
            properties={
                "code": Schema(type=OpenAPIType.STRING, description="stable, machine-readable"),
                "message": Schema(type=OpenAPIType.STRING, description="for people"),
                "details": Schema(type=OpenAPIType.OBJECT),
            },
        )
    },
)


def openapi_config() -> OpenAPIConfig:
    swagger = SwaggerRenderPlugin(
        js_url=f"{ASSETS}/swagger-ui-bundle.js",
        css_url=f"{ASSETS}/swagger-ui.css",
        standalone_preset_js_url=f"{ASSETS}/swagger-ui-standalone-preset.js",
        favicon=f"<link rel='icon' type='image/png' href='{ASSETS}/favicon-32x32.png'>",
        path=["/swagger", "/"],
    )
    return OpenAPIConfig(
        title="Switchboard API",
        version="1.0.0",
        path=SCHEMA_PATH,
        render_plugins=[swagger],
        components=Components(
            security_schemes={
                SECURITY: SecurityScheme(
                    type="apiKey",
                    name="x-api-key",
                    security_scheme_in="header",
                    description="An API key (`POST /v1/api-keys`); scopes nest admin ⊃ "
                    "operator ⊃ client.",
                )
            },
        ),
        security=[{SECURITY: []}],
    )


def swagger_assets() -> ControllerRouterHandler:
    """Swagger UI's JavaScript and CSS, from the installed package: the page works offline."""
    return create_static_files_router(
        path=ASSETS, directories=[swagger_ui_path], include_in_schema=False, opt={"public": True}
    )


def complete_document(app: Litestar) -> None:
    """Add security, error responses and the exact request schemas to the generated document.

    Runs once, before the document is first served (Litestar caches it on first build)."""
    openapi = app.openapi_schema
    bodies: set[type[msgspec.Struct]] = set()
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or route.path_format not in (openapi.paths or {}):
            continue
        item = (openapi.paths or {})[route.path_format]
        for handler in route.route_handlers:
            if not handler.resolve_include_in_schema():
                continue
            data = handler.parsed_data_field
            for method in handler.http_methods:
                operation = getattr(item, method.lower(), None)
                if not isinstance(operation, Operation):
                    continue
                _complete(operation, handler.opt, data is not None)
                if data is not None and isinstance(operation.request_body, RequestBody):
                    operation.request_body.required = not data.is_optional
            if data is not None:
                bodies.update(
                    t
                    for t in (data.annotation, *get_args(data.annotation))
                    if isinstance(t, type) and issubclass(t, msgspec.Struct)
                )
    # Request bodies are validated by msgspec, so their schemas are msgspec's own: every
    # constraint (lengths and patterns inside lists too, closed objects) exactly as enforced.
    _, exact = msgspec.json.schema_components(
        sorted(bodies, key=lambda t: t.__name__), ref_template="#/components/schemas/{name}"
    )
    # Litestar replaces the configured component schemas with the generated ones: add ours now.
    openapi.components.schemas = {
        **(openapi.components.schemas or {}),
        **cast(dict[str, Schema], exact),
        "Error": ERROR_SCHEMA,
    }


def _complete(operation: Operation, opt: dict[str, Any], has_body: bool) -> None:
    params = [p for p in operation.parameters or [] if not isinstance(p, Reference)]
    statuses = {401, 429, 503, *opt.get("errors", ())}
    if opt.get("scope", "admin") != "client":
        statuses.add(403)
    if any(p.param_in == "path" for p in params):
        statuses.add(404)
    if has_body:
        statuses |= {413, 422}
    if any(p.param_in in ("query", "header") for p in params):
        statuses.add(422)
    responses = {k: v for k, v in (operation.responses or {}).items() if k != "400"}
    for status in sorted(statuses):
        responses[str(status)] = _error_response(status)
    operation.responses = responses
    operation.security = [{SECURITY: []}]


def _error_response(status: int) -> OpenAPIResponse:
    headers: dict[str, OpenAPIHeader | Reference] | None = (
        {"Retry-After": OpenAPIHeader(schema=Schema(type=OpenAPIType.INTEGER), required=True)}
        if status == 429
        else None
    )
    return OpenAPIResponse(
        description=_ERRORS[status],
        content={
            "application/json": OpenAPIMediaType(schema=Reference("#/components/schemas/Error"))
        },
        headers=headers,
    )
