"""Typed settings read once from environment variables.

Every field `foo_bar` of a settings Struct is read from `SWITCHBOARD_FOO_BAR`, except the two
connection URLs, which use the names operators already know (`NATS_URL`, `REDIS_URL`). Settings are
loaded by `__main__` and passed into `create_app(settings)`; nothing reads the environment at import.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from shared.errors import InvalidRequest

PREFIX = "SWITCHBOARD_"
_PLAIN_NAMES = {"nats_url": "NATS_URL", "redis_url": "REDIS_URL"}
DEMO_AGENT_ID = "agent_acme_support"


class CommonSettings(msgspec.Struct, kw_only=True, frozen=True):
    data_dir: str = "./.switchboard"
    host: str = "127.0.0.1"
    nats_url: str = "nats://127.0.0.1:4222"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Prefix for every subject, stream and key: lets several gateways or tests share servers.
    namespace: str = ""
    partitions: int = 16
    # JetStream stream replicas: 1 on a laptop, 3 on a production NATS cluster.
    stream_replicas: int = 1
    # Bytes each JetStream stream may hold, per replica (shared/streams.py: the sizing rule). A
    # full stream refuses new work (ingress 503 / SMTP 451); nothing acknowledged is dropped.
    inbound_max_bytes: int = 256 * 1024 * 1024
    outbound_max_bytes: int = 256 * 1024 * 1024
    events_max_bytes: int = 256 * 1024 * 1024
    dead_max_bytes: int = 64 * 1024 * 1024
    # How long JetStream drops a re-published message id; nats-server holds the ids in memory.
    duplicate_window_seconds: float = 30 * 60.0
    log_level: str = "INFO"
    log_format: str = "json"
    default_agent: str = DEMO_AGENT_ID
    # Domains we accept mail for and send from (comma-separated); the first is the default.
    email_domains: str = "switchboard.localhost"
    # Replies are sent from <this>@<domain>; users' replies come back to reply+TOKEN@<domain>.
    email_from_local: str = "support"
    # How often core re-reads whether an operators' screen is open (it sends the console's live
    # notices only then; the API announces a newly opened one at once, and has the screen re-read
    # once this has passed again, services/core/audience.py).
    operator_presence_seconds: float = 1.0

    def domains(self) -> list[str]:
        return [d.strip().lower() for d in self.email_domains.split(",") if d.strip()]


class ApiSettings(CommonSettings, kw_only=True, frozen=True):
    api_port: int = 8080
    bootstrap_api_key: str | None = None
    # How long a synchronous turn waits for core before answering 504.
    turn_timeout_seconds: float = 15.0
    command_timeout_seconds: float = 5.0
    # An erasure reads every message the streams hold: it may take longer than other commands.
    erasure_timeout_seconds: float = 120.0
    # Requests per second per API key, and turns per minute per end user (0 turns a limit off).
    rate_limit_per_key_per_second: int = 100
    rate_limit_turns_per_end_user_per_minute: int = 60


class CoreSettings(CommonSettings, kw_only=True, frozen=True):
    core_health_port: int = 8090
    # Deliveries of one inbound envelope before it goes to the DEAD stream with its reason.
    max_deliver: int = 5
    # JetStream's ack wait for inbound messages; core sends in_progress every third of it for the
    # messages it holds, so a long agent call is never redelivered. After a kill -9 its messages
    # come back to the next owner this long after its last in_progress.
    ack_wait_seconds: float = 10.0
    # Messages of one partition in flight at once (one per conversation at a time).
    in_flight_per_partition: int = 64
    # A core replica owns a partition through a Valkey lease of this length, renewed every third
    # of it: a kill -9'd replica's partitions are taken over within about this long.
    partition_lease_seconds: float = 10.0
    # On shutdown or hand-back, how long messages being applied get to finish before cancelling.
    shutdown_grace_seconds: float = 30.0
    # Envelope-id dedupe keys live this long: far beyond Twilio's and SMTP senders' retry windows.
    dedupe_ttl_seconds: int = 7 * 24 * 3600
    # Where `transfer_call` dials on voice; without one, the caller hears an apology instead.
    human_queue_number: str | None = None
    # How often core re-reads whether any webhook subscription exists (events go through the
    # broker only then); the API also announces every change at once.
    webhook_presence_seconds: float = 1.0
    # How often the durable approval timer looks for approvals past their deadline.
    approval_sweep_seconds: float = 0.5
    # A handoff nobody claims within this time raises `handoff.unclaimed` and, if the revision
    # says `on_unclaimed: return_to_agent`, goes back to the agent with an apology.
    handoff_unclaimed_seconds: float = 600.0
    # Sent once per approval wait when the user writes while a tool call awaits approval.
    # Close and erase conversations idle for more than this many days (0: keep forever), checked
    # every `retention_sweep_seconds` by one core replica.
    retention_days: float = 0.0
    retention_sweep_seconds: float = 3600.0
    # Our number for SMS conversations opened through the API (first contact from us).
    sms_from_number: str | None = None
    still_waiting_message: str = (
        "Thanks for your message. We're still waiting for approval on your earlier request "
        "and will get back to you as soon as it's decided."
    )
    # What one turn may spend on an `http` bot or a model, retries included, before the
    # revision's fallback text goes out (keep it below `ack_wait_seconds`).
    agent_turn_budget_seconds: float = 20.0
    # The first pause between failed attempts at a bot, a model or a tool; it doubles (max 2 s).
    agent_retry_backoff_seconds: float = 0.25
    # How many of the end user's earlier turns (across channels) the agent's context carries.
    agent_history_turns: int = 20


S = TypeVar("S", bound=CommonSettings)


def env_name(field: str) -> str:
    return _PLAIN_NAMES.get(field, PREFIX + field.upper())


def load_settings(cls: type[S], environ: Mapping[str, str] | None = None, **overrides: Any) -> S:
    """Build `cls` from the environment (strings converted to the field types) plus overrides."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        name = env_name(field.name)
        if name in environ:
            raw[field.name] = environ[name]
    raw.update(overrides)
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"bad setting: {exc}") from exc


