"""TwiML built with the twilio library's VoiceResponse (it escapes what the agent says)."""

from __future__ import annotations

from urllib.parse import urlencode

from twilio.twiml.voice_response import Gather, VoiceResponse

from shared.ids import ulid
from shared.settings import VoiceSettings

REPROMPT = "Sorry, I didn't catch that. How can I help?"
GOODBYE = "I still can't hear anything, so I'll hang up now. Goodbye!"


class Speech:
    def __init__(self, settings: VoiceSettings) -> None:
        self.settings = settings
        self.base = settings.public_voice_url()

    def url(self, path: str, **query: str) -> str:
        return f"{self.base}{path}" + (f"?{urlencode(query)}" if query else "")

    def gather(self, response: VoiceResponse, prompt: str | None, attempt: int = 1) -> None:
        """Listen for the caller's next sentence. Each Gather has its own `turn` token, so a retried
        webhook carries the same one and becomes the same envelope."""
        gather = Gather(
            input="speech",
            action=self.url("/twilio/voice/gather", turn=ulid(), attempt=str(attempt)),
            method="POST",
            speech_timeout="auto",
            language=self.settings.voice_language,
            action_on_empty_result=True,
        )
        if prompt:
            gather.say(prompt)
        response.append(gather)
        # Twilio only posts to `action` on silence because of actionOnEmptyResult; the redirect is
        # the belt to those braces (DESIGN.md, "sharp edges").
        response.redirect(
            self.url("/twilio/voice/gather", turn=ulid(), attempt=str(attempt)), method="POST"
        )

    def greet(self, greeting: str) -> str:
        response = VoiceResponse()
        self.gather(response, greeting)
        return str(response)

    def reply(self, text: str) -> str:
        response = VoiceResponse()
        self.gather(response, text)
        return str(response)

    def reprompt(self) -> str:
        response = VoiceResponse()
        self.gather(response, REPROMPT, attempt=2)
        return str(response)

    def goodbye(self) -> str:
        response = VoiceResponse()
        response.say(GOODBYE)
        response.hangup()
        return str(response)

    def hold(self, envelope_id: str, polls: int) -> str:
        response = VoiceResponse()
        response.say("One moment, please.")
        response.pause(length=2)
        response.redirect(
            self.url("/twilio/voice/poll", envelope=envelope_id, polls=str(polls)), method="POST"
        )
        return str(response)

    def transfer(self, text: str, number: str) -> str:
        response = VoiceResponse()
        response.say(text)
        response.dial(number)
        return str(response)

    def sorry(self) -> str:
        response = VoiceResponse()
        response.say("Sorry, I'm having trouble right now. Please call again later.")
        response.hangup()
        return str(response)
