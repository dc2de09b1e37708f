"""The voice worker: speaks replies that could not ride a webhook response by updating the live
call through Twilio REST. The webhook gets a head start; whoever claims a reply speaks it."""

from __future__ import annotations

import logging
import time
from urllib.parse import urlencode

import msgspec
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client
from twilio.twiml.voice_response import Gather, VoiceResponse

from services.egress.connector import ChannelContext, Consumer
from shared.bus import Delivery, Later, decode_or_dead
from shared.envelopes import OutboundEnvelope
from shared.ids import ulid
from shared.settings import EgressSettings
from shared.store import Store

log = logging.getLogger("switchboard.egress.voice")
_outbound = msgspec.json.Decoder(OutboundEnvelope)


class VoiceSpeaker:
    def __init__(self, settings: EgressSettings, store: Store, client: Client) -> None:
        self.settings = settings
        self.store = store
        self.client = client

    def consumers(self, egress: ChannelContext) -> list[Consumer]:
        return [
            Consumer(
                stream=egress.subjects.outbound_stream,
                durable="egress-voice",
                filter_subject=egress.subjects.outbound("voice") + ".*",
                handler=self.deliver,
                max_ack_pending=64,
                workers=4,
                max_deliver=6,
                backoff=self.head_start,
            )
        ]

    def head_start(self, attempt: int) -> float:
        return self.settings.voice_reply_budget_seconds + 1.0

    def twiml(self, text: str) -> str:
        response = VoiceResponse()
        query = urlencode({"turn": ulid(), "attempt": "1"})
        gather = Gather(
            input="speech",
            method="POST",
            speech_timeout="auto",
            action=f"{self.settings.public_voice_url()}/twilio/voice/gather?{query}",
            language=self.settings.voice_language,
            action_on_empty_result=True,
        )
        gather.say(text)
        response.append(gather)
        return str(response)

    async def deliver(self, delivery: Delivery) -> Later | None:
        out = decode_or_dead(_outbound, delivery.data)
        if out.session_type == "simulation":
            return None
        call_sid = (out.thread.call_sid if out.thread else None) or await self.store.call_of(
            out.conversation_id
        )
        if call_sid is None:
            return None
        age = time.time() - out.created_at.timestamp()
        head_start = self.settings.voice_reply_budget_seconds + 0.5
        if out.author_kind == "agent" and age < head_start:
            # The speech webhook may still speak this reply itself: look again after its budget.
            return Later(head_start - age + 0.5)
        if await self.store.claim_or_holder(f"voice:{out.turn_id}", "egress") is not None:
            return None  # the webhook already spoke it
        try:
            await self.client.calls(call_sid).update_async(twiml=self.twiml(out.text))
        except TwilioRestException as exc:
            if exc.status == 429 or exc.status >= 500:
                raise
            log.info("call not updatable (%s): %s", exc.code, exc.msg, extra={"call": call_sid})
        return None
