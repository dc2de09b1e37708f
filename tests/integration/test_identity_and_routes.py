"""Identity linking (one person on several channels, never merged silently) and the routing table
(which agent answers on which of our numbers and addresses)."""

from __future__ import annotations

from typing import Any

from tests.agent_fakes import FakeServers
from tests.conftest import Stack, eventually, make_key
from tests.integration.test_email import mail, send
from tests.integration.test_events_and_first_contact import hook, received, subscribe
from tests.integration.test_runtimes import agents, http_revision, make_agent
from tests.integration.test_sms import conversations, post_signed, sent_messages
from tests.integration.test_streaming_webhooks_sessions import Receiver
from tests.integration.test_voice import OUR_NUMBER as VOICE_NUMBER
from tests.integration.test_voice import Call, spoken, voice_conversation
from tests.twilio_forms import sms_form

__all__ = ["agents", "hook"]  # fixtures: the runtimes' agents, a webhook receiver (fakes: conftest)

ALICE_PHONE = "+14155550123"


async def resolve(stack: Stack, channel: str, identifier: str) -> str:
    response = await stack.api.post(
        "/v1/identity/resolve", json={"channel": channel, "identifier": identifier}
    )
    assert response.status_code == 200, response.text
    return str(response.json()["end_user_id"])


async def test_linking_an_email_to_an_sms_user_makes_one_person_with_an_audit_event(
    stack: Stack, hook: Receiver
) -> None:
    secret = await subscribe(stack, hook, ["end_user.identity_linked"])
    alice = await resolve(stack, "sms", "(415) 555-0123")
    operator = await make_key(stack, "operator")
    async with stack.client(operator) as api:
        linked = await api.post(
            "/v1/identity/link",
            json={"end_user_id": alice, "channel": "email", "identifier": "Alice@Example.COM"},
        )
        assert linked.status_code == 200, linked.text
        again = await api.post(
            "/v1/identity/link",
            json={"end_user_id": alice, "channel": "email", "identifier": "alice@example.com"},
        )
        assert again.status_code == 200
    identities = [(i["kind"], i["value"]) for i in linked.json()["identities"]]
    assert identities == [("phone", ALICE_PHONE), ("email", "alice@example.com")]
    assert again.json()["identities"] == linked.json()["identities"]  # twice is once
    shown = (await stack.api.get(f"/v1/end-users/{alice}")).json()
    assert [(i["kind"], i["value"]) for i in shown["identities"]] == identities
    assert await resolve(stack, "email", "alice@example.com") == alice

    async def audited() -> list[dict[str, object]] | None:
        return received(hook, secret, "end_user.identity_linked") or None

    events = await eventually(audited, what="the end_user.identity_linked webhook")
    assert len(events) == 1
    assert events[0]["data"] == {
        "end_user_id": alice,
        "identity": {"kind": "email", "value": "alice@example.com"},
    }


async def test_linking_an_identifier_of_another_end_user_is_409_naming_both(stack: Stack) -> None:
    alice = await resolve(stack, "sms", ALICE_PHONE)
    bob = await resolve(stack, "email", "bob@example.com")
    conflict = await stack.api.post(
        "/v1/identity/link",
        json={"end_user_id": alice, "channel": "email", "identifier": "bob@example.com"},
    )
    assert conflict.status_code == 409, conflict.text
    error = conflict.json()["error"]
    assert error["code"] == "identity_conflict"
    assert error["details"]["end_user_id"] == alice
    assert error["details"]["linked_to_end_user_id"] == bob
    # Nothing changed on either side.
    assert await resolve(stack, "email", "bob@example.com") == bob
    shown = (await stack.api.get(f"/v1/end-users/{alice}")).json()
    assert [i["value"] for i in shown["identities"]] == [ALICE_PHONE]


async def test_linking_needs_the_operator_scope_and_an_existing_end_user(stack: Stack) -> None:
    alice = await resolve(stack, "sms", ALICE_PHONE)
    body = {"end_user_id": alice, "channel": "email", "identifier": "alice@example.com"}
    client = await make_key(stack, "client")
    async with stack.client(client) as api:
        refused = await api.post("/v1/identity/link", json=body)
    assert refused.status_code == 403
    unknown = await stack.api.post("/v1/identity/link", json={**body, "end_user_id": "usr_nope"})
    assert unknown.status_code == 404
    not_a_phone = await stack.api.post(
        "/v1/identity/link", json={**body, "channel": "sms", "identifier": "call me"}
    )
    assert not_a_phone.status_code == 422
    assert (await stack.api.get(f"/v1/end-users/{alice}")).json()["identities"] == [
        {"kind": "phone", "value": ALICE_PHONE}
    ]


