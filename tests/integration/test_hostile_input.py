"""Hostile input at every door: generated bodies for every API operation in our own OpenAPI
document, generated Twilio forms and raw mail, oversize and deeply nested bodies, invalid UTF-8,
header injection. Expected every time: a 4xx (or SMTP 5xx) with a reason, never a 5xx, never a
crash, and no partial state.

Hypothesis drives a synchronous client from a worker thread, so the event loop that serves the
stack stays free to answer.
"""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
from typing import Any
from urllib.parse import quote

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    ADMIN_KEY,
    SMS_PUBLIC_URL,
    TWILIO_SID,
    VOICE_PUBLIC_URL,
    Stack,
    eventually,
)
from tests.twilio_forms import post_twilio_sync

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same inputs on every run: a failure here reproduces
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


# OpenAPI → strategies ------------------------------------------------------------------------


def schema_strategy(schema: dict[str, Any], doc: dict[str, Any], depth: int = 0) -> Any:
    """Values that follow `schema` closely enough to reach the handlers (schemathesis-like)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return schema_strategy(doc["components"]["schemas"][name], doc, depth + 1)
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return st.one_of([schema_strategy(s, doc, depth + 1) for s in schema[key]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([schema_strategy({**schema, "type": k}, doc, depth) for k in kind])
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        if depth > 4:
            return st.just({})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: schema_strategy(v, doc, depth + 1) for k, v in props.items() if k in required},
            optional={
                k: schema_strategy(v, doc, depth + 1) for k, v in props.items() if k not in required
            },
        )
    if kind == "array":
        items = schema.get("items", {})
        return st.lists(schema_strategy(items, doc, depth + 1), max_size=3)
    if kind == "string":
        return st.text(
            min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 30), 30)
        )
    if kind == "integer":
        return st.integers(schema.get("minimum", -(2**40)), schema.get("maximum", 2**40))
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return json_values


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]


def validator(doc: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A JSON Schema validator for one schema of the document, its `$ref`s resolved in it."""
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]})


def request_is_valid(
    doc: dict[str, Any], op: dict[str, Any], body: Any, sent_body: bool, query: dict[str, Any]
) -> bool:
    """Whether the document calls this request valid (path parameters are any string)."""
    spec = op.get("requestBody")
    if spec is not None:
        schema = spec["content"]["application/json"]["schema"]
        if not sent_body:
            if spec.get("required", True):
                return False
        elif not validator(doc, schema).is_valid(body):
            return False
    return all(
        validator(doc, p.get("schema", {})).is_valid(query[p["name"]])
        for p in op.get("parameters", [])
        if p["in"] == "query" and p["name"] in query
    )


def check_against_document(
    doc: dict[str, Any],
    op: dict[str, Any],
    response: httpx.Response,
    valid: bool,
    what: Any,
    routed: bool = True,
) -> None:
    """The response is one the document lists for this operation, with the body it documents;
    a request the document calls valid is never refused for its shape, and one it calls invalid
    always is (422 `invalid_request`). A path parameter with a `/` in it does not reach the
    operation at all (`routed` false): that request is only held to the statuses documented."""
    documented = op["responses"].get(str(response.status_code))
    assert documented is not None, (
        what,
        response.status_code,
        sorted(op["responses"]),
        response.text,
    )
    schema = documented.get("content", {}).get("application/json", {}).get("schema")
    if schema is not None:
        errors = [e.message for e in validator(doc, schema).iter_errors(response.json())]
        assert not errors, (what, response.status_code, errors[:3], response.text[:500])
    else:
        assert not response.content, (what, response.status_code, response.text[:300])
    shape_refusal = response.status_code == 422 and "errors" in response.json()["error"]["details"]
    if valid:
        assert not shape_refusal, ("valid under the document, refused", what, response.text)
    elif response.status_code not in (401, 429, 503) and routed:
        assert shape_refusal, ("invalid under the document, accepted", what, response.text)


