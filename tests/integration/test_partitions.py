"""Core's partition consumer and leases against a real nats-server and valkey-server: order within
a conversation, none across conversations, long calls kept, take-over after a crash in order, and
replicas splitting partitions."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec
import pytest
from nats.aio.msg import Msg
from redis import exceptions as redis_errors

from services.core.partitions import PartitionConsumer
from shared.bus import Bus
from shared.envelopes import InboundEnvelope, InboundMessage
from shared.models import utcnow
from shared.store import Store
from shared.store.leases import Leases
from tests.conftest import Servers, eventually

FOREVER = 1e9


@pytest.fixture
def partitions() -> int:
    """One partition: every conversation of a test is on it, so they share one consumer."""
    return 1


async def send(bus: Bus, conversation: str, text: str) -> None:
    env = InboundMessage(
        id=f"env_{conversation}_{text}",
        channel="api",
        received_at=utcnow(),
        conversation_id=conversation,
        text=text,
    )
    await bus.publish(
        bus.subjects.inbound("api", conversation), msgspec.json.encode(env), msg_id=env.id
    )


def consumer(
    bus: Bus,
    apply: Callable[[InboundEnvelope], Awaitable[None]],
    *,
    ack_wait: float = 5.0,
    in_flight: int = 16,
) -> PartitionConsumer:
    return PartitionConsumer(
        bus,
        0,
        apply,
        in_flight=in_flight,
        max_deliver=5,
        ack_wait=ack_wait,
        lease_remaining=lambda: FOREVER,
        fetch_timeout=0.5,
    )


def text_of(env: InboundEnvelope) -> str:
    assert isinstance(env, InboundMessage)
    return env.text


async def test_a_blocked_conversation_does_not_delay_another_on_the_same_partition(
    bus: Bus,
) -> None:
    applied: list[str] = []
    release_a = asyncio.Event()

    async def apply(env: InboundEnvelope) -> None:
        applied.append(text_of(env))
        if text_of(env) == "a1":
            await release_a.wait()  # conversation A's agent call, held by the test

    worker = consumer(bus, apply)
    await worker.start()
    for conversation, text in [("conv_a", "a1"), ("conv_b", "b1"), ("conv_a", "a2")]:
        await send(bus, conversation, text)
    await send(bus, "conv_b", "b2")

    async def b_answered() -> bool:
        return "b2" in applied

    await eventually(b_answered, what="conversation B applied while A's call is blocked")
    assert applied.index("b1") < applied.index("b2")
    assert "a2" not in applied, "A's second message must wait for its first"
    release_a.set()

    async def a_done() -> bool:
        return "a2" in applied

    await eventually(a_done, what="A's second message after its first")
    assert [t for t in applied if t.startswith("a")] == ["a1", "a2"]
    await worker.stop(grace=5)


async def test_one_conversation_applies_in_order_with_many_in_flight(bus: Bus) -> None:
    applied: dict[str, list[int]] = {}

    async def apply(env: InboundEnvelope) -> None:
        conversation, n = env.conversation_id or "", int(text_of(env))
        await asyncio.sleep(0.001 * (n % 3))  # uneven work, so interleaving would show
        applied.setdefault(conversation, []).append(n)

    worker = consumer(bus, apply, in_flight=32)
    await worker.start()
    for n in range(20):
        for c in range(5):
            await send(bus, f"conv_{c}", str(n))

    async def all_applied() -> bool:
        return sum(len(v) for v in applied.values()) == 100

    await eventually(all_applied, what="every message applied")
    assert applied == {f"conv_{c}": list(range(20)) for c in range(5)}
    await worker.stop(grace=5)


async def test_a_call_longer_than_ack_wait_is_applied_once(bus: Bus) -> None:
    calls: list[str] = []
    finished = asyncio.Event()

    async def apply(env: InboundEnvelope) -> None:
        calls.append(text_of(env))
        await asyncio.sleep(2.5)  # the slow agent itself: 2.5 ack waits
        finished.set()

    worker = consumer(bus, apply, ack_wait=1.0)
    await worker.start()
    await send(bus, "conv_slow", "only")
    await asyncio.wait_for(finished.wait(), 10)

    async def acked() -> bool:
        info = await bus.js.consumer_info(bus.subjects.inbound_stream, "core-p0")
        return info.num_ack_pending == 0

    await eventually(acked, what="the slow message acked")
    info = await bus.js.consumer_info(bus.subjects.inbound_stream, "core-p0")
    assert calls == ["only"]
    assert info.num_redelivered == 0
    await worker.stop(grace=5)


async def test_take_over_after_a_crash_keeps_each_conversation_in_order(
    servers: Servers, bus: Bus
) -> None:
    """The crashed owner held A's message 1 (running) and 2 (queued behind it); message 3 arrives
    after the crash. The next owner must apply 1, 2, 3, not 3 first (it is the only message
    JetStream can hand out before the crashed owner's ack wait runs out)."""
    doomed_bus = Bus(servers.nats_url, bus.subjects, name="doomed-core")
    await doomed_bus.connect()
    started: list[str] = []
    never = asyncio.Event()

    async def hang(env: InboundEnvelope) -> None:
        started.append(text_of(env))
        await never.wait()

    doomed = consumer(doomed_bus, hang, ack_wait=1.0)
    await doomed.start()
    await send(bus, "conv_a", "1")
    await send(bus, "conv_a", "2")
    await send(bus, "conv_b", "1")

    async def holding() -> bool:
        return len(doomed.held) == 3 and started == ["1", "1"]

    await eventually(holding, what="the doomed owner holding A1 (running), A2 and B1")
    # kill -9: the connection goes without a nak or an ack, and its tasks stop mid-step.
    await doomed_bus.nc.close()
    for task in [*doomed.workers.values(), doomed._task]:
        assert task is not None
        task.cancel()
    await send(bus, "conv_a", "3")

    applied: list[str] = []

    async def record(env: InboundEnvelope) -> None:
        applied.append(f"{env.conversation_id}:{text_of(env)}")

    heir = consumer(bus, record, ack_wait=1.0)
    await heir.start()

    async def all_applied() -> bool:
        return len(applied) == 4

    await eventually(all_applied, timeout=20, what="the heir applying all four")
    assert [a for a in applied if a.startswith("conv_a")] == ["conv_a:1", "conv_a:2", "conv_a:3"]
    await heir.stop(grace=5)
    never.set()


async def test_replicas_split_the_partitions_and_take_over_a_silent_one(
    servers: Servers, namespace: str
) -> None:
    store = Store(servers.redis_url, namespace)
    first = Leases(store.connection, "core", "core-first", 16, ttl=0.6)
    second = Leases(store.connection, "core", "core-second", 16, ttl=0.6)
    try:
        owned_first, _ = await first.renew()
        assert owned_first == set(range(16))  # alone: it owns every partition

        async def split() -> bool:
            a, hand_back = await first.renew()
            for partition in hand_back:  # what a draining consumer does once it is done
                await first.release(partition)
            b, _ = await second.renew()
            a = first.owned()
            return bool(a) and bool(b) and not a & b and a | b == set(range(16))

        await eventually(split, what="two replicas splitting 16 partitions")
        # `second` goes silent (kill -9): its leases and membership run out.

        async def all_first() -> bool:
            owned, _ = await first.renew()
            return owned == set(range(16))

        await eventually(all_first, what="the survivor owning every partition")
        assert second.owned() == set()  # its own clock tells the silent one it owns nothing
    finally:
        await store.close()


async def test_a_message_given_back_as_the_lease_runs_out_takes_its_conversation_with_it(
    bus: Bus,
) -> None:
    """Valkey goes away and the lease runs out while message 1 is held: it is nak'd for the next
    owner. Valkey is back at once, but message 2 of the same conversation must not be applied by
    the old owner ahead of message 1's return (found as an out-of-order SMS thread in the
    restart fault test)."""
    applied: list[str] = []
    lease = {"remaining": FOREVER}
    valkey_down = asyncio.Event()
    valkey_down.set()

    async def apply(env: InboundEnvelope) -> None:
        if text_of(env) == "1" and valkey_down.is_set():
            lease["remaining"] = 0.0  # the renewal could not reach Valkey in time
            valkey_down.clear()  # ... and Valkey is back right after this attempt
            raise redis_errors.ConnectionError("valkey restarting")
        applied.append(text_of(env))

    old = PartitionConsumer(
        bus,
        0,
        apply,
        in_flight=16,
        max_deliver=5,
        ack_wait=5.0,
        lease_remaining=lambda: lease["remaining"],
        fetch_timeout=0.5,
    )
    for text in ("1", "2", "3"):
        await send(bus, "conv_a", text)
    await old.start()
    await eventually(lambda: old.done, what="the old owner letting go")
    assert applied == [], "the old owner applied a later message after giving message 1 back"
    new = consumer(bus, apply)  # the next owner (or this replica once it has the lease again)
    await new.start()
    await eventually(lambda: len(applied) == 3, what="every message applied by the next owner")
    assert applied == ["1", "2", "3"]
    await new.stop(grace=5)


async def test_a_delivery_lost_in_flight_is_waited_for_before_the_conversation_moves_on(
    bus: Bus,
) -> None:
    """The server delivers message 1 but the connection (or a NATS node) loses it on the way:
    JetStream redelivers it only after its ack wait. Messages 2 and 3 of the same conversation
    arrive meanwhile and must wait for it (found as an out-of-order SMS thread when a node of a
    three-node NATS cluster stopped under load)."""
    applied: list[str] = []

    async def apply(env: InboundEnvelope) -> None:
        applied.append(text_of(env))

    worker = consumer(bus, apply, ack_wait=1.0)
    await worker.start()
    real_pull = worker._pull
    dropped: list[str] = []

    async def lossy_pull(room: int, wait: float, budget: float) -> list[Msg]:
        msgs = await real_pull(room, wait, budget)
        if not dropped and msgs:
            dropped.append(msgs[0].data.decode())  # delivered by the server, never read by us
            return msgs[1:]
        return msgs

    worker._pull = lossy_pull  # type: ignore[method-assign]
    try:
        await send(bus, "conv_a", "1")
        await eventually(lambda: bool(dropped), what="message 1 lost in flight")
        for text in ("2", "3"):
            await send(bus, "conv_a", text)
        await eventually(lambda: len(applied) >= 3, what=f"every message applied: {applied}")
        assert applied == ["1", "2", "3"]
    finally:
        await worker.stop(grace=5)


async def test_a_message_delivered_while_handing_back_goes_to_the_next_owner_at_once(
    bus: Bus,
) -> None:
    """Handing a partition back (a replica joining, a rolling deploy) lets the message being
    applied finish; the pull request still open meanwhile may deliver more. Those were never
    started: they go back at once, not after their ack wait (a stalled partition at the next
    owner)."""
    release = asyncio.Event()
    started: list[str] = []

    async def hold(env: InboundEnvelope) -> None:
        started.append(f"{env.conversation_id}:{text_of(env)}")
        await release.wait()

    old = PartitionConsumer(
        bus,
        0,
        hold,
        in_flight=16,
        max_deliver=5,
        ack_wait=60.0,  # a message left with the old owner would come back only after a minute
        lease_remaining=lambda: FOREVER,
        fetch_timeout=60.0,  # the open pull request outlives the hand-back
    )
    await old.start()
    await send(bus, "conv_a", "1")
    await eventually(lambda: started == ["conv_a:1"], what="A1 running")
    stopping = asyncio.create_task(old.stop(grace=30))
    await eventually(lambda: old._fetching is None, what="the fetch loop left")
    await send(bus, "conv_b", "1")

    async def b1_seen_by_the_server() -> bool:
        info = await bus.js.consumer_info(bus.subjects.inbound_stream, "core-p0")
        return (info.num_pending or 0) + (info.num_ack_pending or 0) == 2

    await eventually(b1_seen_by_the_server, what="B1 stored (and perhaps delivered)")
    release.set()
    await stopping
    # Left unanswered with the old owner, B1 would come back after its minute of ack wait: the
    # next owner's take-over waits for it, so it is applied only then.
    applied: list[str] = []

    async def record(env: InboundEnvelope) -> None:
        applied.append(f"{env.conversation_id}:{text_of(env)}")

    heir = consumer(bus, record, ack_wait=60.0)
    await heir.start()
    await eventually(lambda: applied == ["conv_b:1"], what="the next owner applying B1")
    await heir.stop(grace=5)


async def test_a_partition_stopped_past_its_grace_still_closes_its_inbox(bus: Bus) -> None:
    """A message still running when the grace is up is left to its ack wait, but the inbox is
    closed all the same (it stayed subscribed, and its open pull request kept delivering into
    it, for the life of the process)."""
    never = asyncio.Event()

    async def hang(env: InboundEnvelope) -> None:
        await never.wait()

    worker = consumer(bus, hang)
    await worker.start()
    await send(bus, "conv_a", "1")
    await eventually(lambda: any(h.started for h in worker.held.values()), what="A1 running")
    await worker.stop(grace=0.2)
    assert worker.done
    assert worker._sub is None, "the inbox of a stopped partition is still subscribed"
    never.set()


async def test_a_refused_pull_request_is_not_asked_again_at_once(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    """While the consumer has no leader (a NATS cluster electing one) or is gone, every pull
    request is answered at once with a status (503 no responders, 409). Asked again at once, that
    was thousands of requests a second per partition against a server that is recovering."""
    applied: list[str] = []

    async def apply(env: InboundEnvelope) -> None:
        applied.append(text_of(env))

    worker = consumer(bus, apply)
    await worker.start()
    await eventually(lambda: worker._fetching is not None, what="the fetch loop fetching")
    stream = bus.subjects.inbound_stream
    config = (await bus.js.consumer_info(stream, "core-p0")).config
    requests: list[str] = []
    publish = bus.nc.publish

    async def counted(subject: str, payload: bytes = b"", reply: str = "", headers=None) -> None:  # type: ignore[no-untyped-def]
        if subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
            requests.append(subject)
        await publish(subject, payload, reply=reply, headers=headers)

    bus.nc.publish = counted  # type: ignore[method-assign]
    try:
        await bus.js.delete_consumer(stream, "core-p0")

        def refusals() -> list[str]:
            return [
                r.getMessage() for r in caplog.records if "pull request refused" in r.getMessage()
            ]

        await eventually(
            lambda: len(refusals()) >= 3 or len(requests) >= 50, what="refused requests"
        )
        # Each refusal is followed by a pause, not by the next request at once.
        assert len(requests) <= len(refusals()) + 1, (len(requests), refusals())
        await bus.js.add_consumer(stream, config)  # the consumer is back (a leader elected)
        await send(bus, "conv_a", "1")
        await eventually(lambda: applied == ["1"], what="messages applied again")
    finally:
        bus.nc.publish = publish  # type: ignore[method-assign]
        await worker.stop(grace=5)
