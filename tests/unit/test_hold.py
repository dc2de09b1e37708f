"""The delays a held message waits between a provider's refusals."""

from __future__ import annotations

from shared.bus import Hold


def test_delays_double_with_jitter_up_to_the_cap() -> None:
    hold = Hold(horizon=86400, base_delay=1.0, max_delay=300.0)
    for attempt, full in [(1, 1.0), (2, 2.0), (5, 16.0), (9, 256.0), (10, 300.0), (500, 300.0)]:
        delays = [hold.delay(attempt, age=0.0) for _ in range(200)]
        assert all(full * 0.5 <= d <= full for d in delays), (attempt, min(delays), max(delays))
        assert len(set(delays)) > 1  # jittered: held messages do not all return at once


def test_the_last_delay_ends_at_the_horizon() -> None:
    hold = Hold(horizon=100.0, base_delay=1.0, max_delay=300.0)
    assert hold.delay(20, age=99.5) <= 0.5
    assert hold.delay(20, age=150.0) == 0.0
