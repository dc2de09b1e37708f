"""`switchboard dead list | replay <id> | replay --all`: the DEAD stream from a shell.

Talks to NATS_URL (and SWITCHBOARD_NAMESPACE) like the services do; what a replay does and why it
never doubles a turn is in `shared.bus.Bus.replay`.
"""

from __future__ import annotations

import asyncio
import json
import logging

from shared.bus import Bus, DeadLetterEntry
from shared.settings import CommonSettings, load_settings


def run(action: str, letter_id: str | None, replay_all: bool, as_json: bool) -> int:
    logging.basicConfig(level=logging.ERROR)  # the answer is what we print, not the bus's chatter
    return asyncio.run(_run(action, letter_id, replay_all, as_json))


async def _run(action: str, letter_id: str | None, replay_all: bool, as_json: bool) -> int:
    settings = load_settings(CommonSettings)
    bus = Bus.of(settings, "switchboard-dead")
    try:
        await bus.connect(connect_timeout=3.0)
    except Exception as exc:
        print(f"error: cannot reach NATS at {settings.nats_url} ({exc}); set NATS_URL")
        return 1
    try:
        await bus.ensure_streams()
        if action == "list":
            return await _list(bus, as_json)
        return await _replay(bus, letter_id, replay_all)
    finally:
        await bus.close()


async def _list(bus: Bus, as_json: bool) -> int:
    entries: list[DeadLetterEntry] = []
    after = 0
    while page := await bus.dead_letters(after_seq=after, limit=200):
        entries.extend(page)
        after = page[-1].seq
    if as_json:
        print(json.dumps([_row(e) for e in entries], indent=2))
        return 0
    if not entries:
        print("no dead letters")
        return 0
    for e in entries:
        letter = e.letter
        state = f"replayed {e.replay.replayed_at:%Y-%m-%d %H:%M:%S}" if e.replay else "dead"
        print(
            f"{letter.id}  {letter.failed_at:%Y-%m-%d %H:%M:%S}  {letter.source_subject}  "
            f"deliveries={letter.deliveries}  [{state}]\n    {letter.reason}"
        )
    waiting = sum(e.replay is None for e in entries)
    print(f"{len(entries)} dead letters, {waiting} not replayed")
    return 0


async def _replay(bus: Bus, letter_id: str | None, replay_all: bool) -> int:
    if replay_all:
        replayed, before = await bus.replay_all()
        print(f"replayed {replayed} dead letters ({before} had been replayed before)")
        return 0
    assert letter_id is not None
    entry = await bus.dead_letter_by_id(letter_id)
    if entry is None:
        print(f"error: no dead letter {letter_id} (see `switchboard dead list`)")
        return 1
    if entry.replay is not None:
        print(f"error: {letter_id} was already replayed at {entry.replay.replayed_at:%c}")
        return 1
    await bus.replay(entry)
    print(f"replayed {letter_id} onto {entry.letter.source_subject}")
    return 0


def _row(entry: DeadLetterEntry) -> dict[str, object]:
    letter = entry.letter
    return {
        "id": letter.id,
        "seq": entry.seq,
        "source_subject": letter.source_subject,
        "reason": letter.reason,
        "deliveries": letter.deliveries,
        "failed_at": letter.failed_at.isoformat(),
        "replayed_at": entry.replay.replayed_at.isoformat() if entry.replay else None,
        "payload": letter.payload,
    }