# Which agent answers where -----------------------------------------------------------------------

SALES_NUMBER, SUPPORT_NUMBER, UNROUTED_NUMBER = "+15550003333", "+15550004444", "+15550005555"


async def named_agent(stack: Stack, name: str, **revision: Any) -> str:
    """An agent whose fallback says its name, with `transfer_call`: its id."""
    defaults = {"fallback": f"{name} here.", "tools": [{"name": "transfer_call"}]}
    return str((await make_agent(stack, defaults | revision, name=name))["id"])


async def route(stack: Stack, address: str, agent_id: str) -> dict[str, object]:
    response = await stack.api.put(f"/v1/routes/{address}", json={"agent_id": agent_id})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_two_numbers_routed_to_two_agents_answer_with_different_agents(
    stack: Stack,
) -> None:
    sales, support = await named_agent(stack, "Sales"), await named_agent(stack, "Support")
    await route(stack, SALES_NUMBER, sales)
    await route(stack, "(555) 000-4444", support)  # stored as E.164, like the numbers we receive
    listed = (await stack.api.get("/v1/routes")).json()["items"]
    assert [(r["address"], r["kind"], r["agent_id"]) for r in listed] == [
        (SALES_NUMBER, "phone", sales),
        (SUPPORT_NUMBER, "phone", support),
    ]
    senders = {SALES_NUMBER: "+14155550201", SUPPORT_NUMBER: "+14155550202"}
    senders[UNROUTED_NUMBER] = "+14155550203"
    for ours, sender in senders.items():
        form = sms_form("blorp", sender=sender, to=ours)
        assert (await post_signed(stack, "/twilio/sms", form)).status_code == 200

    async def replies() -> dict[str, str] | None:
        found = {ours: sent_messages(stack, to=sender) for ours, sender in senders.items()}
        if not all(found.values()):
            return None
        return {ours: messages[0]["Body"] for ours, messages in found.items()}

    answered = await eventually(replies, what="a reply on each number")
    assert answered[SALES_NUMBER] == "Sales here."
    assert answered[SUPPORT_NUMBER] == "Support here."
    default = (await stack.api.get("/v1/agents/agent_acme_support")).json()
    default_revision = await stack.core.store.get_revision(default["active_revision_id"])
    assert answered[UNROUTED_NUMBER] == default_revision.fallback
    agents = {c.our_address: c.assigned_agent_id for c in await conversations(stack)}
    assert agents == {
        SALES_NUMBER: sales,
        SUPPORT_NUMBER: support,
        UNROUTED_NUMBER: "agent_acme_support",
    }


async def test_a_domain_route_answers_every_address_without_its_own(stack: Stack) -> None:
    billing, help_desk = await named_agent(stack, "Billing"), await named_agent(stack, "Helpdesk")
    await route(stack, "@Support.Acme.Test", help_desk)
    await route(stack, "billing@acme.test", billing)
    resolved = stack.core.store.routed_agent
    assert await resolved("anyone@support.acme.test") == help_desk
    assert await resolved("Billing@Acme.Test") == billing
    assert await resolved("sales@acme.test") is None  # the default agent answers
    await send(stack, mail("mail-route-1", to="hello@support.acme.test"))

    async def opened() -> list[object] | None:
        return await conversations(stack, "email") or None

    [conv] = await eventually(opened, what="the email conversation")
    assert conv.assigned_agent_id == help_desk  # type: ignore[attr-defined]
    assert (await stack.api.delete("/v1/routes/support.acme.test")).status_code == 204
    assert await resolved("anyone@support.acme.test") is None
    assert (await stack.api.get("/v1/routes/@support.acme.test")).status_code == 404


async def test_routes_need_the_admin_scope_an_agent_with_a_revision_and_a_real_address(
    stack: Stack,
) -> None:
    agent = await named_agent(stack, "Sales")
    operator = await make_key(stack, "operator")
    async with stack.client(operator) as api:
        assert (await api.get("/v1/routes")).status_code == 403
        refused = await api.put(f"/v1/routes/{SALES_NUMBER}", json={"agent_id": agent})
        assert refused.status_code == 403
    unknown = await stack.api.put(f"/v1/routes/{SALES_NUMBER}", json={"agent_id": "agent_x"})
    assert unknown.status_code == 404
    bare = await stack.api.post("/v1/agents", json={"name": "No revision"})
    no_revision = await stack.api.put(
        f"/v1/routes/{SALES_NUMBER}", json={"agent_id": bare.json()["id"]}
    )
    assert no_revision.status_code == 422
    not_an_address = await stack.api.put("/v1/routes/call-me", json={"agent_id": agent})
    assert not_an_address.status_code == 422
    assert (await stack.api.get("/v1/routes")).json()["items"] == []


