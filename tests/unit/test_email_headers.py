"""The headers of an email reply, built without a relay."""

from __future__ import annotations

from services.egress.email import EmailSender
from services.egress.outages import Outages
from shared.envelopes import OutboundEnvelope, ThreadHints
from shared.settings import EgressSettings
from tests.unit.envelopes_samples import reply_out


def outbound(thread: ThreadHints | None) -> OutboundEnvelope:
    return reply_out(
        id="out_turn_1",
        channel="email",
        text="Refunds take 14 days.",
        recipient="jane@example.com",
        sender="support@acme.test",
        thread=thread,
    )


def test_in_reply_to_names_the_answered_mail_not_the_threads_latest() -> None:
    sender = EmailSender(EgressSettings(email_domains="acme.test"), None, Outages())  # type: ignore[arg-type]
    thread = {"last_message_id": "<second@example.com>", "references": "<first@example.com>"}
    answered = ThreadHints(message_id="<first@example.com>")
    msg = sender.build(outbound(answered), thread)
    assert msg["In-Reply-To"] == "<first@example.com>"
    # A message that does not come from one mail (an operator's) answers the thread's latest.
    msg = sender.build(outbound(None), thread)
    assert msg["In-Reply-To"] == "<second@example.com>"
