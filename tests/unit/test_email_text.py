"""What becomes the turn's text: only what the sender just wrote."""

import pytest

from services.email.parsing import html_to_text, parse
from services.email.quotes import new_text


@pytest.mark.parametrize(
    "text",
    [
        "Thanks!\n\nOn Tue, 3 Mar 2026 at 10:00, Acme <support@acme.test> wrote:\n> old text\n> more",
        # Gmail wraps long attributions onto two lines.
        "Thanks!\n\nOn Tue, 3 Mar 2026 at 10:00, Acme Support Team\n<support@acme.test> wrote:\n> old",
        "Thanks!\n\nLe mar. 3 mars 2026 à 10:00, Acme <support@acme.test> a écrit :\n> ancien",
        "Thanks!\n\nAm Di., 3. März 2026 um 10:00 schrieb Acme <support@acme.test>:\n> alt",
        "Thanks!\n\nEl mar, 3 mar 2026 a las 10:00, Acme (<support@acme.test>) escribió:\n> viejo",
        "Thanks!\n\n-----Original Message-----\nFrom: Acme\nSent: Tuesday\nSubject: Re: x\n\nold",
        "Thanks!\n\n________________________________\nFrom: Acme <support@acme.test>\nSent: Tuesday",
        "Thanks!\n\nFrom: Acme Support <support@acme.test>\nSent: Tuesday, March 3, 2026 10:00\nold",
        "Thanks!\n\n-- \nJane Doe\nHead of Things, Example Corp",
        "Thanks!\n\nSent from my iPhone",
    ],
)
def test_quoted_history_attributions_and_signatures_are_cut(text: str) -> None:
    assert new_text(text) == "Thanks!"


def test_inline_quotes_are_dropped_but_answers_between_them_kept() -> None:
    text = "> what is your order number?\n12345\n> and the date?\nyesterday"
    assert new_text(text) == "12345\nyesterday"


def test_plain_text_without_history_is_untouched() -> None:
    assert new_text("Hi,\n\nwhere is my order?\n\nJane") == "Hi,\n\nwhere is my order?\n\nJane"


def test_html_becomes_readable_text_without_scripts() -> None:
    html = (
        "<html><head><style>p{}</style></head><body><p>Hello&nbsp;there</p><script>x()</script>"
        "<div>second &amp; last</div></body></html>"
    )
    assert html_to_text(html) == "Hello there\n\nsecond & last"


def test_broken_mime_parses_to_something_without_raising() -> None:
    raw = (
        b"From: =?utf-8?B?broken?= <a@example.com>\r\nSubject: =?unknown-8bit?Q?=FF?=\r\n"
        b'Content-Type: multipart/mixed; boundary="nope"\r\n\r\nno parts at all\r\n'
    )
    mail = parse(raw)
    assert mail.sender == "a@example.com"
    assert mail.message_id is None


def test_charsets_are_decoded() -> None:
    raw = (
        b"From: a@example.com\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nCaf=E9 cr=E8me\r\n"
    )
    assert parse(raw).text.strip() == "Café crème"
