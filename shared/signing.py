"""Signing what we POST to customers (webhooks, bots, tools): one scheme everywhere.

`X-Switchboard-Signature: v1=<hex>` = HMAC-SHA256(secret, "<timestamp>." + body), with the Unix
time in `X-Switchboard-Timestamp`. The receiver recomputes it over the raw body and rejects a
timestamp far from its clock, which makes a captured request useless for replay.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "x-switchboard-signature"
TIMESTAMP_HEADER = "x-switchboard-timestamp"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"v1={mac.hexdigest()}"


def signature_headers(secret: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(secret, timestamp, body)}


def verify(
    secret: str, timestamp: str, signature: str, body: bytes, tolerance: float = 300.0
) -> bool:
    """What a receiver does: a fresh timestamp and a matching signature (constant-time)."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs(time.time() - ts) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)
