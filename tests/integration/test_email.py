"""The email channel over real SMTP both ways: our aiosmtpd server in, a real SMTP sink out."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.conftest import Stack, eventually

SUPPORT = "support@acme.test"
JANE = "jane@example.com"
CORPUS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "email-corpus"


def mail(
    text: str,
    subject: str = "Refund question",
    sender: str = JANE,
    to: str = SUPPORT,
    **headers: str,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Jane Doe <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="example.com")
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(text)
    return msg


async def send(
    stack: Stack, msg: EmailMessage | bytes, sender: str = JANE, recipients: list[str] | None = None
) -> tuple[int, str]:
    """Returns the SMTP reply code and message of the DATA phase (or the refusal)."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=stack.smtp_port, timeout=10)
    await smtp.connect()
    try:
        if isinstance(msg, EmailMessage):
            _, response = await smtp.send_message(msg, sender=sender, recipients=recipients)
        else:
            _errors, response = await smtp.sendmail(sender, recipients or [SUPPORT], msg)
        return int(response.split()[0]) if response[:3].isdigit() else 250, response
    except aiosmtplib.SMTPRecipientsRefused as exc:
        refusal = exc.recipients[0]
        return refusal.code, refusal.message
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    finally:
        smtp.close()


async def email_conversations(stack: Stack) -> list[Any]:
    page = await stack.core.store.list_conversations(
        cursor=None, limit=500, filters={"channel": "email"}
    )
    return page.items  # type: ignore[no-any-return]


async def user_texts(stack: Stack, cid: str) -> list[str]:
    return [t.content for t in await stack.core.store.turns_after(cid, 0, 1000) if t.role == "user"]


async def replies(stack: Stack, n: int) -> list[Any]:
    return stack.relay.messages if len(stack.relay.messages) >= n else None  # type: ignore[no-any-return]


def bounce(message_id: str, dsn_id: str) -> bytes:
    """A mailer daemon's delivery status notification: the mail `message_id` failed (5.1.1)."""
    return (
        "From: MAILER-DAEMON@example.com\r\nTo: support@acme.test\r\n"
        f"Subject: Undelivered Mail Returned to Sender\r\nMessage-ID: {dsn_id}\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nDelivery failed.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; example.com\r\n"
        "\r\nFinal-Recipient: rfc822; jane@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: {message_id}\r\nSubject: Re: Refund question\r\n"
        "--B--\r\n"
    ).encode()


async def test_new_mail_gets_a_threaded_reply_and_the_reply_continues_the_conversation(
    stack: Stack,
) -> None:
    first = mail("Hi,\n\nhow long do refunds take?\n\nThanks,\nJane")
    assert (await send(stack, first))[0] == 250
    answer = (await eventually(lambda: replies(stack, 1), what="the reply in the sink"))[0]
    assert answer["To"] == JANE
    assert answer["From"] == SUPPORT
    assert answer["Subject"] == "Re: Refund question"
    assert answer["In-Reply-To"] == first["Message-ID"]
    assert first["Message-ID"] in answer["References"]
    assert answer["Message-ID"].endswith("@acme.test>")
    assert answer["Auto-Submitted"] == "auto-replied"
    assert answer["Reply-To"].startswith("reply+")
    assert answer["Reply-To"].endswith("@acme.test")
    body = answer.get_body(("plain",)).get_content()
    assert "14 days" in body
    assert answer.get_body(("html",)) is not None

    quoted = "\n".join(f"> {line}" for line in body.splitlines())
    second = mail(
        f"And what about shipping times?\n\nOn Mon, 30 Nov 2026 at 10:00, Acme Support\n"
        f"<{SUPPORT}> wrote:\n{quoted}\n",
        subject="Re: Refund question",
        In_Reply_To=answer["Message-ID"],
        References=answer["References"] + " " + answer["Message-ID"],
    )
    assert (await send(stack, second))[0] == 250
    await eventually(lambda: replies(stack, 2), what="the second reply")
    convs = await email_conversations(stack)
    assert len(convs) == 1
    texts = await user_texts(stack, convs[0].id)
    assert texts == [
        "Hi,\n\nhow long do refunds take?\n\nThanks,\nJane",
        "And what about shipping times?",
    ]
    assert "business days" in stack.relay.messages[1].get_body(("plain",)).get_content()
    original = await stack.core.store.get_original(convs[0].id, 3)
    assert original is not None
    assert "wrote:" in original  # the quoted history is kept for audit, not in the turn
    assert stack.relay.messages[1]["In-Reply-To"] == second["Message-ID"]


