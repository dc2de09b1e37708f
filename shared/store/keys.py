"""Every Valkey key Switchboard writes, built in one place: the whole data model on one screen.

Keys carry the namespace and, for everything about one conversation, the hash tag `{conv_id}`, so
one conversation lives in one Redis Cluster slot and one Lua script can change it atomically.
"""

from __future__ import annotations

import hashlib


class Keys:
    def __init__(self, namespace: str = "") -> None:
        self.ns = f"{namespace}:" if namespace else ""

    # One conversation (all `{cid}`-tagged) ------------------------------------------------------
    def conversation(self, cid: str) -> str:
        """Hash: doc (JSON), status, last_seq, updated_at, closed_reason, approval_id, handoff_id,
        and operator_id / operator_name while a person has claimed its handoff."""
        return f"{self.ns}conv:{{{cid}}}"

    def turn_log(self, cid: str) -> str:
        """List: turn `seq` at index seq - 1, positional JSON."""
        return f"{self.ns}turn-log:{{{cid}}}"

    def events(self, cid: str) -> str:
        """Hash: event id → event JSON (the audit log's bodies)."""
        return f"{self.ns}events:{{{cid}}}"

    def event_order(self, cid: str) -> str:
        """List: event ids in order, `t<seq>` marking a turn's `turn.created`."""
        return f"{self.ns}event-order:{{{cid}}}"

    def pending(self, cid: str) -> str:
        """List: seqs of user messages waiting while the conversation is not active."""
        return f"{self.ns}pending:{{{cid}}}"

    def seen(self, cid: str) -> str:
        """Hash: dedupe key → seq of the turn it appended."""
        return f"{self.ns}seen:{{{cid}}}"

    def deliveries(self, cid: str) -> str:
        """Hash: turn id → Delivery of that reply."""
        return f"{self.ns}deliveries:{{{cid}}}"

    def call_of(self, cid: str) -> str:
        return f"{self.ns}call-of:{{{cid}}}"

    def originals(self, cid: str) -> str:
        """Hash: seq → the untrimmed original of an email turn."""
        return f"{self.ns}originals:{{{cid}}}"

    def email_thread(self, cid: str) -> str:
        return f"{self.ns}email-thread:{{{cid}}}"

    def tool_results(self, cid: str) -> str:
        """Hash: a tool call's idempotency key → its result (JSON), so a redelivery never runs
        the call again."""
        return f"{self.ns}tool-results:{{{cid}}}"

    # Conversation indexes -----------------------------------------------------------------------
    def conversations(self) -> str:
        """Sorted set (all scores 0): conversation ids, paged lexicographically (ids sort by time)."""
        return f"{self.ns}convs"

    def end_user_conversations(self, end_user_id: str) -> str:
        """Sorted set (all scores 0): the end user's conversation ids on every channel."""
        return f"{self.ns}user-convs:{{{end_user_id}}}"

    def key_conversations(self, key_id: str) -> str:
        """Sorted set (all scores 0): the conversations an API key opened (`own` visibility)."""
        return f"{self.ns}key-convs:{key_id}"

    def open_conversation(self, end_user_id: str, channel: str, address: str) -> str:
        return f"{self.ns}open:{{{end_user_id}}}:{channel}:{address}"

    def inbound(self, envelope_id: str) -> str:
        """String: the conversation an inbound envelope opened."""
        return f"{self.ns}inbound:{envelope_id}"

    def usage(self) -> str:
        return f"{self.ns}usage"

    # Approvals ----------------------------------------------------------------------------------
    def approval(self, aid: str) -> str:
        return f"{self.ns}approval:{{{aid}}}"

    def approvals(self) -> str:
        return f"{self.ns}approvals"

    def approvals_pending(self) -> str:
        """Sorted set: pending approval id → deadline (epoch seconds)."""
        return f"{self.ns}approvals:pending"

    def approvals_unapplied(self) -> str:
        """Sorted set: decided but not yet carried out by core → when decided."""
        return f"{self.ns}approvals:unapplied"

    # Handoffs ------------------------------------------------------------------------------------
    def handoff(self, cid: str, ulid: str) -> str:
        """Hash: doc (JSON), status, assignee, assignee_name, assigned_at, resolved_at, outcome,
        unclaimed_at. Tagged with its conversation: a claim changes both in one script."""
        return f"{self.ns}handoff:{{{cid}}}:{ulid}"

    def conversation_handoffs(self, cid: str) -> str:
        """Set: every handoff id of one conversation (what erasing it must delete)."""
        return f"{self.ns}handoffs-of:{{{cid}}}"

    def handoffs(self, status: str) -> str:
        """Sorted set (all scores 0): handoff ids in `status`, paged lexicographically."""
        return f"{self.ns}handoffs:{status}"

    def handoffs_unclaimed(self) -> str:
        """Sorted set: requested handoff id → when it counts as unclaimed (epoch seconds)."""
        return f"{self.ns}handoffs:unclaimed-deadlines"

    def once(self, claim: str) -> str:
        return f"{self.ns}once:{claim}"

    # Channel state ------------------------------------------------------------------------------
    def opt_out(self, channel: str, ours: str, theirs: str) -> str:
        return f"{self.ns}optout:{channel}:{ours}:{theirs}"

    def provider_message(self, provider_id: str) -> str:
        """String: `cid|turn_id` of the reply a provider id (MessageSid) belongs to."""
        return f"{self.ns}provider:{provider_id}"

    def call(self, call_sid: str) -> str:
        return f"{self.ns}call:{call_sid}"

    def message_id(self, message_id: str) -> str:
        return f"{self.ns}msgid:{message_id}"

    def reply_token(self, token: str) -> str:
        return f"{self.ns}replytoken:{token}"

    def idempotency(self, scope: str, key: str) -> str:
        """String: `<body hash>|<result>` of the first request under a client's Idempotency-Key.
        Scope and key are hashed: the key is the client's free text, and the scope names a
        conversation, which an erasure must not leave behind in a key name."""
        digest = hashlib.sha256(f"{scope}\x00{key}".encode()).hexdigest()
        return f"{self.ns}idem:{digest}"

    def rate(self, bucket: str) -> str:
        """A fixed rate-limit window's counter (expires by itself)."""
        return f"{self.ns}rate:{bucket}"

    # Directory ----------------------------------------------------------------------------------
    def identity(self, kind: str, value: str) -> str:
        return f"{self.ns}ident:{kind}:{value}"

    def end_user(self, uid: str) -> str:
        return f"{self.ns}user:{{{uid}}}"

    def agent(self, agent_id: str) -> str:
        return f"{self.ns}agent:{agent_id}"

    def agents(self) -> str:
        return f"{self.ns}agents"

    def revision_secrets(self, revision_id: str) -> str:
        """Hash: `http` → the bot's signing secret, `tool:<name>` → a tool's. Kept apart from the
        revision so no read of a revision can return one."""
        return f"{self.ns}revision-secrets:{revision_id}"

    def revision_counter(self, agent_id: str) -> str:
        return f"{self.ns}agent-revisions:{agent_id}"

    def revision(self, revision_id: str) -> str:
        return f"{self.ns}revision:{revision_id}"

    def revisions(self, agent_id: str) -> str:
        """Sorted set: revision id → revision number."""
        return f"{self.ns}revisions:{agent_id}"

    def api_key(self, secret_hash: str) -> str:
        return f"{self.ns}apikey:{secret_hash}"

    def api_keys(self) -> str:
        """Sorted set: the ids of live (unrevoked) API keys."""
        return f"{self.ns}apikeys"

    def api_key_ids(self) -> str:
        """Hash: API key id → the hash of its secret (to revoke or replace a key by id)."""
        return f"{self.ns}apikey-ids"

    def api_key_used(self) -> str:
        """Hash: API key id → when it was last used (written at most once a minute per key)."""
        return f"{self.ns}apikey-used"

    def routes(self) -> str:
        """Hash: one of our addresses (E.164, email, `@domain`) → its Route (the answering agent)."""
        return f"{self.ns}routes"

    def erasure_log(self) -> str:
        """List, newest first: `end_user.erased` / `conversation.erased` events (ids and counts)."""
        return f"{self.ns}erasure-log"

    def webhooks(self) -> str:
        return f"{self.ns}webhooks"

    def webhook_log(self, wid: str) -> str:
        return f"{self.ns}webhook-log:{wid}"

    # Partition leases (one hash tag per group, so its scripts run on one Cluster slot) --------
    def lease(self, group: str, partition: int) -> str:
        """String: the replica owning the partition, with the lease's time-to-live."""
        return f"{self.ns}lease:{{{group}-leases}}:{partition}"

    def lease_members(self, group: str) -> str:
        """Sorted set: live replicas of the group → when their membership expires (ms)."""
        return f"{self.ns}lease-members:{{{group}-leases}}"
