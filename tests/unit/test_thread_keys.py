"""Thread keys are computed at the edge (issue 13): SMS sender + our number, a call's CallSid, a
mail's root Message-ID; core derives the same key for an envelope from an older ingress."""

import msgspec
import pytest

from services.core.routing import legacy_thread_key
from services.email.handler import InboundMail
from services.email.parsing import parse
from services.sms.messages import envelope_from_form
from shared.envelopes import InboundEnvelope, InboundMessage, ThreadHints
from shared.settings import EmailSettings
from tests.unit.envelopes_samples import message_in

decoder = msgspec.json.Decoder(InboundEnvelope)


def from_older_ingress(env: InboundEnvelope) -> InboundEnvelope:
    """The envelope as an ingress without `thread_key` would have published it."""
    raw = msgspec.json.decode(msgspec.json.encode(env))
    del raw["thread_key"]
    return decoder.decode(msgspec.json.encode(raw))


def mail(headers: str) -> InboundMessage:
    raw = (
        "From: Ann <ann@example.com>\r\nTo: help@support.test\r\nSubject: Hi\r\n"
        f"{headers}\r\n\r\nHello there\r\n"
    ).encode()
    handler = InboundMail.__new__(InboundMail)
    handler.settings = EmailSettings(email_domains="support.test")
    handler.domains = handler.settings.domains()
    return handler.envelope(parse(raw), raw, ["help@support.test"])


def test_an_sms_thread_is_the_sender_and_our_number() -> None:
    form = {"MessageSid": "SM1", "From": "(415) 555-0109", "To": "+1 555 000 1111", "Body": "hi"}
    for body in ("hi", "STOP"):  # a carrier keyword is on the same thread
        env = envelope_from_form({**form, "Body": body})
        assert env.thread_key == "+14155550109|+15550001111"
        assert legacy_thread_key(from_older_ingress(env)) == env.thread_key


@pytest.mark.parametrize(
    ("headers", "root"),
    [
        ("Message-ID: <m3@x>\r\nIn-Reply-To: <m2@x>\r\nReferences: <m1@x> <m2@x>", "<m1@x>"),
        ("Message-ID: <m3@x>\r\nIn-Reply-To: <m2@x>", "<m2@x>"),
        ("Message-ID: <m3@x>", "<m3@x>"),
    ],
)
def test_a_mail_thread_is_its_root_message_id(headers: str, root: str) -> None:
    env = mail(headers)
    assert env.thread_key == root
    assert legacy_thread_key(from_older_ingress(env)) == root


def test_a_call_thread_is_its_call_sid_also_for_an_older_ingress() -> None:
    env = message_in(channel="voice", text="hello", thread=ThreadHints(call_sid="CA1"))
    assert env.thread_key is None
    assert legacy_thread_key(env) == "CA1"