async def test_mails_answered_after_a_handoff_each_name_their_own_mail(stack: Stack) -> None:
    """In-Reply-To is the mail a reply answers, even when it is answered later than it came."""
    first = mail("Hi, how long do refunds take?")
    await send(stack, first)
    answer = (await eventually(lambda: replies(stack, 1), what="the first reply"))[0]
    cid = (await email_conversations(stack))[0].id
    took = await stack.api.post(f"/v1/conversations/{cid}/handoff", json={"reason": "vip"})
    assert took.status_code == 200, took.text
    thread = answer["References"] + " " + answer["Message-ID"]
    second = mail("And shipping?", subject="Re: Refund question", References=thread)
    third = mail("And your hours?", subject="Re: Refund question", References=thread)
    for queued in (second, third):
        assert (await send(stack, queued))[0] == 250
    await eventually(
        lambda: _at_least(user_texts(stack, cid), 3), what="both mails queued in the conversation"
    )
    back = await stack.api.post(
        f"/v1/conversations/{cid}/human-turns", json={"content": "", "hand_back": True}
    )
    assert back.status_code == 200, back.text
    sent = await eventually(lambda: replies(stack, 3), what="the late answers")
    assert [m["In-Reply-To"] for m in sent[1:]] == [second["Message-ID"], third["Message-ID"]]


async def _at_least(texts: Any, n: int) -> Any:
    found = await texts
    return found if len(found) >= n else None


async def test_the_reply_address_token_threads_without_headers(stack: Stack) -> None:
    await send(stack, mail("what are your hours?"))
    answer = (await eventually(lambda: replies(stack, 1), what="the reply"))[0]
    token_address = answer["Reply-To"]
    follow_up = mail("ok, and refunds?", subject="something else entirely", to=token_address)
    assert (await send(stack, follow_up, recipients=[token_address]))[0] == 250
    await eventually(lambda: replies(stack, 2), what="the second reply")
    assert len(await email_conversations(stack)) == 1


async def test_the_same_sender_with_a_new_subject_is_a_new_conversation(stack: Stack) -> None:
    await send(stack, mail("what are your hours?", subject="Hours"))
    await send(stack, mail("how long is shipping?", subject="Shipping"))
    convs = await eventually(lambda: _n(email_conversations(stack), 2), what="two conversations")
    assert len({c.end_user_id for c in convs}) == 1


async def test_a_resent_message_is_one_turn(stack: Stack) -> None:
    msg = mail("what are your hours?")
    for _ in range(3):
        assert (await send(stack, msg))[0] == 250
    await send(stack, mail("and shipping?", In_Reply_To=msg["Message-ID"]))
    await eventually(lambda: replies(stack, 2), what="two replies")
    convs = await email_conversations(stack)
    assert await user_texts(stack, convs[0].id) == ["what are your hours?", "and shipping?"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Auto_Submitted": "auto-replied"},
        {"Precedence": "bulk"},
        {"List_Id": "<x.lists.example>"},
        {"X_Autoreply": "yes"},
    ],
)
async def test_auto_replies_are_never_turns_nor_answered(
    stack: Stack, headers: dict[str, str]
) -> None:
    assert (await send(stack, mail("I am out of office", **headers)))[0] == 250
    await send(stack, mail("what are your hours?"))  # a later message proves the first was handled
    await eventually(lambda: replies(stack, 1), what="the reply to the real message")
    convs = await email_conversations(stack)
    assert [await user_texts(stack, c.id) for c in convs] == [["what are your hours?"]]
    assert len(stack.relay.messages) == 1


async def test_an_empty_return_path_is_never_answered(stack: Stack) -> None:
    assert (await send(stack, mail("automatic notice"), sender=""))[0] == 250
    assert await email_conversations(stack) == []


async def test_a_bounce_marks_the_delivery_failed_and_is_no_turn(stack: Stack) -> None:
    await send(stack, mail("what are your hours?"))
    answer = (await eventually(lambda: replies(stack, 1), what="the reply"))[0]
    dsn = bounce(answer["Message-ID"], dsn_id="<dsn1@example.com>")
    assert (await send(stack, dsn, sender=""))[0] == 250
    conv = (await email_conversations(stack))[0]

    async def failed() -> bool:
        deliveries = await stack.core.store.list_deliveries(conv.id)
        return bool(deliveries) and deliveries[0].status == "failed"

    await eventually(failed, what="the delivery marked failed")
    assert await user_texts(stack, conv.id) == ["what are your hours?"]
    assert len(stack.relay.messages) == 1


async def test_a_foreign_domain_is_refused_550_never_relayed(stack: Stack) -> None:
    code, message = await send(
        stack, mail("hi", to="someone@elsewhere.com"), recipients=["someone@elsewhere.com"]
    )
    assert code == 550
    assert "Relaying denied" in message