class TwilioSettings(CommonSettings, kw_only=True, frozen=True):
    # Dev placeholders: with these, `switchboard up` runs the local Twilio fake.
    twilio_account_sid: str = "AC00000000000000000000000000000000"
    twilio_auth_token: str = "dev-auth-token"
    # Subaccounts sign with their own tokens: "ACxxx:token,ACyyy:token".
    twilio_subaccounts: str = ""
    twilio_base_url: str = "https://api.twilio.com"
    twilio_timeout_seconds: float = 10.0
    # Only for local experiments; never in production. Logged loudly when on.
    twilio_skip_signature: bool = False
    sms_port: int = 8081
    # Inbound texts per minute from one number; past it Twilio gets 429 and the text is dropped.
    rate_limit_sms_per_sender_per_minute: int = 30
    # The base URL Twilio signs webhooks with (behind a proxy it is not the URL we see).
    sms_public_url: str | None = None
    voice_port: int = 8082
    voice_public_url: str | None = None
    # How long a speech webhook waits for the agent before the caller hears a hold; egress gives
    # the webhook this head start before it speaks a late reply by updating the live call.
    voice_reply_budget_seconds: float = 4.0
    voice_language: str = "en-US"
    sms_help_text: str = (
        "Acme Support: reply to this number to chat with us. Reply STOP to unsubscribe. "
        "Msg&data rates may apply."
    )

    def subaccounts(self) -> dict[str, str]:
        pairs = (p.split(":", 1) for p in self.twilio_subaccounts.split(",") if ":" in p)
        return {sid.strip(): token.strip() for sid, token in pairs}

    def auth_tokens(self) -> dict[str, str]:
        return {self.twilio_account_sid: self.twilio_auth_token, **self.subaccounts()}

    def public_sms_url(self) -> str:
        return (self.sms_public_url or f"http://{self.host}:{self.sms_port}").rstrip("/")

    def public_voice_url(self) -> str:
        return (self.voice_public_url or f"http://{self.host}:{self.voice_port}").rstrip("/")


class SmsSettings(TwilioSettings, kw_only=True, frozen=True):
    pass


class EgressSettings(TwilioSettings, kw_only=True, frozen=True):
    egress_health_port: int = 8091
    webhook_timeout_seconds: float = 10.0
    # Deliveries of one webhook job, SMS or email that fails for an unexpected reason (not an
    # outage) before it is dead-lettered. Outages are held until the horizons below instead.
    webhook_max_attempts: int = 8
    # First delay after a failed webhook attempt; it doubles, capped at egress_retry_max_delay.
    webhook_backoff_seconds: float = 2.0
    webhook_workers: int = 8
    sms_max_attempts: int = 6
    smtp_relay_host: str = "127.0.0.1"
    smtp_relay_port: int = 1025
    smtp_relay_timeout_seconds: float = 15.0
    email_max_attempts: int = 6
    # Provider outages (relay unreachable or 4xx, Twilio 429/5xx or unreachable, a customer's
    # endpoint failing): the message is held and retried, delays doubling from the base with
    # jitter up to the cap, until it is this old; then it is marked failed and dead-lettered.
    email_retry_horizon_seconds: float = 24 * 3600.0
    sms_retry_horizon_seconds: float = 4 * 3600.0
    webhook_retry_horizon_seconds: float = 8 * 3600.0
    egress_retry_base_seconds: float = 1.0
    egress_retry_max_delay_seconds: float = 300.0


class EmailSettings(CommonSettings, kw_only=True, frozen=True):
    smtp_port: int = 2525
    email_health_port: int = 8092
    # Larger mail is refused with 552 before it is read; attachments travel as metadata only.
    email_max_bytes: int = 10 * 1024 * 1024
    email_max_recipients: int = 20


class VoiceSettings(TwilioSettings, kw_only=True, frozen=True):
    voice_greeting: str = "Hi, this is Acme Support. How can I help you today?"
    human_queue_number: str | None = None
