"""The fake's HTTP side: Twilio's REST paths, plus `/_fake/*` for tests to read and steer it."""

from __future__ import annotations

import base64
import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import phonenumbers
from litestar import Litestar, Request, Response, delete, get, post, route

from services.twilio_fake.spec import SpecError, TwilioSpec
from shared.http import HttpServer

log = logging.getLogger("switchboard.twilio_fake")

# Twilio's documented test numbers: sending to these fails the way the real API does.
MAGIC_TO = {
    "+15005550001": (400, 21211, "The 'To' number +15005550001 is not a valid phone number."),
    "+15005550009": (400, 21614, "The 'To' number is not a valid mobile number."),
}


@dataclass
class Sent:
    method: str
    path: str
    form: dict[str, str]
    status: int
    response: dict[str, Any]
    # Wall-clock arrival (Unix seconds): lets a benchmark measure turn-to-egress latency.
    at: float = field(default_factory=time.time)


@dataclass
class Fault:
    status: int
    code: int
    remaining: int


@dataclass
class FakeTwilio:
    spec: TwilioSpec | None
    accounts: dict[str, str]  # AccountSid -> AuthToken
    requests: list[Sent] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    # An outage: every request is answered with this status and error code until it is ended.
    outage: tuple[int, int] | None = None

    def app(self) -> Litestar:
        fake = self

        @route("/2010-04-01/{rest:path}", http_method=["GET", "POST", "DELETE"])
        async def twilio(request: Request[Any, Any, Any]) -> Response[Any]:
            return await fake.handle(request)

        @get("/_fake/requests")
        async def sent(path_contains: str = "") -> list[dict[str, Any]]:
            return [dataclasses.asdict(s) for s in fake.requests if path_contains in s.path]

        @post("/_fake/faults", status_code=204)
        async def add_fault(data: dict[str, int]) -> None:
            fake.faults.append(
                Fault(data.get("status", 503), data.get("code", 20500), data.get("count", 1))
            )

        @post("/_fake/outage", status_code=204)
        async def begin_outage(data: dict[str, int]) -> None:
            fake.outage = (data.get("status", 503), data.get("code", 20500))

        @delete("/_fake/outage", status_code=204)
        async def end_outage() -> None:
            fake.outage = None

        @post("/_fake/reset", status_code=204)
        async def reset() -> None:
            fake.requests.clear()
            fake.faults.clear()
            fake.outage = None

        @get("/healthz")
        async def healthz() -> dict[str, str]:
            return {"status": "ok", "service": "twilio-fake"}

        return Litestar(
            [twilio, sent, add_fault, begin_outage, end_outage, reset, healthz],
            openapi_config=None,
            logging_config=None,
        )

    async def handle(self, request: Request[Any, Any, Any]) -> Response[Any]:
        path = request.url.path
        form_multi = await request.form()
        form = {k: form_multi.getall(k) for k in form_multi}
        flat = {k: v[-1] for k, v in form.items()}
        try:
            body, status = self.answer(
                request.method, path, request.headers.get("authorization"), form
            )
        except SpecError as exc:
            body = {
                "code": exc.code,
                "message": exc.message,
                "more_info": f"https://www.twilio.com/docs/errors/{exc.code}",
                "status": exc.status,
            }
            status = exc.status
        self.requests.append(Sent(request.method, path, flat, status, body))
        return Response(body, status_code=status)

    def answer(
        self, method: str, path: str, authorization: str | None, form: dict[str, list[str]]
    ) -> tuple[dict[str, Any], int]:
        if self.outage is not None:
            raise SpecError(*self.outage, "Service Unavailable (injected outage)")
        if self.faults:
            fault = self.faults[0]
            fault.remaining -= 1
            if fault.remaining <= 0:
                self.faults.pop(0)
            raise SpecError(fault.status, fault.code, "injected fault")
        account = path.split("/")[3] if path.count("/") >= 3 else ""
        if not self._authorized(authorization, account):
            raise SpecError(401, 20003, "Authentication Error - invalid username")
        values: dict[str, Any] = {"account_sid": account, "api_version": "2010-04-01"}
        schema = None
        status = 200
        if self.spec is not None:
            op, params = self.spec.operation(method, path)
            self.spec.check(op, params, form)
            schema, status = op.response_schema, op.response_status
        if path.endswith("/Messages.json") and method == "POST":
            values.update(self._message(form))
            status = 201 if self.spec is None else status  # Twilio creates with 201
        elif "/Calls/" in path and method == "POST":
            values.update(
                sid=path.rsplit("/", 1)[-1].removesuffix(".json"),
                status=form.get("Status", ["in-progress"])[-1],
            )
        now = format_datetime(datetime.now(UTC), usegmt=True)
        values.update(date_created=now, date_updated=now)
        return (self.spec.shape(schema, values) if self.spec else values), status

    def _authorized(self, authorization: str | None, account: str) -> bool:
        if not authorization or not authorization.lower().startswith("basic "):
            return False
        try:
            user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
        except ValueError:
            return False
        return user == account and self.accounts.get(user) == password

    def _message(self, form: dict[str, list[str]]) -> dict[str, Any]:
        """The Messages resource's own rules, beyond the schema (Twilio error codes)."""
        to = form.get("To", [""])[-1]
        body = form.get("Body", [""])[-1]
        if to in MAGIC_TO:
            raise SpecError(*MAGIC_TO[to])
        try:
            if not phonenumbers.is_possible_number(phonenumbers.parse(to, None)):
                raise SpecError(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        except phonenumbers.NumberParseException as exc:
            raise SpecError(
                400, 21211, f"The 'To' number {to} is not a valid phone number."
            ) from exc
        if "From" not in form and "MessagingServiceSid" not in form:
            raise SpecError(400, 21603, "A 'From' or 'MessagingServiceSid' parameter is required.")
        if not body and "MediaUrl" not in form and "ContentSid" not in form:
            raise SpecError(400, 21619, "A text message body or media urls must be specified.")
        if len(body) > 1600:
            raise SpecError(
                400, 21617, "The concatenated message body exceeds the 1600 character limit."
            )
        media = form.get("MediaUrl", [])
        prefix = "MM" if media else "SM"
        return {
            "sid": prefix + secrets.token_hex(16),
            "to": to,
            "from": form.get("From", [None])[-1],
            "body": body,
            "status": "queued",
            "direction": "outbound-api",
            "num_media": str(len(media)),
            "num_segments": str(max(1, -(-len(body) // 153))),
            "messaging_service_sid": form.get("MessagingServiceSid", [None])[-1],
        }


def find_spec(explicit: str | None = None) -> Path | None:
    """The spec ships beside the repository (`../shared/reference/twilio/`), not inside it."""
    candidates = [Path(explicit)] if explicit else []
    root = Path(__file__).resolve().parents[2]
    candidates.append(root.parent / "shared" / "reference" / "twilio" / "twilio_api_v2010.json")
    return next((c for c in candidates if c.exists()), None)


def build(accounts: dict[str, str], spec_path: str | None = None) -> FakeTwilio:
    path = find_spec(spec_path)
    if path is None:
        log.warning(
            "Twilio's OpenAPI description not found: the fake checks only the Messages "
            "rules, not the whole spec (set SWITCHBOARD_TWILIO_SPEC)"
        )
    return FakeTwilio(TwilioSpec.load(path) if path else None, accounts)


async def serve(fake: FakeTwilio, host: str, port: int) -> HttpServer:
    server = HttpServer(fake.app(), host, port)
    await server.start()
    return server
