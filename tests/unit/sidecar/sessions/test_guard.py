"""HandshakeGuard with a clock the test moves."""

from __future__ import annotations

import logging

import pytest

from sidecar.sessions.guard import MAX_ADDRESSES, HandshakeGuard
from tests.support import Clock

pytestmark = pytest.mark.timeout(10)


def test_a_burst_then_one_try_a_second_per_address() -> None:
    clock = Clock()
    guard = HandshakeGuard(burst=3, refill=1.0, clock=clock)
    for _ in range(3):
        assert guard.wait("10.0.0.9") == 0
        guard.failed("10.0.0.9", "wrong token")
    assert guard.wait("10.0.0.9") == pytest.approx(1.0)
    assert guard.wait("10.0.0.7") == 0  # another address is not slowed down
    guard.failed("10.0.0.9", "refused unread", spend=False)
    clock.now += 0.5
    assert guard.wait("10.0.0.9") == pytest.approx(0.5)
    clock.now += 0.5
    assert guard.wait("10.0.0.9") == 0


def test_failures_are_logged_once_then_as_a_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    guard = HandshakeGuard(burst=10, log_every=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, "sidecar.sessions.guard"):
        for _ in range(500):
            guard.failed("10.0.0.9", "wrong token")
            clock.now += 0.01
        clock.now += 10
        guard.failed("10.0.0.9", "wrong token")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        *["tunnel from 10.0.0.9 refused: wrong token"] * 3,
        "497 more handshakes from 1 address(es) failed in the last 15 s (the last: wrong token)",
        "tunnel from 10.0.0.9 refused: wrong token",
    ]


def test_many_addresses_are_remembered_boundedly_and_logged_as_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    guard = HandshakeGuard(clock=clock)
    with caplog.at_level(logging.WARNING, "sidecar.sessions.guard"):
        for i in range(25_000):
            guard.failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", "wrong token")
        clock.now += 10
        guard.failed("10.9.9.9", "wrong token")
    assert len(guard._buckets) <= MAX_ADDRESSES
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5, lines
    assert lines[3].startswith("24997 more handshakes from 10000+ address(es)"), lines[3]
