"""The DEAD stream: dead-lettering with the reason, listing, and replaying at most once."""

from __future__ import annotations

import logging

import msgspec
from nats.js.errors import (
    NotFoundError,
)

from shared.bus.connection import BusConnection
from shared.bus.types import DeadLetterEntry
from shared.envelopes import DeadLetter, DeadLetterReplay
from shared.ids import new_id
from shared.models import utcnow

log = logging.getLogger("switchboard.bus")


_dead_letter = msgspec.json.Decoder(DeadLetter)
_replay = msgspec.json.Decoder(DeadLetterReplay)


class DeadLetters(BusConnection):
    async def dead_letter(
        self, source_subject: str, data: bytes, reason: str, deliveries: int
    ) -> None:
        letter = DeadLetter(
            id=new_id("dead"),
            source_subject=source_subject,
            reason=reason,
            deliveries=deliveries,
            failed_at=utcnow(),
            payload=data.decode("utf-8", "replace"),
        )
        source = source_subject.split(".")[-3] if source_subject.count(".") >= 2 else "unknown"
        await self.publish(
            self.subjects.dead(source), msgspec.json.encode(letter), msg_id=letter.id
        )
        if self.metrics:
            self.metrics.dead_letters.labels(reason=reason.split(":")[0]).inc()
        log.error(
            "dead-lettered",
            extra={
                "subject": source_subject,
                "reason": reason,
                "deliveries": deliveries,
                "dead_letter_id": letter.id,
                "console": f"dead letter {letter.id} from {source_subject}: {reason[:200]}",
            },
        )

    # Dead letters: list and replay ------------------------------------------------------------

    async def dead_letters(self, *, after_seq: int = 0, limit: int = 50) -> list[DeadLetterEntry]:
        """Dead letters in the order they died, from stream sequence `after_seq` + 1 on."""
        entries: list[DeadLetterEntry] = []
        seq = after_seq + 1
        while len(entries) < limit:
            try:
                raw = await self.js.get_msg(
                    self.subjects.dead_stream, seq, subject=self.subjects.dead("*"), next=True
                )
            except NotFoundError:
                break
            assert raw.seq is not None
            seq = raw.seq + 1
            try:
                letter = _dead_letter.decode(raw.data or b"")
            except msgspec.DecodeError:
                continue  # not ours: nothing to show or replay
            entries.append(DeadLetterEntry(raw.seq, letter, await self._replay_of(letter.id)))
        return entries

    async def dead_letter_by_id(self, letter_id: str) -> DeadLetterEntry | None:
        after = 0
        while page := await self.dead_letters(after_seq=after, limit=200):
            for entry in page:
                if entry.letter.id == letter_id:
                    return entry
            after = page[-1].seq
        return None

    async def replay(self, entry: DeadLetterEntry) -> DeadLetterReplay:
        """Put a dead letter back on the subject it died on; a second replay changes nothing.

        The republished message carries `Nats-Msg-Id` = `replay_<letter id>` (JetStream drops a
        repeat inside its duplicate window) and a durable marker on `gw.dead.replayed.<id>` says
        it was replayed (so a later replay is refused). Consumers dedupe on the envelope id
        inside (core's turn dedupe, egress's delivery record), so a replay of something that had
        in fact been applied never doubles a turn or a reply.
        """
        letter = entry.letter
        done = entry.replay or await self._replay_of(letter.id)
        if done is not None:
            return done
        await self.publish(
            letter.source_subject,
            letter.payload.encode(),
            msg_id=f"replay_{letter.id}",
            headers={"Switchboard-Replay-Of": letter.id},
        )
        replay = DeadLetterReplay(letter_id=letter.id, replayed_at=utcnow())
        ack = await self.publish(
            self._replay_subject(letter.id),
            msgspec.json.encode(replay),
            msg_id=f"replayed_{letter.id}",
        )
        if ack.duplicate:  # a concurrent replay got there first: its marker is the one
            return await self._replay_of(letter.id) or replay
        log.info(
            "dead letter replayed",
            extra={
                "dead_letter_id": letter.id,
                "subject": letter.source_subject,
                "console": f"dead letter {letter.id} replayed onto {letter.source_subject}",
            },
        )
        return replay

    async def replay_all(self) -> tuple[int, int]:
        """Replay every dead letter not yet replayed: (replayed now, replayed before)."""
        replayed = before = 0
        after = 0
        while page := await self.dead_letters(after_seq=after, limit=200):
            for entry in page:
                if entry.replay is not None:
                    before += 1
                else:
                    await self.replay(entry)
                    replayed += 1
            after = page[-1].seq
        return replayed, before

    def _replay_subject(self, letter_id: str) -> str:
        return self.subjects.dead(f"replayed.{letter_id}")

    async def _replay_of(self, letter_id: str) -> DeadLetterReplay | None:
        try:
            raw = await self.js.get_last_msg(
                self.subjects.dead_stream, self._replay_subject(letter_id)
            )
        except NotFoundError:
            return None
        return _replay.decode(raw.data or b"")