async def test_oversize_mail_is_refused_552(stack: Stack) -> None:
    code, _ = await send(stack, mail("x" * 300_000))
    assert code == 552
    assert await email_conversations(stack) == []


async def test_mail_without_a_usable_sender_or_text_is_refused_clearly(stack: Stack) -> None:
    raw = (
        b"From: not an address\r\nTo: support@acme.test\r\nSubject: x\r\n"
        b"Message-ID: <a@b>\r\n\r\nhello\r\n"
    )
    code, message = await send(stack, raw)
    assert (code, "From header" in message) == (550, True)
    empty = mail("")
    code, message = await send(stack, empty)
    assert (code, "no readable text" in message) == (550, True)


async def test_html_only_mail_becomes_text(stack: Stack) -> None:
    msg = mail("placeholder")
    msg.set_content(
        "<html><body><p>How long does <b>express</b> shipping take?</p>"
        "<script>evil()</script></body></html>",
        subtype="html",
    )
    assert (await send(stack, msg))[0] == 250
    convs = await eventually(lambda: email_conversations(stack), what="a conversation")
    assert await eventually(lambda: user_texts(stack, convs[0].id)) == [
        "How long does express shipping take?"
    ]


@pytest.mark.skipif(not CORPUS.exists(), reason=f"the email corpus is not at {CORPUS}")
async def test_every_corpus_message_is_accepted_with_text_or_refused_clearly(stack: Stack) -> None:
    outcomes: dict[str, tuple[int, str]] = {}
    for path in sorted(CORPUS.rglob("*.eml")):
        raw = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        outcomes[path.name] = await send(stack, raw, sender="corpus@example.com")
    assert outcomes
    assert all(code in (250, 550, 552, 554) for code, _ in outcomes.values()), outcomes
    accepted = [n for n, (code, _) in outcomes.items() if code == 250]
    refused = {n: m for n, (code, m) in outcomes.items() if code != 250}
    assert len(accepted) > len(outcomes) // 2, refused
    assert all(m.strip() for m in refused.values())
    # Nothing half-written: core consumed every accepted message, none was dead-lettered, and
    # every conversation starts with a user turn that has text.
    queued = [n for n, (_, m) in outcomes.items() if "queued" in m]
    await eventually(lambda: _core_idle(stack), timeout=30, what="core to consume everything")
    dead = await stack.core.bus.js.stream_info(stack.core.subjects.dead_stream)
    inbound_dead = dead.state.messages and [
        (await stack.core.bus.js.get_msg(stack.core.subjects.dead_stream, s)).subject
        for s in range(dead.state.first_seq, dead.state.last_seq + 1)
    ]
    assert not [s for s in inbound_dead or [] if ".dead.in" in s or s.endswith(".INBOUND")]
    convs = await email_conversations(stack)
    assert 0 < len(convs) <= len(queued)
    for conv in convs:
        turns = await stack.core.store.turns_after(conv.id, 0, 100)
        assert turns
        assert turns[0].role == "user"
        assert turns[0].content.strip()
    print(
        f"corpus: {len(outcomes)} messages, {len(accepted)} accepted, "
        f"{len(queued)} became turns, refused: {refused}"
    )


async def _n(coro: Any, n: int) -> Any:
    items = await coro
    return items if len(items) >= n else None


async def _core_idle(stack: Stack) -> bool:
    js = stack.core.bus.js
    for partition in range(stack.core.settings.partitions):
        info = await js.consumer_info(stack.core.subjects.inbound_stream, f"core-p{partition}")
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def test_a_transient_failure_answers_451_so_the_sender_retries(stack: Stack) -> None:
    """JetStream unreachable: the message must not be acknowledged (and so not lost)."""
    import asyncio

    from aiosmtpd.smtp import SMTP

    from services.email.handler import InboundMail
    from shared.bus import Bus
    from shared.settings import EmailSettings
    from shared.subjects import Subjects

    settings = EmailSettings(email_domains="acme.test", namespace=stack.namespace)
    unreachable = Bus("nats://127.0.0.1:1", Subjects(stack.namespace), name="never-connected")
    handler = InboundMail(settings, unreachable, stack.core.store)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, loop=loop), "127.0.0.1", 0)
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.sockets[0].getsockname()[1])
    try:
        await smtp.connect()
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await smtp.send_message(mail("what are your hours?"))
        assert refused.value.code == 451
    finally:
        smtp.close()
        server.close()
        await server.wait_closed()
    assert await email_conversations(stack) == []
