"""The voice service: Twilio's call, speech and status webhooks, each signature-checked.

A call's start and every utterance are stored in JetStream before we answer. When the agent
answers within the budget, its reply rides the same webhook response (`<Say>` + the next
`<Gather>`); otherwise the caller hears a short hold and a `<Redirect>` polls for it, and egress may
speak it by updating the live call. Whoever claims the reply first speaks it, exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, post

from services.voice.twiml import GOODBYE, REPROMPT, Speech
from shared.bus import Reply, ReplyInbox
from shared.envelopes import (
    CallEnded,
    CallStarted,
    InboundMessage,
    Prompted,
    ThreadHints,
    TurnReply,
)
from shared.errors import InvalidRequest
from shared.http import probe_handlers, provider_webhook_error, serve_until, trace_requests
from shared.identity import make_identifier, normalize_phone
from shared.ids import reply_key
from shared.models import Turn, utcnow
from shared.service import Service
from shared.settings import VoiceSettings
from shared.twilio import signed_form as signed_twilio_form
from shared.twilio import warn_if_unsigned

log = logging.getLogger("switchboard.voice")
_enc = msgspec.json.Encoder()
TWIML = "text/xml"
FINAL_STATUSES = {"completed", "busy", "no-answer", "failed", "canceled"}
MAX_POLLS = 10


async def _reply_within(replies: asyncio.Queue[Reply], seconds: float) -> TurnReply | None:
    """The reply to a spoken turn (a call's turns are not streamed: no deltas), or None."""
    try:
        async with asyncio.timeout(seconds):
            while not isinstance(item := await replies.get(), TurnReply):
                pass
            return item
    except TimeoutError:
        return None


def create_app(settings: VoiceSettings) -> Litestar:
    service = Service("voice", settings)
    metrics, subjects, bus, store = service.metrics, service.subjects, service.bus, service.store
    speech = Speech(settings)
    inbox = ReplyInbox(bus)  # core answers a spoken turn here (shared/bus/replies.py)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        warn_if_unsigned(settings, "voice")
        async with service.opened():
            await inbox.open()
            try:
                yield
            finally:
                await inbox.close()

    async def signed_form(request: Request[Any, Any, Any]) -> dict[str, str]:
        params = await signed_twilio_form(request, settings, settings.public_voice_url())
        if not params.get("CallSid"):
            raise InvalidRequest("CallSid is required")
        return params

    def twiml(body: str) -> Response[str]:
        return Response(body, media_type=TWIML)

    def call_thread(form: dict[str, str]) -> dict[str, Any]:
        return {
            "channel": "voice",
            "received_at": utcnow(),
            "sender": make_identifier("phone", form.get("From") or form.get("Caller", "")),
            "recipient": normalize_phone(form.get("To") or form.get("Called", "")),
            "thread": ThreadHints(call_sid=form["CallSid"]),
            "thread_key": form["CallSid"],
            "provider_id": form["CallSid"],
        }

    async def conversation_of(call_sid: str) -> str | None:
        """Core opens the call's conversation from the call-started envelope and announces it.
        Known after the call's first words; before that, listening before reading the store
        again, so an announcement in between is not missed."""
        if (cid := await store.conversation_by_call(call_sid)) is not None:
            return cid
        async with bus.listen(subjects.call_opened(call_sid), lambda m: m.data.decode()) as opened:
            if (cid := await store.conversation_by_call(call_sid)) is not None:
                return cid
            try:
                return await asyncio.wait_for(opened.get(), settings.voice_reply_budget_seconds)
            except TimeoutError:
                return await store.conversation_by_call(call_sid)

    async def answer_to(env: InboundMessage, cid: str) -> TurnReply | Turn | None:
        """Publish a spoken turn and wait, within the budget, for core's reply on our inbox
        (expected before publishing, so it cannot arrive unawaited). A Twilio retry of an envelope
        JetStream already holds: its answer from the store if core gave it (the answer is stored
        before the reply is sent, and we follow the conversation's replies from before that
        read), else the reply of the first delivery, which may wait in another process."""
        budget = settings.voice_reply_budget_seconds
        with inbox.expect(env.id) as replies:
            ack = await bus.publish(
                subjects.inbound("voice", env.routing_key), _enc.encode(env), msg_id=env.id
            )
            if not ack.duplicate:
                return await _reply_within(replies, budget)
        async with inbox.following(cid, env.id) as feed:
            answered = await store.seen_seq(cid, reply_key(env.id))
            earlier = await store.get_turn(cid, answered) if answered else None
            return earlier if earlier is not None else await _reply_within(feed, budget)

    async def speak(reply: Turn) -> str | None:
        """The TwiML for a reply, unless egress already spoke it by updating the live call.

        A webhook may speak a reply again: Twilio retries a request whose response it did not
        get, and the caller must hear the answer then, not a hold followed by silence."""
        holder = await store.claim_or_holder(f"voice:{reply.id}", "webhook")
        if holder not in (None, "webhook"):
            return None
        if any(
            c.name == "transfer_call" and (c.result or {}).get("transferred")
            for c in reply.tool_calls
        ) and (number := await queue_number(reply.conversation_id)):
            return speech.transfer(reply.content, number)
        return speech.reply(reply.content)

    async def queue_number(cid: str) -> str | None:
        """Where a transfer dials: the conversation's revision says, else the settings do."""
        conv = await store.get_conversation(cid)
        revision = await store.get_revision(conv.pinned_revision_id)
        return revision.human_queue_number or settings.human_queue_number

    @post("/twilio/voice", status_code=200, media_type=TWIML)
    async def call_started(request: Request[Any, Any, Any]) -> Response[str]:
        form = await signed_form(request)
        thread = call_thread(form)
        # The agent routed for the number called greets in its own words (else the settings').
        revision = await store.answering_revision(thread["recipient"], settings.default_agent)
        greeting = (revision.voice_greeting if revision else None) or settings.voice_greeting
        env = CallStarted(id=f"env_call_{form['CallSid']}", greeting=greeting, **thread)
        await bus.publish(
            subjects.inbound("voice", env.routing_key), _enc.encode(env), msg_id=env.id
        )
        return twiml(speech.greet(greeting))

    @post("/twilio/voice/gather", status_code=200, media_type=TWIML)
    async def gathered(
        request: Request[Any, Any, Any], turn: str = "", attempt: int = 1
    ) -> Response[str]:
        form = await signed_form(request)
        said = form.get("SpeechResult", "").strip()
        if not said:
            # Said on silence, so the transcript shows what the caller heard.
            text, answer = (
                (REPROMPT, speech.reprompt()) if attempt < 2 else (GOODBYE, speech.goodbye())
            )
            key = hashlib.sha256(f"{form['CallSid']}|{turn}|{attempt}".encode()).hexdigest()[:32]
            prompt = Prompted(id=f"env_prompt_{key}", text=text, **call_thread(form))
            await bus.publish(
                subjects.inbound("voice", prompt.routing_key), _enc.encode(prompt), msg_id=prompt.id
            )
            return twiml(answer)
        cid = await conversation_of(form["CallSid"])
        if cid is None:
            return twiml(speech.sorry())
        key = hashlib.sha256(f"{form['CallSid']}|{turn or said}".encode()).hexdigest()[:32]
        env = InboundMessage(
            id=f"env_voice_{key}",
            text=said,
            conversation_id=cid,
            metadata={"confidence": form.get("Confidence", "")},
            reply_inbox=inbox.token,
            **call_thread(form),
        )
        reply = await answer_to(env, cid)
        if isinstance(reply, Turn):  # Twilio retried a request we answered: say the same again
            return twiml(await speak(reply) or speech.reply("Is there anything else?"))
        if reply is None:
            return twiml(speech.hold(env.id, 1))
        if reply.turn is not None and reply.outcome == "answered":
            return twiml(await speak(reply.turn) or speech.reply("Is there anything else?"))
        return twiml(speech.hold(env.id, 1))

    @post("/twilio/voice/poll", status_code=200, media_type=TWIML)
    async def poll(request: Request[Any, Any, Any], envelope: str, polls: int = 1) -> Response[str]:
        """After a hold: speak the reply if it has arrived (and nobody spoke it yet)."""
        form = await signed_form(request)
        cid = await store.conversation_by_call(form["CallSid"])
        seq = await store.seen_seq(cid, reply_key(envelope)) if cid else None
        answer = await store.get_turn(cid, seq) if cid and seq else None
        if answer is not None:
            spoken = await speak(answer)
            return twiml(spoken or speech.reply("Is there anything else I can help with?"))
        if polls >= MAX_POLLS:
            return twiml(speech.sorry())
        return twiml(speech.hold(envelope, polls + 1))

    @post("/twilio/voice/status", status_code=200, media_type=TWIML)
    async def status(request: Request[Any, Any, Any]) -> Response[str]:
        form = await signed_form(request)
        state = form.get("CallStatus", "")
        if state in FINAL_STATUSES:
            env = CallEnded(
                id=f"env_callend_{form['CallSid']}", reason=f"call_{state}", **call_thread(form)
            )
            await bus.publish(
                subjects.inbound("voice", env.routing_key), _enc.encode(env), msg_id=env.id
            )
        return twiml("<Response/>")

    return Litestar(
        route_handlers=[
            call_started,
            gathered,
            poll,
            status,
            *probe_handlers(service.ready, metrics),
        ],
        lifespan=[lifespan],
        middleware=[trace_requests],
        exception_handlers={Exception: provider_webhook_error},
        request_max_body_size=64 * 1024,
        openapi_config=None,
        logging_config=None,
    )


async def run(settings: VoiceSettings, stop: asyncio.Event) -> None:
    await serve_until(create_app(settings), settings.host, settings.voice_port, stop, "voice")
