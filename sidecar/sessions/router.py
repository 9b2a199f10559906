"""Which session, if any, takes a request: a pure function of the request head.

Rules, in order:
1. A Kubernetes probe (User-Agent `kube-probe/...`, or a path the sidecar was told
   is a probe path) goes to the app, except for sessions that asked for probes.
2. The oldest steal session whose filter matches takes the request. Later steal
   sessions that also match do not see it (first come, first served).
3. Every mirror session whose filter matches gets a copy, whether or not the
   request was stolen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sidecar.sessions.filters import Predicate, RequestView, literal_header, preview_key
from sidecar.sessions.spec import Mode

__all__ = ["Candidate", "Decision", "SessionIndex", "decide", "is_probe"]

PROBE_AGENT_PREFIX = "kube-probe/"


class Candidate(Protocol):
    """What the router needs of a session."""

    @property
    def mode(self) -> Mode: ...

    @property
    def predicate(self) -> Predicate | None: ...

    @property
    def take_probes(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Decision[S]:
    steal: S | None
    mirrors: tuple[S, ...]


def is_probe(user_agent: str | None, path: str, probe_paths: frozenset[str]) -> bool:
    """A request kubelet sends to probe the pod."""
    return bool(user_agent and user_agent.startswith(PROBE_AGENT_PREFIX)) or path in probe_paths


def decide[S: Candidate](sessions: Sequence[S], request: RequestView, probe: bool) -> Decision[S]:
    """`sessions` in the order they opened (oldest first)."""
    steal: S | None = None
    mirrors: list[S] = []
    for session in sessions:
        if probe and not session.take_probes:
            continue
        if session.mode is Mode.STEAL and steal is not None:
            continue
        predicate = session.predicate
        if predicate is None or predicate(request):
            if session.mode is Mode.STEAL:
                steal = session
            else:
                mirrors.append(session)
    return Decision(steal, tuple(mirrors))


class SessionIndex[S: Candidate]:
    """One port's sessions, in the order they opened, with their literal header
    filters (`^x-preview: alice$`) looked up by line and their preview keys
    (`--preview alice`) by key: what team previews use.

    `candidates(request)` leaves out only sessions that cannot match it: those
    whose filter is a literal header line that none of the request's lines
    equals, or a preview key the request does not carry. So with 100 team-preview
    sessions a request is checked against the one whose key it carries (if any)
    and the sessions with other filters, instead of all 100. The order is kept,
    so `decide` picks the same session.
    """

    __slots__ = ("_by_key", "_by_line", "_names", "_others", "_rest", "sessions")

    def __init__(self, sessions: Sequence[S]):
        self.sessions: tuple[S, ...] = tuple(sessions)
        self._by_line: dict[str, list[int]] = {}
        self._by_key: dict[str, list[int]] = {}
        names: set[str] = set()
        others: list[int] = []
        for i, session in enumerate(self.sessions):
            literal = literal_header(session.predicate)
            key = preview_key(session.predicate)
            if key is not None:
                self._by_key.setdefault(key, []).append(i)
            elif literal is None:
                others.append(i)
            else:
                name, line = literal
                names.add(name)
                self._by_line.setdefault(line, []).append(i)
        self._names = tuple(names)
        self._others = tuple(others)
        self._rest = tuple(self.sessions[i] for i in others)

    def __len__(self) -> int:
        return len(self.sessions)

    def candidates(self, request: RequestView) -> Sequence[S]:
        if not self._by_line and not self._by_key:
            return self.sessions
        hits: list[int] = []
        if self._by_line:
            by_name = request.by_name
            if by_name is None:
                return self.sessions
            for name in self._names:
                for line in by_name.get(name, ()):
                    hits += self._by_line.get(line.lower(), ())
        if self._by_key:
            for key in request.preview_keys:
                hits += self._by_key.get(key, ())
        if not hits:
            return self._rest
        return [self.sessions[i] for i in sorted({*hits, *self._others})]