def fuzz_operation(
    base_url: str,
    doc: dict[str, Any],
    method: str,
    path: str,
    op: dict,  # type: ignore[type-arg]
    known_ids: dict[str, list[str]],
) -> tuple[int, int]:
    """Run generated requests against one operation, each checked against what the document
    promises; returns how many were sent and how many of those the document calls valid."""
    body_schema = (
        op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    )
    bodies = (
        st.one_of(schema_strategy(body_schema, doc), json_values, st.just(NO_BODY))
        if body_schema
        else st.just(NO_BODY)
    )
    params = [p for p in op.get("parameters", []) if p.get("in") in ("path", "query")]
    param_values = st.fixed_dictionaries(
        {
            p["name"]: (
                st.sampled_from(known_ids[p["name"]]) | schema_strategy(p.get("schema", {}), doc)
                if p["name"] in known_ids
                else schema_strategy(p.get("schema", {}), doc)
            )
            for p in params
        }
    )
    sent = valid_sent = 0

    @settings(FUZZ, max_examples=25)
    @given(body=bodies, values=param_values)
    def check(body: Any, values: dict[str, Any]) -> None:
        nonlocal sent, valid_sent
        url = path
        query: dict[str, str] = {}
        typed_query: dict[str, Any] = {}
        for p in params:
            value = values[p["name"]]
            if value is None:  # a query string has no null: the parameter is left out
                continue
            text = value if isinstance(value, str) else json.dumps(value)
            if p["in"] == "path":
                url = url.replace("{" + p["name"] + "}", quote(text or "x", safe=""))
            else:
                query[p["name"]] = text
                typed_query[p["name"]] = value
        sent_body = body is not NO_BODY
        response = client.request(method, url, params=query, json=body if sent_body else None)
        sent += 1
        assert response.status_code < 500 or response.status_code in (503, 504), (
            method,
            url,
            body,
            response.text,
        )
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["code"], response.text
            assert error["message"], response.text
        valid = request_is_valid(doc, op, body, sent_body, typed_query)
        valid_sent += valid
        routed = "%2F" not in url
        check_against_document(doc, op, response, valid, (method, url, body), routed)

    with httpx.Client(base_url=base_url, headers={"x-api-key": ADMIN_KEY}, timeout=20) as client:
        check()
    return sent, valid_sent


NO_BODY = object()


async def test_every_operation_answers_generated_requests_as_its_openapi_document_promises(
    stack: Stack,
) -> None:
    doc = (await stack.api.get("/schema/openapi.json")).json()
    ops = operations(doc)
    assert len(ops) >= 25
    conv = (await stack.api.post("/v1/conversations", json={})).json()
    known_ids = {
        "conversation_id": [conv["id"]],
        "end_user_id": [conv["end_user_id"]],
        "agent_id": [conv["assigned_agent_id"]],
    }
    # Streaming holds the connection for the whole reply; its body is the sync turn's body. The
    # operators' event stream never ends and takes no input (its scope is walked in test_security).
    skipped = {
        ("POST", "/v1/conversations/{conversation_id}/turns/stream"),
        ("GET", "/v1/events/stream"),
    }
    total = valid = 0
    for method, path, op in ops:
        if (method, path) in skipped:
            continue
        sent, ok = await asyncio.to_thread(
            fuzz_operation, stack.base_url, doc, method, path, op, known_ids
        )
        total, valid = total + sent, valid + ok
    print(
        f"\n{total} generated requests ({valid} valid under the document) over "
        f"{len(ops) - len(skipped)} operations: every status and body as documented"
    )
    assert valid > total // 4  # the generator does reach past validation


