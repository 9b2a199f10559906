"""Open sessions: who listens on which app port, and what they have taken.

The registry is read on every request (`for_port`), so it keeps an index of
each port's sessions (`sidecar.sessions.router.SessionIndex`), rebuilt only when a
session opens or closes. Listeners hear when
a port gets its first session or loses its last (that is when capture starts and
stops); watchers hear every change (proxy workers learn the sessions so).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.outgoing.dialer import OutgoingService
from sidecar.sessions.filters import Predicate, TimeoutCounter
from sidecar.sessions.router import SessionIndex
from sidecar.sessions.spec import Mode, SessionSpec
from sidecar.tunnel.driver import StreamHandle, Tunnel

__all__ = ["MAX_MIRRORS_IN_FLIGHT", "MIRROR_BACKLOG", "Session", "SessionRegistry"]

MAX_MIRRORS_IN_FLIGHT = 64
"""Mirror copies one session may have in the tunnel at once; more are dropped."""
MIRROR_BACKLOG = 16 * 1024 * 1024
"""Bytes of mirror copies one session may hold waiting for tunnel window."""

log = logging.getLogger(__name__)

_ids = itertools.count(1)


@dataclass(eq=False)
class Session:
    spec: SessionSpec
    predicate: Predicate | None
    tunnel: Tunnel
    timeouts: TimeoutCounter
    id: str = field(default_factory=lambda: f"s{next(_ids)}")
    opened_at: float = field(default_factory=time.time)
    stolen: int = 0
    mirrored: int = 0
    mirror_dropped: int = 0
    mirror_streams: set[StreamHandle] = field(default_factory=set)
    mirror_backlog: int = 0
    outgoing: OutgoingService | None = None
    """Its outgoing connections and DNS through the pod, if it asked for them."""
    taking_over: list[Session] = field(default_factory=list)
    """Other users' sessions this one (opened with force) ends once it is open."""

    def mirrors_in_flight(self) -> int:
        self.mirror_streams = {h for h in self.mirror_streams if h.active}
        return len(self.mirror_streams)

    @property
    def mode(self) -> Mode:
        return self.spec.mode

    @property
    def take_probes(self) -> bool:
        return self.spec.take_probes

    def describe(self) -> str:
        who = f" ({self.spec.client})" if self.spec.client else ""
        return f"session {self.id}{who}"


_NONE: SessionIndex[Session] = SessionIndex(())

PortListener = Callable[[int, int], None]
"""Called with (app port, number of sessions now covering it) when that number
goes from 0 to 1 or from 1 to 0."""


@dataclass
class SessionRegistry:
    app_ports: tuple[int, ...]
    _sessions: list[Session] = field(default_factory=list)
    _by_port: dict[int, SessionIndex[Session]] = field(default_factory=dict)
    _listeners: list[PortListener] = field(default_factory=list)
    _watchers: list[Callable[[tuple[Session, ...]], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_port = {port: _NONE for port in self.app_ports}

    def add_listener(self, listener: PortListener) -> None:
        self._listeners.append(listener)

    def watch(self, watcher: Callable[[tuple[Session, ...]], None]) -> None:
        """`watcher` hears every change: the sessions now open, oldest first."""
        self._watchers.append(watcher)

    def covered_ports(self, spec: SessionSpec) -> tuple[int, ...]:
        return tuple(p for p in self.app_ports if spec.covers_port(p))

    def for_port(self, port: int) -> SessionIndex[Session]:
        return self._by_port.get(port, _NONE)

    @property
    def sessions(self) -> tuple[Session, ...]:
        return tuple(self._sessions)

    def add(self, session: Session) -> None:
        """Add a session; if a listener fails (capture could not start), the
        session is taken out again and the listener's error raised."""
        self._sessions.append(session)
        try:
            self._rebuild()
        except Exception:
            self._sessions.remove(session)
            self._rebuild()
            self._tell_watchers()  # they may have been told it was coming
            raise
        self._tell_watchers()

    def remove(self, session: Session) -> None:
        if session in self._sessions:
            self._sessions.remove(session)
            self._rebuild()
            self._tell_watchers()

    def _tell_watchers(self) -> None:
        for watcher in self._watchers:
            watcher(self.sessions)

    def _rebuild(self) -> None:
        before = {port: len(s) for port, s in self._by_port.items()}
        self._by_port = {
            port: SessionIndex([s for s in self._sessions if s.spec.covers_port(port)])
            for port in self.app_ports
        }
        for port, sessions in self._by_port.items():
            if (before[port] == 0) != (len(sessions) == 0):
                for listener in self._listeners:
                    try:
                        listener(port, len(sessions))
                    except Exception:
                        if sessions:  # failed to start: undo by the caller
                            raise
                        log.exception("port %d: could not stop capturing", port)
