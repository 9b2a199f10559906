"""Failed handshakes, per caller address: a bucket of tries that refills slowly.

Each address may fail `burst` handshakes (a wrong token, something that is not
a HELLO) at once, then one more every 1/`refill` seconds; until then its
handshakes are refused before the token is looked at. Another address is not
slowed down at all.

Failures are logged a few at a time: in each `log_every` seconds the first
LINES_PER_WINDOW with their address, the rest as one count (written with the
first failure after the window), so that guessing callers, from one address or
from many, cannot fill the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["HandshakeGuard"]

log = logging.getLogger(__name__)

MAX_ADDRESSES = 10_000
"""Addresses remembered at once; when full, those whose bucket is full again are
forgotten, else the longest unseen."""
LINES_PER_WINDOW = 3


@dataclass(slots=True)
class _Bucket:
    tries: float
    at: float


class HandshakeGuard:
    def __init__(
        self,
        burst: int = 10,
        refill: float = 1.0,
        log_every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.burst = burst
        self.refill = refill
        self.log_every = log_every
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._window: float | None = None
        self._lines = 0
        self._unlogged = 0
        self._unlogged_from: set[str] = set()

    def wait(self, address: str) -> float:
        """0 if `address` may try a handshake now, else the seconds until it may."""
        bucket = self._bucket(address)
        return 0.0 if bucket.tries >= 1 else (1 - bucket.tries) / self.refill

    def failed(self, address: str, why: str, *, spend: bool = True) -> None:
        """Count a failed handshake; one refused for want of tries (`spend` False)
        is logged with the rest but costs none."""
        bucket = self._bucket(address)
        if spend:
            bucket.tries = max(0.0, bucket.tries - 1)
        self._log(address, why, bucket.at)

    def _log(self, address: str, why: str, now: float) -> None:
        if self._window is None or now - self._window >= self.log_every:
            if self._unlogged:
                addresses = len(self._unlogged_from)
                log.warning(
                    "%d more handshakes from %s address(es) failed in the last %.0f s "
                    "(the last: %s)",
                    self._unlogged,
                    f"{addresses}+" if addresses >= MAX_ADDRESSES else addresses,
                    now - (self._window or now),
                    why,
                )
            self._window, self._lines, self._unlogged = now, 0, 0
            self._unlogged_from.clear()
        if self._lines < LINES_PER_WINDOW:
            self._lines += 1
            log.warning("tunnel from %s refused: %s", address, why)
            return
        self._unlogged += 1
        if len(self._unlogged_from) < MAX_ADDRESSES:
            self._unlogged_from.add(address)

    def _bucket(self, address: str) -> _Bucket:
        now = self.clock()
        bucket = self._buckets.pop(address, None)  # re-inserted: the dict stays oldest first
        if bucket is None:
            if len(self._buckets) >= MAX_ADDRESSES:
                self._make_room(now)
            bucket = _Bucket(float(self.burst), now)
        else:
            bucket.tries = min(float(self.burst), bucket.tries + (now - bucket.at) * self.refill)
            bucket.at = now
        self._buckets[address] = bucket
        return bucket

    def _make_room(self, now: float) -> None:
        for address, bucket in list(self._buckets.items()):
            if bucket.tries + (now - bucket.at) * self.refill >= self.burst:
                del self._buckets[address]
        # Still full: forget the longest unseen tenth at once, so this runs seldom.
        if len(self._buckets) >= MAX_ADDRESSES:
            for address in list(self._buckets)[: MAX_ADDRESSES // 10]:
                del self._buckets[address]
