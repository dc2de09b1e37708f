"""Keeping only what the sender just wrote: quoted history, attribution lines (wrapped or
localised), Outlook original-message blocks and signatures are cut."""

from __future__ import annotations

import re

# "On Tue, 3 Mar 2026 at 10:00, Jane <jane@x.com> wrote:" and its translations; the attribution
# may wrap across two lines, so it is matched on the text with the next line joined.
_ATTRIBUTION = re.compile(
    r"^\s*(On\s.+\swrote|Le\s.+\sa\s[ée]crit|Am\s.+\sschrieb(\s.+)?|El\s.+\sescribi[óo]|"
    r"Il\s.+\sha\sscritto|Op\s.+\sschreef|Em\s.+\sescreveu|W\sdniu\s.+\spisze)\s*:\s*$",
    re.IGNORECASE,
)
_OUTLOOK = re.compile(
    r"^\s*(-{2,}\s*(Original Message|Ursprüngliche Nachricht|Message d'origine|"
    r"Mensaje original)\s*-{2,}|_{10,})\s*$",
    re.IGNORECASE,
)
_HEADER_BLOCK = re.compile(r"^\s*(From|De|Von|Van)\s*:\s.+", re.IGNORECASE)
_SENT_LINE = re.compile(r"^\s*(Sent|Date|Envoyé|Gesendet|Enviado)\s*:\s.+", re.IGNORECASE)
_SIGNATURE = re.compile(
    r"^(--\s*|Sent from my \w+.*|Get Outlook for \w+.*|Sent from Mail for Windows.*|"
    r"Envoyé de mon \w+.*|Von meinem \w+ gesendet.*)$",
    re.IGNORECASE,
)


def new_text(text: str) -> str:
    lines = text.replace("\r\n", "\n").split("\n")
    kept: list[str] = []
    for index, line in enumerate(lines):
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if _ATTRIBUTION.match(line) or _ATTRIBUTION.match(f"{line} {following}".strip()):
            break
        if _OUTLOOK.match(line):
            break
        if _HEADER_BLOCK.match(line) and _SENT_LINE.match(following or ""):
            break
        if _SIGNATURE.match(line.rstrip()) and line.strip():
            break
        if line.lstrip().startswith(">"):
            continue
        kept.append(line)
    return "\n".join(kept).strip()