async def test_generated_turn_bodies_leave_no_partial_state(stack: Stack) -> None:
    conv = (await stack.api.post("/v1/conversations", json={})).json()
    url = f"{stack.base_url}/v1/conversations/{conv['id']}/turns"
    accepted = 0

    @FUZZ
    @given(body=json_values | st.binary(max_size=200))
    def check(body: Any) -> None:
        nonlocal accepted
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        with httpx.Client(headers={"x-api-key": ADMIN_KEY}, timeout=20) as client:
            response = client.post(
                url, content=content, headers={"content-type": "application/json"}
            )
        assert response.status_code < 500, (body, response.text)
        accepted += response.status_code in (200, 202)

    await asyncio.to_thread(check)
    turns = await stack.core.store.turns_after(conv["id"], 0, 1000)
    assert sum(t.role == "user" for t in turns) == accepted  # refused bodies stored nothing


async def test_oversize_deep_and_undecodable_api_bodies_are_clear_4xx(stack: Stack) -> None:
    conv = (await stack.api.post("/v1/conversations", json={})).json()
    url = f"/v1/conversations/{conv['id']}/turns"
    headers = {"content-type": "application/json"}
    cases = {
        "oversize": (b'{"user_message": "' + b"x" * (2 * 1024 * 1024) + b'"}', 413),
        "deep": (b"[" * 100_000 + b"]" * 100_000, 422),
        "deep object": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, 422),
        "invalid utf-8": (b'{"user_message": "caf\xe9 \xff"}', 422),
        "nul bytes": (b'{"user_message": "\x00\x00"}', 422),
    }
    for name, (body, status) in cases.items():
        response = await stack.api.post(url, content=body, headers=headers)
        assert response.status_code == status, (name, response.status_code, response.text[:300])
        assert response.json()["error"]["code"], name
    assert await stack.core.store.turns_after(conv["id"], 0, 10) == []


# Twilio -------------------------------------------------------------------------------------


def signed_post(
    stack: Stack, form: dict[str, str], path: str = "/twilio/sms", voice: bool = False
) -> httpx.Response:
    public, base = (VOICE_PUBLIC_URL, stack.voice_url) if voice else (SMS_PUBLIC_URL, stack.sms_url)
    return post_twilio_sync(public + path, form, listening=base, timeout=20)


TWILIO_FIELDS = [
    "MessageSid",
    "AccountSid",
    "From",
    "To",
    "Body",
    "NumMedia",
    "MediaUrl0",
    "MessageStatus",
    "ErrorCode",
    "CallSid",
    "CallStatus",
    "SpeechResult",
    "Confidence",
    "X",
]
BASE_FORM = {
    "MessageSid": "SM" + "a" * 32,
    "CallSid": "CA" + "a" * 32,
    "AccountSid": TWILIO_SID,
    "From": "+14155550101",
    "To": "+15550001111",
    "Body": "hi",
    "NumMedia": "0",
    "CallStatus": "ringing",
    "MessageStatus": "delivered",
    "SpeechResult": "what are your hours",
}


@pytest.mark.parametrize(
    ("path", "voice"),
    [
        ("/twilio/sms", False),
        ("/twilio/sms/status", False),
        ("/twilio/voice", True),
        ("/twilio/voice/gather", True),
        ("/twilio/voice/poll?envelope=env_x&polls=1", True),
        ("/twilio/voice/status", True),
    ],
)
async def test_generated_twilio_forms_are_answered_or_refused_with_4xx(
    stack: Stack, path: str, voice: bool
) -> None:
    statuses: list[int] = []

    @settings(FUZZ, max_examples=25)
    @given(
        form=st.dictionaries(st.sampled_from(TWILIO_FIELDS), st.text(max_size=60), max_size=8),
        base=st.booleans(),
    )
    def check(form: dict[str, str], base: bool) -> None:
        if base:  # a valid request with generated fields laid over it reaches deeper code
            form = {**BASE_FORM, **form}
        response = signed_post(stack, form, path, voice)
        statuses.append(response.status_code)
        assert response.status_code == 200 or 400 <= response.status_code < 500, (
            path,
            form,
            response.text,
        )

    await asyncio.to_thread(check)
    assert any(400 <= s < 500 for s in statuses)  # the generator did reach the refusals


