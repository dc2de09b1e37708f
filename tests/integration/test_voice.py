"""The voice channel with signed Twilio webhooks: speech in, TwiML out, live-call updates."""

from __future__ import annotations

import secrets
from typing import Any
from xml.etree import ElementTree

import httpx

from tests.conftest import (
    HUMAN_QUEUE,
    TWILIO_SID,
    VOICE_PUBLIC_URL,
    Stack,
    eventually,
)
from tests.twilio_forms import post_twilio

CALLER = "+14155550123"
OUR_NUMBER = "+15550002222"


class Call:
    """A phone call as Twilio drives it: signed form posts, following the TwiML we answer."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.sid = "CA" + secrets.token_hex(16)

    async def post(self, url: str, **fields: str) -> ElementTree.Element:
        """POST to an absolute public URL (as found in our TwiML) or a path, signed."""
        url = url if url.startswith("http") else VOICE_PUBLIC_URL + url
        form = {
            "CallSid": self.sid,
            "AccountSid": TWILIO_SID,
            "From": CALLER,
            "To": OUR_NUMBER,
            "Direction": "inbound",
            **fields,
        }
        response = await post_twilio(url, form, listening=self.stack.voice_url, timeout=20)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/xml")
        return ElementTree.fromstring(response.text)

    async def start(self) -> ElementTree.Element:
        return await self.post("/twilio/voice", CallStatus="ringing")

    async def say(self, twiml: ElementTree.Element, words: str) -> ElementTree.Element:
        """Speak into the Gather the last TwiML opened."""
        gather = twiml.find("Gather")
        assert gather is not None, ElementTree.tostring(twiml)
        return await self.post(gather.attrib["action"], SpeechResult=words, Confidence="0.92")

    async def hang_up(self) -> None:
        await self.post("/twilio/voice/status", CallStatus="completed", CallDuration="42")


def spoken(twiml: ElementTree.Element) -> str:
    return " ".join(e.text or "" for e in twiml.iter("Say"))


async def voice_conversation(stack: Stack, call: Call) -> Any:
    cid = await eventually(lambda: stack.core.store.conversation_by_call(call.sid), what="the call")
    return await stack.core.store.get_conversation(cid)


async def test_a_full_call_with_three_speech_turns_and_a_hang_up(stack: Stack) -> None:
    call = Call(stack)
    twiml = await call.start()
    gather = twiml.find("Gather")
    assert gather is not None
    assert (gather.attrib["input"], gather.attrib["actionOnEmptyResult"]) == ("speech", "true")
    assert gather.attrib["action"].startswith(VOICE_PUBLIC_URL + "/twilio/voice/gather")
    assert "Acme Support" in spoken(twiml)
    twiml = await call.say(twiml, "how long do refunds take")
    assert "14 days" in spoken(twiml)
    twiml = await call.say(twiml, "what is the status of order 12345")
    assert spoken(twiml) == "Order 12345 is shipped."
    twiml = await call.say(twiml, "and your hours?")
    assert "Monday to Friday" in spoken(twiml)
    await call.hang_up()
    await call.hang_up()  # a duplicate callback is harmless
    conv = await voice_conversation(stack, call)

    async def closed() -> bool:
        return (await stack.core.store.get_conversation(conv.id)).status == "closed"

    await eventually(closed, what="the hang-up to close the conversation")
    transcript = (await stack.api.get(f"/v1/conversations/{conv.id}/turns")).json()["items"]
    # The greeting the caller heard opens the transcript.
    assert [t["role"] for t in transcript] == ["assistant"] + ["user", "assistant"] * 3
    assert "Acme Support" in transcript[0]["content"]
    assert transcript[1]["content"] == "how long do refunds take"
    assert (await stack.api.get(f"/v1/conversations/{conv.id}")).json()["closed_reason"] == (
        "call_completed"
    )


async def test_a_slow_agent_is_answered_by_hold_and_redirect(stack: Stack) -> None:
    call = Call(stack)
    twiml = await call.start()
    await voice_conversation(stack, call)
    await stack.core.stop()  # the agent is away: nothing can answer within the budget
    held = await call.say(twiml, "how long does standard shipping take")
    assert spoken(held) == "One moment, please."
    assert held.find("Pause") is not None
    redirect = held.find("Redirect")
    assert redirect is not None
    assert "/twilio/voice/poll" in (redirect.text or "")
    await stack.restart_core()

    async def answered() -> str | None:
        twiml = await call.post(redirect.text or "")
        if spoken(twiml) != "One moment, please.":
            return spoken(twiml)
        updates = [r for r in stack.twilio.requests if f"/Calls/{call.sid}.json" in r.path]
        return "3-5 business days (by call update)" if updates else None

    heard = await eventually(answered, timeout=20, what="the reply after the hold")
    assert "3-5 business days" in heard
    updates = [r for r in stack.twilio.requests if f"/Calls/{call.sid}.json" in r.path]
    polled = "by call update" not in heard
    assert len(updates) == (0 if polled else 1)  # spoken exactly once, one way or the other


async def test_asking_for_a_person_dials_the_human_queue(stack: Stack) -> None:
    call = Call(stack)
    twiml = await call.say(await call.start(), "I want to talk to a human")
    dial = twiml.find("Dial")
    assert dial is not None
    assert dial.text == HUMAN_QUEUE
    conv = await voice_conversation(stack, call)
    assert (await stack.core.store.get_conversation(conv.id)).status == "waiting_for_human"


async def test_without_a_queue_number_the_caller_hears_an_apology_and_stays(stack: Stack) -> None:
    await stack.restart_core(human_queue_number=None)
    call = Call(stack)
    twiml = await call.say(await call.start(), "can I speak to a representative")
    assert twiml.find("Dial") is None
    assert "nobody from our team is available" in spoken(twiml)
    assert twiml.find("Gather") is not None
    conv = await voice_conversation(stack, call)
    assert (await stack.core.store.get_conversation(conv.id)).status == "active"
    events = (await stack.api.get(f"/v1/conversations/{conv.id}/events")).json()["items"]
    assert "voice.transfer_unavailable" in [e["type"] for e in events]


async def test_no_speech_reprompts_once_then_says_goodbye(stack: Stack) -> None:
    call = Call(stack)
    twiml = await call.start()
    gather = twiml.find("Gather")
    assert gather is not None
    reprompt = await call.post(gather.attrib["action"])  # silence: no SpeechResult
    assert "didn't catch that" in spoken(reprompt)
    again = reprompt.find("Gather")
    assert again is not None
    goodbye = await call.post(again.attrib["action"])
    assert "Goodbye" in spoken(goodbye)
    assert goodbye.find("Hangup") is not None


async def test_twilio_retrying_a_gather_hears_the_answer_again(stack: Stack) -> None:
    """Twilio re-sends a webhook whose response it did not get: the caller must hear the answer
    that was produced, not a hold followed by silence, and the turn is applied once."""
    call = Call(stack)
    twiml = await call.start()
    gather = twiml.find("Gather")
    assert gather is not None
    first = await call.post(gather.attrib["action"], SpeechResult="and your hours?")
    retry = await call.post(gather.attrib["action"], SpeechResult="and your hours?")
    assert "Monday to Friday" in spoken(first)
    assert spoken(retry) == spoken(first)
    conv = await voice_conversation(stack, call)
    transcript = (await stack.api.get(f"/v1/conversations/{conv.id}/turns")).json()["items"]
    assert [t["role"] for t in transcript] == ["assistant", "user", "assistant"]


async def test_reprompts_and_goodbye_are_in_the_transcript_as_system_turns(stack: Stack) -> None:
    call = Call(stack)
    twiml = await call.start()
    gather = twiml.find("Gather")
    assert gather is not None
    reprompt = await call.post(gather.attrib["action"])
    again = reprompt.find("Gather")
    assert again is not None
    await call.post(again.attrib["action"])
    conv = await voice_conversation(stack, call)

    async def transcript() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = (
            await stack.api.get(f"/v1/conversations/{conv.id}/turns")
        ).json()["items"]
        return items if len(items) == 3 else None

    turns = await eventually(transcript, what="greeting, re-prompt and goodbye in the transcript")
    assert [(t["role"], t["author"]["kind"]) for t in turns] == [
        ("assistant", "agent"),
        ("system", "system"),
        ("system", "system"),
    ]
    assert "didn't catch that" in turns[1]["content"]
    assert "Goodbye" in turns[2]["content"]


async def test_a_caller_who_texted_before_is_the_same_end_user(stack: Stack) -> None:
    sms_form = {
        "MessageSid": "SM" + secrets.token_hex(16),
        "AccountSid": TWILIO_SID,
        "From": CALLER,
        "To": OUR_NUMBER,
        "Body": "hello",
        "NumMedia": "0",
    }
    from tests.conftest import SMS_PUBLIC_URL

    texted = await post_twilio(SMS_PUBLIC_URL + "/twilio/sms", sms_form, listening=stack.sms_url)
    assert texted.status_code == 200
    call = Call(stack)
    await call.say(await call.start(), "hello again")
    voice = await voice_conversation(stack, call)
    sms = await eventually(lambda: _first(stack, "sms"), what="the SMS conversation")
    assert sms.end_user_id == voice.end_user_id


async def test_an_operator_message_during_a_voice_handoff_is_spoken_by_call_update(
    stack: Stack,
) -> None:
    call = Call(stack)
    await call.say(await call.start(), "I need a person")
    conv = await voice_conversation(stack, call)
    await stack.api.post(
        f"/v1/conversations/{conv.id}/human-turns", json={"content": "Hi, this is Sam from Acme."}
    )

    async def updated() -> Any:
        found = [r for r in stack.twilio.requests if f"/Calls/{call.sid}.json" in r.path]
        return found or None

    update = (await eventually(updated, timeout=15, what="the live-call update"))[0]
    assert update.status == 200
    assert "Hi, this is Sam from Acme." in update.form["Twiml"]
    assert "<Gather" in update.form["Twiml"]


async def test_unsigned_voice_webhooks_are_403(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.voice_url) as client:
        response = await client.post(
            "/twilio/voice", data={"CallSid": "CA1", "AccountSid": TWILIO_SID}
        )
    assert response.status_code == 403
    # Which URL the check used, so a proxy or tunnel mismatch is obvious.
    assert response.json()["error"]["details"]["url"] == VOICE_PUBLIC_URL + "/twilio/voice"


async def _first(stack: Stack, channel: str) -> Any:
    page = await stack.core.store.list_conversations(
        cursor=None, limit=10, filters={"channel": channel}
    )
    return page.items[0] if page.items else None
