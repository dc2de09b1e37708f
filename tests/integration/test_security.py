"""Who gets in, how much they may send, and what never leaks: scopes on every route, rate limits
with Retry-After, and logs of a whole run free of phone numbers, addresses, texts and keys."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from email.message import EmailMessage

import aiosmtplib
import httpx
import pytest

from services.api.app import create_app
from services.api.auth import RANK
from services.sms.app import create_app as create_sms_app
from shared.http import HttpServer
from shared.settings import ApiSettings, SmsSettings
from shared.telemetry import NOISY_LIBRARIES, quiet_libraries
from tests.conftest import (
    ADMIN_KEY,
    EMAIL_DOMAINS,
    SMS_PUBLIC_URL,
    Stack,
    eventually,
    make_key,
    settings_env,
    twilio_env,
)
from tests.twilio_forms import post_twilio, sms_form

OUR_NUMBER = "+15550001111"


async def test_an_api_key_over_its_rate_gets_429_with_retry_after(
    stack: Stack, api_replica: Callable[..., Awaitable[str]]
) -> None:
    limited_api = await api_replica(rate_limit_per_key_per_second=5)
    key = await make_key(stack, "client")
    async with httpx.AsyncClient(base_url=limited_api, headers={"x-api-key": key}) as client:
        # One burst: the window starts at the first hit and lasts a second.
        answers = await asyncio.gather(*(client.get("/v1/conversations") for _ in range(15)))
    statuses = [a.status_code for a in answers]
    assert statuses.count(200) >= 5  # a slow burst may reach a second window, never fewer
    limited = [a for a in answers if a.status_code == 429]
    assert limited, statuses
    assert 1 <= int(limited[0].headers["retry-after"]) <= 1
    assert limited[0].json()["error"]["code"] == "rate_limited"
    assert limited[0].json()["error"]["details"]["scope"] == "API key"
    # Another key is counted on its own.
    async with httpx.AsyncClient(base_url=limited_api, headers={"x-api-key": ADMIN_KEY}) as admin:
        assert (await admin.get("/v1/conversations")).status_code == 200


async def test_an_end_user_over_the_turn_rate_gets_429_and_nothing_is_stored(
    stack: Stack, api_replica: Callable[..., Awaitable[str]]
) -> None:
    limited_api = await api_replica(rate_limit_turns_per_end_user_per_minute=3)
    async with httpx.AsyncClient(
        base_url=limited_api, headers={"x-api-key": ADMIN_KEY}, timeout=20
    ) as client:
        conv = (await client.post("/v1/conversations", json={})).json()
        turns = f"/v1/conversations/{conv['id']}/turns"
        for _ in range(3):
            ok = await client.post(turns, json={"user_message": "what are your hours?"})
            assert ok.status_code == 200, ok.text
        limited = await client.post(turns, json={"user_message": "one more"})
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert limited.json()["error"]["details"]["scope"] == "end user"
        other = (await client.post("/v1/conversations", json={})).json()
        fresh = await client.post(
            f"/v1/conversations/{other['id']}/turns", json={"user_message": "hi"}
        )
        assert fresh.status_code == 200  # a different end user is not held back
    texts = [t.content for t in await stack.core.store.turns_after(conv["id"], 0, 100)]
    assert "one more" not in texts


async def test_a_sender_over_the_sms_rate_gets_429_but_stop_still_works(stack: Stack) -> None:
    env = {**settings_env(stack.servers, stack.namespace), "email_domains": EMAIL_DOMAINS}
    # Ingress only: it never calls Twilio, so no REST base URL is needed.
    settings = SmsSettings(
        **env, **twilio_env("http://127.0.0.1:9"), rate_limit_sms_per_sender_per_minute=2
    )
    server = HttpServer(create_sms_app(settings), "127.0.0.1", 0)
    await server.start()
    sender = "+14155550188"

    async def text(body: str, n: int) -> httpx.Response:
        form = sms_form(body, sender, sid=f"SM{n:032x}")
        return await post_twilio(
            SMS_PUBLIC_URL + "/twilio/sms", form, listening=f"http://127.0.0.1:{server.port}"
        )

    try:
        assert [(await text("hello", i)).status_code for i in range(2)] == [200, 200]
        limited = await text("hello again", 2)
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert (await text("STOP", 3)).status_code == 200
    finally:
        await server.stop()


def _routes() -> list[tuple[str, str, str]]:
    """Every (method, path, least scope) the API serves, read from the app itself."""
    app = create_app(ApiSettings(api_port=0))
    found = []
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            if handler.opt.get("public") or route.path.startswith("/schema"):
                continue
            for method in handler.http_methods - {"OPTIONS"}:  # CORS preflight: Litestar's own
                found.append((method, route.path, handler.opt.get("scope", "admin")))
    return sorted(set(found))


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x_unknown", path)


async def _answer(client: httpx.AsyncClient, method: str, url: str) -> httpx.Response:
    """The response, its body read unless it is an endless event stream (its status is enough)."""
    async with client.stream(method, url, json={}) as answer:
        if not answer.headers.get("content-type", "").startswith("text/event-stream"):
            await answer.aread()
    return answer


async def test_every_route_enforces_its_scope_for_every_key(stack: Stack) -> None:
    routes = _routes()
    declared = {(m, p): s for m, p, s in routes}
    # The routes whose scope matters most are pinned here, not only read from the app.
    assert declared[("POST", "/v1/api-keys")] == "admin"
    assert declared[("POST", "/v1/webhooks")] == "admin"
    resolve = "/v1/conversations/{conversation_id:str}/approvals/{approval_id:str}/resolve"
    assert declared[("POST", resolve)] == "operator"
    assert declared[("POST", "/v1/conversations/{conversation_id:str}/human-turns")] == "operator"
    assert declared[("POST", "/v1/conversations/{conversation_id:str}/turns")] == "client"
    keys = {scope: await make_key(stack, scope) for scope in ("client", "operator")}
    keys["admin"] = ADMIN_KEY
    walked = 0
    for method, path, needed in routes:
        url = _concrete(path)
        async with stack.client(None) as anonymous:
            answer = await _answer(anonymous, method, url)
        assert answer.status_code == 401, (method, path)
        for scope, key in keys.items():
            async with stack.client(key) as client:
                answer = await _answer(client, method, url)
            if RANK[scope] < RANK[needed]:
                assert answer.status_code == 403, (method, path, scope, answer.text)
                assert answer.json()["error"]["details"]["needed"] == needed
            else:
                assert answer.status_code not in (401, 403), (method, path, scope, answer.text)
                assert answer.status_code < 500, (method, path, scope, answer.text)
            walked += 1
    print(f"walked {len(routes)} routes × {len(keys)} scopes + anonymous: {walked} checks")
    assert len(routes) >= 25


async def test_logs_of_a_whole_run_hold_no_pii_and_no_secrets(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """API, SMS, email and voice traffic at INFO: no number, address, message text or key in any
    log line or its structured fields."""
    caplog.set_level(logging.INFO)
    levels = {name: logging.getLogger(name).level for name in NOISY_LIBRARIES}
    quiet_libraries()  # what every service's logging set-up does (`configure_logging`)
    try:
        await _whole_run(stack, caplog)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


async def _whole_run(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    phone = "+14155550147"
    address = "dana.private@example.com"
    texts = ["my secret order text 7731", "sms body with private words", "mail body 5521"]
    key = await make_key(stack, "client")
    async with stack.client(key) as client:
        conv = (await client.post("/v1/conversations", json={})).json()
        await client.post(f"/v1/conversations/{conv['id']}/turns", json={"user_message": texts[0]})
    form = sms_form(texts[1], phone, sid="SM" + "e" * 32)
    await post_twilio(SMS_PUBLIC_URL + "/twilio/sms", form, listening=stack.sms_url)
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = address, "support@acme.test", "Private subject"
    msg.set_content(texts[2])
    await aiosmtplib.send(msg, hostname="127.0.0.1", port=stack.smtp_port)
    await eventually(lambda: _sms_reply(stack, phone), what="the SMS reply")
    await eventually(lambda: _at_least(len(stack.relay.messages), 1), what="the mail reply")
    secrets = [phone, phone[2:], "4155550147", address, "dana.private", key, ADMIN_KEY, *texts]
    leaks = []
    for record in caplog.records:
        if record.levelno < logging.INFO:
            continue
        rendered = record.getMessage() + " " + " ".join(map(str, vars(record).values()))
        leaks += [f"{record.name}: {s!r}" for s in secrets if s in rendered]
    # The run did log, in every service it went through: the check saw real lines.
    loggers = {r.name for r in caplog.records}
    assert {"switchboard.core", "switchboard.sms", "switchboard.egress.sms"} <= loggers, loggers
    assert not leaks, leaks


async def _sms_reply(stack: Stack, phone: str) -> bool:
    return any(r.form.get("To") == phone for r in stack.twilio.requests)


async def _at_least(n: int, least: int) -> bool:
    return n >= least