async def test_greeting_help_text_and_human_queue_come_from_the_routed_agents_revision(
    stack: Stack,
) -> None:
    concierge = await named_agent(
        stack,
        "Concierge",
        voice_greeting="Concierge desk, how may I help?",
        sms_help_text="Concierge: text us any time. Reply STOP to opt out.",
        human_queue_number="+1 (555) 000-7777",
    )
    await route(stack, VOICE_NUMBER, concierge)
    await route(stack, SALES_NUMBER, concierge)
    call = Call(stack)
    greeting = await call.start()
    assert spoken(greeting) == "Concierge desk, how may I help?"
    transfer = await call.say(greeting, "I want to talk to a human")
    dial = transfer.find("Dial")
    assert dial is not None
    assert dial.text == "+15550007777"  # the revision's number, not the gateway's HUMAN_QUEUE
    conv = await voice_conversation(stack, call)
    assert conv.assigned_agent_id == concierge
    help_reply = await post_signed(stack, "/twilio/sms", sms_form("HELP", to=SALES_NUMBER))
    assert "<Message>Concierge: text us any time." in help_reply.text
    # An unrouted number keeps the gateway's settings.
    default_help = await post_signed(stack, "/twilio/sms", sms_form("HELP", to=UNROUTED_NUMBER))
    assert "<Message>Acme Support: reply to this number" in default_help.text


async def test_after_linking_the_agent_sees_one_persons_turns_from_sms_and_email(
    agents: Stack, fakes: FakeServers
) -> None:
    """Issue 12: link SMS and email identities; the agent's context then holds both channels."""
    bot = await named_agent(agents, "Bot", **http_revision(fakes.bot_url("/echo")))
    await route(agents, SALES_NUMBER, bot)
    await route(agents, "@acme.test", bot)
    texter = "+14155550188"
    sent = await post_signed(
        agents, "/twilio/sms", sms_form("my parcel 12345 is late", sender=texter, to=SALES_NUMBER)
    )
    assert sent.status_code == 200

    async def texted() -> list[object] | None:
        return fakes.fakes.seen("/echo") or None

    await eventually(texted, what="the bot answering the text")
    person = await resolve(agents, "sms", texter)
    linked = await agents.api.post(
        "/v1/identity/link",
        json={"end_user_id": person, "channel": "email", "identifier": "jane@example.com"},
    )
    assert linked.status_code == 200, linked.text
    await send(agents, mail("any news on my parcel?", sender="jane@example.com"))

    async def mailed() -> dict[str, Any] | None:
        contexts = [r.json for r in fakes.fakes.seen("/echo")]
        return next((c for c in contexts if c["conversation"]["channel"] == "email"), None)

    context = await eventually(mailed, what="the bot answering the mail")
    assert context["end_user"]["id"] == person
    assert {"kind": "email", "value": "jane@example.com"} in context["end_user"]["identities"]
    assert {"kind": "phone", "value": texter} in context["end_user"]["identities"]
    history = [(t["channel"], t["role"], t["text"]) for t in context["history"]]
    assert ("sms", "user", "my parcel 12345 is late") in history
    assert context["message"]["channel"] == "email"


async def test_a_conversation_we_open_on_email_is_answered_by_the_agent_routed_there(
    stack: Stack,
) -> None:
    """Writing first goes out from our support address: the agent routed there answers it, as it
    would answer the person's own mail; an explicit agent_id still wins."""
    helpdesk, other = await named_agent(stack, "Helpdesk"), await named_agent(stack, "Other")
    await route(stack, "@acme.test", helpdesk)
    identity = {"channel": "email", "identifier": "pat@example.com"}
    routed = await stack.api.post(
        "/v1/conversations", json={"channel": "email", "identity": identity}
    )
    assert routed.status_code == 201, routed.text
    assert routed.json()["our_address"] == "support@acme.test"
    assert routed.json()["assigned_agent_id"] == helpdesk
    chosen = await stack.api.post(
        "/v1/conversations", json={"channel": "email", "identity": identity, "agent_id": other}
    )
    assert chosen.json()["assigned_agent_id"] == other
