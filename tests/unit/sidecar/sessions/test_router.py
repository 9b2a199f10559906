"""The router: probes first, the oldest matching steal session, every matching mirror."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from sidecar.sessions.filters import Predicate, RequestView, compile_filter
from sidecar.sessions.router import SessionIndex, decide, is_probe
from sidecar.sessions.spec import HttpFilterSpec, Mode

pytestmark = pytest.mark.timeout(10)


@dataclass(frozen=True)
class S:
    name: str
    mode: Mode
    predicate: Predicate | None
    take_probes: bool = False


def header(pattern: str) -> Predicate | None:
    return compile_filter(HttpFilterSpec(header_filter=pattern))


ALICE = RequestView("GET", "/", ["x-preview: alice"])
BOB = RequestView("GET", "/", ["x-preview: bob"])


def test_oldest_matching_steal_wins_and_mirrors_all_get_copies() -> None:
    sessions = [
        S("bob", Mode.STEAL, header("bob")),
        S("alice1", Mode.STEAL, header("alice")),
        S("alice2", Mode.STEAL, header("alice")),
        S("m1", Mode.MIRROR, None),
        S("m2", Mode.MIRROR, header("alice")),
    ]
    d = decide(sessions, ALICE, probe=False)
    assert d.steal is not None and d.steal.name == "alice1"
    assert [m.name for m in d.mirrors] == ["m1", "m2"]
    d = decide(sessions, BOB, probe=False)
    assert d.steal is not None and d.steal.name == "bob"
    assert [m.name for m in d.mirrors] == ["m1"]


def test_probes_skip_sessions_unless_they_ask() -> None:
    sessions = [S("all", Mode.STEAL, None), S("probes", Mode.MIRROR, None, take_probes=True)]
    d = decide(sessions, ALICE, probe=True)
    assert d.steal is None
    assert [m.name for m in d.mirrors] == ["probes"]


def test_nothing_matches() -> None:
    d = decide([S("bob", Mode.STEAL, header("bob"))], ALICE, probe=False)
    assert d.steal is None and d.mirrors == ()


@pytest.mark.parametrize(
    ("agent", "path", "expected"),
    [
        ("kube-probe/1.31", "/anything", True),
        ("curl/8", "/healthz", True),
        ("curl/8", "/healthz/deep", False),
        (None, "/", False),
        ("Kube-Probe/1.31", "/", False),  # kubelet sends exactly kube-probe/
    ],
)
def test_is_probe(agent: str | None, path: str, expected: bool) -> None:
    assert is_probe(agent, path, frozenset({"/healthz"})) is expected


def test_the_index_gives_the_same_decisions_as_checking_every_session() -> None:
    """`SessionIndex.candidates` skips only sessions that cannot match: literal
    header filters the request's lines do not equal. Checked over many mixes of
    literal and other filters, steal and mirror, and requests."""
    rng = random.Random(7)
    patterns = [
        "^x-preview: alice$", "^X-Preview: Bob$", "^x-preview: carol$", "^x-team: a$",
        "^x-preview: (alice|dave)$", "alice", "^x-preview:", "^x-team: (?!a$)",
    ]  # fmt: skip
    values = ["alice", "ALICE", "bob", "carol", "dave", "a", "b", "é"]
    for _ in range(400):
        sessions = [
            S(f"s{i}", rng.choice(list(Mode)), header(rng.choice(patterns)), rng.random() < 0.2)
            for i in range(rng.randint(1, 8))
        ]
        index = SessionIndex(sessions)
        lines = [f"{rng.choice(['x-preview', 'X-Preview', 'x-team'])}: {rng.choice(values)}"
                 for _ in range(rng.randint(0, 3))]  # fmt: skip
        request = RequestView("GET", "/", [*lines, "accept: */*"])
        probe = rng.random() < 0.2
        assert decide(index.candidates(request), request, probe) == decide(
            sessions, request, probe
        ), (sessions, lines)


def test_the_index_leaves_out_team_preview_sessions_a_request_does_not_name() -> None:
    sessions = [S(f"dev{i}", Mode.STEAL, header(f"^x-preview: dev{i}$")) for i in range(100)]
    index = SessionIndex(sessions)
    assert list(index.candidates(RequestView("GET", "/", ["accept: */*"]))) == []
    (only,) = index.candidates(RequestView("GET", "/", ["X-Preview: DEV42"]))
    assert only.name == "dev42"


def preview(key: str) -> Predicate | None:
    return compile_filter(HttpFilterSpec(preview=key))


def test_the_index_looks_up_preview_keys_too() -> None:
    """Preview sessions are found by the key a request carries (header, cookie or
    baggage); mixed with other filters, the decisions are those of checking all."""
    sessions = [S(f"dev{i}", Mode.STEAL, preview(f"dev{i}")) for i in range(100)]
    index = SessionIndex(sessions)
    assert list(index.candidates(RequestView("GET", "/", ["accept: */*"]))) == []
    (only,) = index.candidates(RequestView("GET", "/", ["cookie: a=1; offramp-preview=dev7"]))
    assert only.name == "dev7"
    rng = random.Random(11)
    both = compile_filter(HttpFilterSpec(preview="alice", method_filter="POST"))
    filters = [preview("alice"), preview("bob"), header("^x-preview: alice$"), header("bob"),
               both, None]  # fmt: skip
    carriers = ["x-offramp-preview: alice", "cookie: offramp-preview=bob",
                "baggage: offramp-preview=alice", "x-preview: alice", "x-preview: bob"]  # fmt: skip
    for _ in range(300):
        mixed = [S(f"s{i}", rng.choice(list(Mode)), rng.choice(filters))
                 for i in range(rng.randint(1, 6))]  # fmt: skip
        request = RequestView(rng.choice(["GET", "POST"]), "/",
                              rng.sample(carriers, rng.randint(0, 3)))  # fmt: skip
        assert decide(SessionIndex(mixed).candidates(request), request, False) == decide(
            mixed, request, False
        ), (mixed, request)
