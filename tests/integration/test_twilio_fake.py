"""The Twilio fake refuses what Twilio's OpenAPI description refuses, in Twilio's error shape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from twilio.base.exceptions import TwilioRestException

from services.twilio_fake.app import FakeTwilio, build, find_spec, serve
from shared.settings import TwilioSettings
from shared.twilio import rest_client

SID = "AC" + "a" * 32
TOKEN = "secret-token"
MESSAGES = f"/2010-04-01/Accounts/{SID}/Messages.json"

pytestmark = pytest.mark.skipif(
    find_spec() is None,
    reason="Twilio's OpenAPI description is not at ../shared/reference/twilio (a plain clone)",
)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeTwilio, httpx.AsyncClient]]:
    fake = build({SID: TOKEN})
    server = await serve(fake, "127.0.0.1", 0)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{server.port}", auth=(SID, TOKEN)
    ) as client:
        yield fake, client
    await server.stop()


def twilio_error(response: httpx.Response, status: int, code: int) -> dict[str, object]:
    body = response.json()
    assert response.status_code == status, body
    assert set(body) == {"code", "message", "more_info", "status"}
    assert (body["code"], body["status"]) == (code, status)
    return body  # type: ignore[no-any-return]


async def test_a_valid_message_gets_the_documented_resource_shape(fake: tuple) -> None:  # type: ignore[type-arg]
    _, client = fake
    response = await client.post(
        MESSAGES,
        data={
            "To": "+14155550109",
            "From": "+15550001111",
            "Body": "hi",
            "StatusCallback": "https://x.test/s",
        },
    )
    assert response.status_code == 201
    body = response.json()
    spec = json.loads(find_spec().read_text())  # type: ignore[union-attr]
    documented = spec["components"]["schemas"]["api.v2010.account.message"]["properties"]
    assert set(body) == set(documented)
    assert body["sid"].startswith("SM")
    assert len(body["sid"]) == 34
    assert (body["status"], body["to"], body["body"]) == ("queued", "+14155550109", "hi")


async def test_the_twilio_library_talks_to_the_fake(fake: tuple) -> None:  # type: ignore[type-arg]
    fake_twilio, client = fake
    settings = TwilioSettings(
        twilio_account_sid=SID, twilio_auth_token=TOKEN, twilio_base_url=str(client.base_url)
    )
    twilio, http = rest_client(settings)
    try:
        message = await twilio.messages.create_async(
            to="+14155550109", from_="+15550001111", body="hello"
        )
        assert message.sid.startswith("SM")
        with pytest.raises(TwilioRestException) as caught:
            await twilio.messages.create_async(to="+15005550001", from_="+15550001111", body="x")
        assert caught.value.code == 21211
    finally:
        await http.close()
    assert fake_twilio.requests[0].form == {
        "To": "+14155550109",
        "From": "+15550001111",
        "Body": "hello",
    }


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ({"To": "+14155550109", "From": "+15550001111", "Body": "x", "Bdy": "typo"}, 20001),
        ({"From": "+15550001111", "Body": "x"}, 20001),  # To is required
        (
            {"To": "+14155550109", "From": "+15550001111", "Body": "x", "SmartEncoded": "maybe"},
            20001,
        ),
        (
            {
                "To": "+14155550109",
                "From": "+15550001111",
                "Body": "x",
                "StatusCallback": "not a url",
            },
            20001,
        ),
        ({"To": "+14155550109", "Body": "x"}, 21603),  # no From
        ({"To": "+14155550109", "From": "+15550001111"}, 21619),  # no Body
        ({"To": "+14155550109", "From": "+15550001111", "Body": "x" * 1601}, 21617),
        ({"To": "12", "From": "+15550001111", "Body": "x"}, 21211),
    ],
)
async def test_requests_the_spec_refuses_get_twilios_error_shape(
    fake: tuple, form: dict[str, str], code: int
) -> None:  # type: ignore[type-arg]
    _, client = fake
    twilio_error(await client.post(MESSAGES, data=form), 400, code)


async def test_wrong_credentials_are_401(fake: tuple) -> None:  # type: ignore[type-arg]
    _, client = fake
    response = await client.post(MESSAGES, data={"To": "+14155550109"}, auth=(SID, "wrong"))
    twilio_error(response, 401, 20003)


async def test_unknown_paths_and_methods_are_refused(fake: tuple) -> None:  # type: ignore[type-arg]
    _, client = fake
    twilio_error(await client.post(f"/2010-04-01/Accounts/{SID}/Nope.json"), 404, 20404)
    twilio_error(await client.delete(MESSAGES), 405, 20004)
    bad_sid = "/2010-04-01/Accounts/ACnot-a-sid/Messages.json"
    response = await client.post(bad_sid, data={"To": "+1"}, auth=("ACnot-a-sid", TOKEN))
    assert response.status_code in (400, 401)