async def test_sms_text_with_header_injection_and_controls_is_just_text(stack: Stack) -> None:
    body = "hi\r\nBcc: victim@example.com\r\n\r\n<Response><Dial>+1900</Dial></Response>\x07"
    form = {
        "MessageSid": "SM" + "b" * 32,
        "AccountSid": TWILIO_SID,
        "From": "+14155550102",
        "To": "+15550001111",
        "Body": body,
        "NumMedia": "0",
    }
    response = await asyncio.to_thread(signed_post, stack, form)
    assert response.status_code == 200
    assert "Dial" not in response.text  # our TwiML answer is ours, never the user's text

    async def stored() -> list[str]:
        page = await stack.core.store.list_conversations(cursor=None, limit=10, filters={})
        return [
            t.content
            for c in page.items
            for t in await stack.core.store.turns_after(c.id, 0, 10)
            if t.role == "user"
        ]

    texts = await eventually(stored, what="the text stored")
    assert texts == [body]


async def test_oversize_and_undecodable_sms_forms_are_4xx(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.sms_url, timeout=20) as client:
        big = await client.post(
            "/twilio/sms",
            content=b"Body=" + b"x" * 200_000,
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        garbage = await client.post(
            "/twilio/sms",
            content=b"\xff\xfe\x00=\x80",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    assert big.status_code == 413
    assert 400 <= garbage.status_code < 500


# Email --------------------------------------------------------------------------------------


def smtp_send(stack: Stack, data: bytes, sender: str = "fuzz@example.com") -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", stack.smtp_port, timeout=20) as smtp:
        smtp.ehlo()
        code, _ = smtp.mail(sender)
        if code != 250:
            return code, "mail refused"
        code, _ = smtp.rcpt("support@acme.test")
        if code != 250:
            return code, "rcpt refused"
        code, message = smtp.data(data)
        return code, message.decode(errors="replace")


async def test_generated_raw_mail_is_accepted_or_refused_with_a_5xx_reason(stack: Stack) -> None:
    codes: list[int] = []
    header_lines = st.builds(
        lambda name, value: f"{name}: {value}".encode(),
        st.sampled_from(["From", "Subject", "Message-ID", "In-Reply-To", "Content-Type", "X"]),
        st.text(max_size=40).map(lambda s: s.replace("\r", " ").replace("\n", " ")),
    )

    @FUZZ
    @given(headers=st.lists(header_lines, max_size=6), body=st.binary(max_size=300))
    def check(headers: list[bytes], body: bytes) -> None:
        data = b"\r\n".join(headers) + b"\r\n\r\n" + body.replace(b"\r\n.\r\n", b"")
        try:
            code, message = smtp_send(stack, data)
        except smtplib.SMTPDataError as exc:  # smtplib raises for 5xx after DATA
            code, message = exc.smtp_code, str(exc.smtp_error)
        codes.append(code)
        assert code == 250 or 500 <= code < 600, (data[:300], code, message)
        assert code == 250 or re.search(r"\d\.\d\.\d", message), message  # enhanced status code

    await asyncio.to_thread(check)
    assert 250 in codes or any(c >= 500 for c in codes)


async def test_email_header_injection_never_reaches_the_reply(stack: Stack) -> None:
    # An encoded-word subject that decodes to CRLF + a Bcc header.
    data = (
        b"From: eve@example.com\r\n"
        b"To: support@acme.test\r\n"
        b"Subject: =?utf-8?q?hours=0D=0ABcc:_victim@example.com?=\r\n"
        b"Message-ID: <inject-1@example.com>\r\n"
        b"\r\n"
        b"what are your hours?\r\n"
    )
    code, _ = await asyncio.to_thread(smtp_send, stack, data, "eve@example.com")
    assert code == 250
    reply = (await eventually(lambda: _relayed(stack), what="the reply"))[0]
    assert reply["Bcc"] is None
    assert "\n" not in str(reply["Subject"])
    assert "\r" not in str(reply["Subject"])
    assert [str(reply["To"])] == ["eve@example.com"]


async def _relayed(stack: Stack) -> list[Any]:
    return list(stack.relay.messages)
