"""Every Valkey key Switchboard writes, built in one place: the whole data model on one screen.

Keys carry the namespace and, for everything about one conversation, the hash tag `{conv_id}`, so
one conversation lives in one Redis Cluster slot and one Lua script can change it atomically.

The cluster rules (`REDIS_URL=redis+cluster://…`; the same code runs on one server):

1. One script, one slot. Every Lua script is given only keys of one hash slot: a conversation's
   keys (`{cid}`), a handoff with its conversation (`handoff:{cid}:…`), one approval
   (`approval:{aid}`), one lease group (`{group-leases}`), one rate-limit window, one
   idempotency key. A script never names a key it was not passed.
2. One MULTI, one slot. A transaction (MULTI/EXEC, WATCH) only ever holds keys of one slot:
   `last_turns` and tool results (`{cid}`), the end-user record update of `link_identity` (one
   key). The thread claim is a script on its one key (`thread`).
3. Global indexes are their own step. The indexes that span entities (all conversations, a
   user's or an API key's conversations, approvals and their deadline/unapplied sets, handoffs
   per status and their unclaimed timer, agents, revisions, API keys) are single keys in their
   own slots, written in a separate step (`Connection.in_order`) in an order a crash cannot make
   harmful, and readers heal or skip what a crash left:
     - conversations: the index entries first, then the hash. A crash between leaves an id whose
       hash is missing; listings skip it (`get_conversations` returns what exists). Never a
       conversation that no index finds (erasure must find every one).
     - approvals: the list and the deadline index first, then the hash (an approval that no
       deadline index holds would never time out; the deadline lies ahead, so the sweeper never
       meets an id before its hash); `resolve_approval` changes the status in its script, then
       moves the id from the deadline index to the unapplied set.
     - handoffs: the script on `{cid}` first, then the per-status indexes; `list_handoffs`
       drops entries whose record says otherwise.
     - agents, revisions, API keys: the record first, then the index; an index never names a
       record that is not there (a crash leaves a record the retried request indexes).
     - threads: the conversation's `thread_of` pointer first, then the `thread` entry, so erasure
       (which drops the entry if it still names the conversation, then the pointer) finds every
       entry. Moving an old `legacy_open_conversation` entry: the `thread` entry first, then the
       old one dropped; a crash between leaves an old entry that no lookup of that thread reads
       again (the thread key answers first) and erasure still removes.
4. Usage counts ride on the turn's append: on a cluster each conversation counts into the
   usage shard of its own slot (`usage_shard`: `usage:{<tag of that slot>}`) and `usage()` sums
   the global hash and every shard; on one server the shard is the global hash itself.
5. Reads of many keys (MGET, multi-key DEL) are pipelines of single-key commands, which the
   cluster client sends to each key's node.
"""

from __future__ import annotations

import binascii
import hashlib

SLOTS = 16384
_TAG_WIDTH = 5  # characters '@'..'O': 4 free bits each, 20 bits to reach any 16-bit CRC


def _tag_basis() -> tuple[int, dict[int, tuple[int, int]]]:
    """CRC16 is affine over GF(2): a reduced basis of what each free tag bit flips."""
    zero = bytes([0x40]) * _TAG_WIDTH
    base = binascii.crc_hqx(zero, 0)
    rows: dict[int, tuple[int, int]] = {}  # pivot bit -> (crc change, tag bits that make it)
    for bit in range(4 * _TAG_WIDTH):
        raw = bytearray(zero)
        raw[bit // 4] |= 1 << (bit % 4)
        vector, combo = binascii.crc_hqx(bytes(raw), 0) ^ base, 1 << bit
        for pivot, (v, c) in rows.items():
            if vector >> pivot & 1:
                vector, combo = vector ^ v, combo ^ c
        if vector:
            pivot = vector.bit_length() - 1
            for p, (v, c) in list(rows.items()):
                if v >> pivot & 1:
                    rows[p] = (v ^ vector, c ^ combo)
            rows[pivot] = (vector, combo)
    return base, rows


_BASE, _ROWS = _tag_basis()


def slot_of(tag: str) -> int:
    """The Redis Cluster slot of a hash tag (CRC16/XMODEM mod 16384, as the server computes)."""
    return binascii.crc_hqx(tag.encode(), 0) % SLOTS


def tag_for_slot(slot: int) -> str:
    """A short hash tag whose slot is `slot`: solved, not searched, so it costs microseconds."""
    want, combo = slot ^ _BASE, 0
    for pivot, (vector, bits) in _ROWS.items():
        if want >> pivot & 1:
            want, combo = want ^ vector, combo ^ bits
    return "".join(chr(0x40 | (combo >> 4 * i & 15)) for i in range(_TAG_WIDTH))


class Keys:
    def __init__(self, namespace: str = "", *, cluster: bool = False) -> None:
        self.ns = f"{namespace}:" if namespace else ""
        self.cluster = cluster

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

    def thread(self, channel: str, thread_key: str) -> str:
        """String: the conversation of a channel's thread (the ingress's opaque thread key: SMS
        sender + our number), open or the last one closed."""
        return f"{self.ns}thread:{channel}:{thread_key}"

    def thread_of(self, cid: str) -> str:
        """String: the thread key whose `thread` entry a conversation claimed (for erasure)."""
        return f"{self.ns}thread-of:{{{cid}}}"

    def legacy_open_conversation(self, end_user_id: str, channel: str, address: str) -> str:
        """String: the conversation of (end user, channel, our address), as versions before thread
        keys indexed SMS. Never written now: read once per thread, moved to `thread` and dropped
        (`Conversations.adopt_legacy_thread`); erasure removes what is left."""
        return f"{self.ns}open:{{{end_user_id}}}:{channel}:{address}"

    def inbound(self, envelope_id: str) -> str:
        """String: the conversation an inbound envelope opened."""
        return f"{self.ns}inbound:{envelope_id}"

    def usage(self) -> str:
        """Hash: `conversations:<channel>` / `turns:<channel>` → count (on a cluster, the turn
        counts are in the shards below)."""
        return f"{self.ns}usage"

    def usage_shard(self, cid: str) -> str:
        """Where a conversation's turns are counted: in its own slot on a cluster, so the append
        script can count them (rule 4 above); the global hash on one server."""
        if not self.cluster:
            return self.usage()
        return f"{self.ns}usage:{{{tag_for_slot(slot_of(cid))}}}"

    def usage_shards(self) -> list[str]:
        """Every usage shard a cluster can have (one per slot); none on one server."""
        if not self.cluster:
            return []
        return [f"{self.ns}usage:{{{tag_for_slot(slot)}}}" for slot in range(SLOTS)]

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

    def operators_watching(self) -> str:
        """String with a TTL: an operators' stream is open on some API (kept fresh while one is)."""
        return f"{self.ns}operators-watching"

    def webhook_log(self, wid: str) -> str:
        return f"{self.ns}webhook-log:{wid}"

    # Partition leases (one hash tag per group, so its scripts run on one Cluster slot) --------
    def lease(self, group: str, partition: int) -> str:
        """String: the replica owning the partition, with the lease's time-to-live."""
        return f"{self.ns}lease:{{{group}-leases}}:{partition}"

    def lease_members(self, group: str) -> str:
        """Sorted set: live replicas of the group → when their membership expires (ms)."""
        return f"{self.ns}lease-members:{{{group}-leases}}"
