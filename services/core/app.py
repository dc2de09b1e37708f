"""Core's wiring: the bus, the store, the partitions this replica owns (each consumed in order per
conversation, see `partitions`), the command server, and the probes on a side port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import msgspec
from nats.aio.msg import Msg

from services.core import (
    approvals,
    erasure,
    first_contact,
    handoffs,
    operators,
    replies,
    routing,
    turns,
)
from services.core.agent.demo import seed_demo_agent
from services.core.conversations import Conversations
from services.core.lifecycle import ACCEPTS_USER_TURNS
from services.core.ownership import PartitionOwner
from services.core.partitions import PartitionConsumer
from shared.bus import decode_or_dead
from shared.envelopes import (
    ApprovalDecided,
    CallEnded,
    CallStarted,
    ChannelKeyword,
    ClaimHandoff,
    CloseConversation,
    Command,
    CommandResult,
    EraseEndUser,
    HumanTurn,
    InboundEnvelope,
    InboundMessage,
    OpenConversation,
    Prompted,
    ResolveApproval,
    Resume,
    Simulate,
    StartHandoff,
)
from shared.errors import SwitchboardError, Undeliverable
from shared.models import Author
from shared.service import Service
from shared.settings import CoreSettings
from shared.store.leases import Leases

log = logging.getLogger("switchboard.core")

_command = msgspec.json.Decoder(Command)
_enc = msgspec.json.Encoder()


class Core:
    def __init__(self, settings: CoreSettings) -> None:
        self.settings = settings
        self.service = Service("core", settings, probes_port=settings.core_health_port)
        self.metrics, self.subjects = self.service.metrics, self.service.subjects
        self.bus, self.store = self.service.bus, self.service.store
        self._opened = contextlib.AsyncExitStack()
        self.conversations = Conversations(settings, self.store, self.bus, self.metrics)
        self._timer: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self.replica = f"core-{uuid.uuid4().hex[:12]}"
        self.leases = Leases(
            self.store.connection,
            "core",
            self.replica,
            settings.partitions,
            settings.partition_lease_seconds,
        )
        self.owner = PartitionOwner(
            self.leases, self.consumer_for, grace=settings.shutdown_grace_seconds
        )

    async def start(self) -> None:
        # Pushed first, so closed last: after the bus has drained the turns in flight.
        self._opened.push_async_callback(self.conversations.runtimes.aclose)
        await self._opened.enter_async_context(self.service.opened())
        if await seed_demo_agent(self.store, self.settings.default_agent):
            log.info("seeded the demo agent", extra={"agent_id": self.settings.default_agent})
        for audience in (self.conversations.audience, self.conversations.screens):
            await audience.start()
            self._opened.push_async_callback(audience.stop)
        await self.bus.serve(self.subjects.commands_all, "core", self.on_command)
        # Pushed last, so closed first: partitions drain (and give their leases back) while the
        # bus and the store are still open.
        self._opened.push_async_callback(self.owner.stop)
        await self.owner.start()
        self._timer = asyncio.create_task(self.approval_timer(), name="approval-timer")
        if self.settings.retention_days > 0:
            self._retention = asyncio.create_task(self.retention_timer(), name="retention")
        log.info(
            "core ready",
            extra={
                "replica": self.replica,
                "partitions": sorted(self.owner.consumers),
                "health_port": self.service.probes_port,
            },
        )

    def consumer_for(self, partition: int) -> PartitionConsumer:
        return PartitionConsumer(
            self.bus,
            partition,
            self.on_inbound,
            in_flight=self.settings.in_flight_per_partition,
            max_deliver=self.settings.max_deliver,
            ack_wait=self.settings.ack_wait_seconds,
            lease_remaining=lambda: self.leases.remaining(partition),
        )

    async def stop(self) -> None:
        self._stopping.set()
        for task in (self._timer, self._retention, *self._side_tasks):
            if task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(task), 5.0)
                except TimeoutError:
                    task.cancel()
        await self._opened.aclose()

    async def approval_timer(self) -> None:
        """The durable approval timer: its state is the deadline index in Valkey, not memory.

        It stops on an event rather than by cancellation alone, so a library that swallows a
        CancelledError cannot keep it (and the shutdown) running.
        """
        while not self._stopping.is_set():
            try:
                await approvals.sweep(self.conversations)
            except Exception:
                log.exception("approval sweep failed; retrying")
            try:
                await handoffs.sweep_unclaimed(self.conversations)
            except Exception:
                log.exception("unclaimed-handoff sweep failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.approval_sweep_seconds)

    async def retention_timer(self) -> None:
        """Close and erase conversations past `SWITCHBOARD_RETENTION_DAYS`: one replica per period
        (whoever claims the period's slot in Valkey), so replicas never erase in parallel."""
        period = self.settings.retention_sweep_seconds
        while not self._stopping.is_set():
            slot = int(time.time() // period)
            try:
                if await self.store.claim_once(f"retention:{slot}", ttl=max(int(period * 2), 1)):
                    await erasure.sweep_retention(self.conversations, self.settings.retention_days)
            except Exception:
                log.exception("retention sweep failed; retrying next period")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), period)

    async def on_inbound(self, env: InboundEnvelope) -> None:
        started = time.perf_counter()
        try:
            await self.apply(env)
        except Undeliverable:
            raise
        except SwitchboardError as exc:
            if exc.status < 500:  # a permanent problem with this envelope: retrying cannot help
                raise Undeliverable(f"{exc.code}: {exc.message}") from exc
            raise
        self.metrics.observe("core_apply", time.perf_counter() - started)

    async def apply(self, env: InboundEnvelope) -> None:
        c = self.conversations
        match env:
            case InboundMessage():
                with c.outbox.answering(env):
                    await turns.apply_message(c, env)
            case ChannelKeyword():
                await turns.apply_keyword(c, env)
            case Resume():
                conv = await c.store.get_conversation(env.conversation_id or "")
                await replies.answer_pending(c, conv)
            case ApprovalDecided():
                await approvals.apply_decision(c, env.approval_id)
            case CallStarted():
                conv = await routing.conversation_for(c, env)
                if env.greeting:  # already spoken by the voice service: transcript only
                    agent = Author(kind="agent", id=conv.assigned_agent_id)
                    await c.record(
                        conv,
                        env.greeting,
                        author=agent,
                        allowed=ACCEPTS_USER_TURNS,
                        key=f"{env.id}_greeting",
                    )
            case Prompted():
                conv = await routing.conversation_for(c, env)
                system = Author(kind="system")
                await c.record(
                    conv, env.text, author=system, allowed=ACCEPTS_USER_TURNS, key=env.id
                )
            case CallEnded():
                conv = await routing.conversation_for(c, env)
                if conv.status != "closed":
                    await c.close(conv.id, env.reason, "channel")

    async def on_command(self, msg: Msg) -> None:
        try:
            command = decode_or_dead(_command, msg.data)
        except Undeliverable as exc:
            result = CommandResult(ok=False, error_code="invalid_request", error_message=exc.reason)
            await msg.respond(_enc.encode(result))
            return
        if isinstance(command, EraseEndUser):
            # An erasure reads the streams through: it must not hold up the commands behind it
            # (one subscription runs its callbacks one at a time).
            task = asyncio.create_task(self.answer_command(msg, command), name="erasure")
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)
            return
        await self.answer_command(msg, command)

    async def answer_command(self, msg: Msg, command: Command) -> None:
        try:
            result = await self.run_command(command)
        except SwitchboardError as exc:
            result = CommandResult(
                ok=False, error_code=exc.code, error_message=exc.message, error_details=exc.details
            )
        except Exception as exc:
            log.exception("command failed")
            result = CommandResult(ok=False, error_code="internal_error", error_message=str(exc))
        await msg.respond(_enc.encode(result))

    async def run_command(self, command: Command) -> CommandResult:
        c = self.conversations
        match command:
            case OpenConversation():
                conv = await first_contact.open_conversation(c, command)
            case CloseConversation():
                conv = await c.close(command.conversation_id, command.reason, command.actor)
            case StartHandoff():
                conv = await operators.start_handoff(c, command)
            case HumanTurn():
                conv = await operators.human_turn(c, command)
            case ResolveApproval():
                approval = await approvals.resolve(
                    c,
                    command.conversation_id,
                    command.approval_id,
                    command.decision,
                    command.reviewer,
                    command.note,
                    command.reviewer_name,
                )
                return CommandResult(ok=True, approval=approval)
            case ClaimHandoff():
                return CommandResult(ok=True, handoff=await handoffs.claim(c, command))
            case Simulate():
                conv, turns, stopped = await operators.simulate(c, command)
                return CommandResult(
                    ok=True, conversation=conv, turns=tuple(turns), stopped=stopped
                )
            case EraseEndUser():
                counts = await erasure.erase_end_user(c, command.end_user_id, command.actor)
                return CommandResult(ok=True, counts=counts)
        return CommandResult(ok=True, conversation=conv)


async def run(settings: CoreSettings, stop: asyncio.Event) -> None:
    core = Core(settings)
    await core.start()
    try:
        await stop.wait()
    finally:
        log.info("core stopping: finishing in-flight messages")
        await core.stop()
