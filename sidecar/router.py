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

from sidecar.filters import Predicate, RequestView
from sidecar.spec import Mode

__all__ = ["Candidate", "Decision", "decide", "is_probe"]

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
