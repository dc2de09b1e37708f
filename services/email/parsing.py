"""Reading one email with the standard library's modern `email` API, without ever crashing.

Broken headers, charsets and MIME structures degrade to the best text we can get; they never
raise. Text/plain is preferred; HTML is converted to text when it is all there is.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import re
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from email.utils import getaddresses, parseaddr
from html.parser import HTMLParser

_MSGID = re.compile(r"<[^<>\s]+>")


@dataclass
class ParsedMail:
    message_id: str | None
    subject: str
    sender: str  # the From address, or "" when unusable
    text: str  # the whole text body
    in_reply_to: tuple[str, ...] = ()
    references: tuple[str, ...] = ()
    attachments: list[tuple[str | None, str, int]] = field(default_factory=list)  # name, type, size
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "text/plain"
    report_type: str | None = None
    bounced_message_ids: tuple[str, ...] = ()


def _header(msg: Message, name: str) -> str:
    try:
        value = msg.get(name)
    except Exception:  # the modern parser can fail on a header only when it is read
        raw = msg.get_all(name, failobj=[]) if hasattr(msg, "get_all") else []
        value = raw[0] if raw else None
    if value is None:
        return ""
    try:
        return " ".join(str(value).split())
    except Exception:
        return ""


def message_ids(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_MSGID.findall(value or "")))


class _TextOfHtml(HTMLParser):
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "blockquote", "table"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head"):
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _TextOfHtml()
    try:
        parser.feed(html)
        parser.close()
    except Exception:
        return re.sub(r"<[^>]+>", " ", html)
    text = "".join(parser.parts)
    return re.sub(r"\n\s*\n+", "\n\n", re.sub(r"[ \t\xa0]+", " ", text)).strip()


def _content(part: Message) -> str:
    try:
        content = part.get_content()  # type: ignore[attr-defined]
        return content if isinstance(content, str) else ""
    except Exception:
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            charset = part.get_content_charset() or "utf-8"
            try:
                return payload.decode(charset, "replace")
            except LookupError:
                return payload.decode("utf-8", "replace")
        return payload if isinstance(payload, str) else ""


def parse(raw: bytes) -> ParsedMail:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    plain: str | None = None
    html: str | None = None
    attachments: list[tuple[str | None, str, int]] = []
    bounced: list[str] = []
    for part in msg.walk():
        ctype = part.get_content_type()
        if part.is_multipart():
            continue
        try:
            disposition = part.get_content_disposition()
            filename = part.get_filename()
        except Exception:
            disposition, filename = "attachment", None
        if ctype in ("message/rfc822", "text/rfc822-headers", "message/delivery-status"):
            bounced.extend(message_ids(_content(part) or str(part.get_payload())))
            continue
        if disposition == "attachment" or (filename and ctype not in ("text/plain", "text/html")):
            payload = part.get_payload(decode=True)
            attachments.append((filename, ctype, len(payload) if isinstance(payload, bytes) else 0))
        elif ctype == "text/plain" and plain is None:
            plain = _content(part)
        elif ctype == "text/html" and html is None:
            html = _content(part)
    for sub in msg.walk():  # an attached original message (bounces) carries its own Message-ID
        if sub.get_content_type() == "message/rfc822":
            inners = sub.get_payload()
            for inner in inners if isinstance(inners, list) else []:
                if isinstance(inner, Message):
                    bounced.extend(message_ids(_header(inner, "Message-ID")))
    text = plain if plain is not None else html_to_text(html) if html else ""
    _, sender = parseaddr(_header(msg, "From"))
    report = msg.get_param("report-type") if msg.get_content_type() == "multipart/report" else None
    return ParsedMail(
        message_id=(message_ids(_header(msg, "Message-ID")) or (None,))[0],
        subject=_header(msg, "Subject"),
        sender=sender if "@" in sender else "",
        text=text.replace("\r\n", "\n"),
        in_reply_to=message_ids(_header(msg, "In-Reply-To")),
        references=message_ids(_header(msg, "References")),
        attachments=attachments,
        headers={
            k.lower(): _header(msg, k)
            for k in (
                "Auto-Submitted",
                "Precedence",
                "List-Id",
                "X-Autoreply",
                "X-Autorespond",
                "X-Auto-Response-Suppress",
                "Return-Path",
            )
        },
        content_type=msg.get_content_type(),
        report_type=str(report).lower() if report else None,
        bounced_message_ids=tuple(dict.fromkeys(bounced)),
    )


def fallback_message_id(raw: bytes) -> str:
    """A stable id for mail without a Message-ID, so a resend is still one message."""
    return f"<sha256-{hashlib.sha256(raw).hexdigest()[:32]}@switchboard.invalid>"


def recipients(value: str) -> list[str]:
    return [addr for _, addr in getaddresses([value]) if addr]


__all__ = ["EmailMessage", "ParsedMail", "parse"]
