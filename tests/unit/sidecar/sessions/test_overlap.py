"""The overlap rules as a table: which two steal sessions could want the same request."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.sessions.overlap import Verdict, overlap
from sidecar.sessions.spec import FilterClause, HttpFilterSpec, Mode, SessionSpec

pytestmark = pytest.mark.timeout(10)

NONE, CERTAIN, POSSIBLE = Verdict.NONE, Verdict.CERTAIN, Verdict.POSSIBLE


def spec(mode: Mode = Mode.STEAL, incoming: bool = True, **f: Any) -> SessionSpec:
    return SessionSpec(mode=mode, incoming=incoming, http_filter=HttpFilterSpec(**f))


def header(*patterns: str) -> SessionSpec:
    if len(patterns) == 1:
        return spec(header_filter=patterns[0])
    return spec(all_of=tuple(FilterClause(header=p) for p in patterns))


ALICE = "^x-preview: alice$"
BOB = "^x-preview: bob$"
TEAM = "^x-team: shop$"

TABLE = [
    # (a, b, verdict): the rule it shows
    (spec(), spec(), CERTAIN),  # no filter takes everything
    (spec(), header(ALICE), CERTAIN),
    (spec(preview="alice"), spec(), CERTAIN),
    (spec(preview="alice"), spec(preview="alice"), CERTAIN),  # equal keys
    (spec(preview="alice"), spec(preview="bob"), NONE),  # different keys
    (spec(preview="alice", method_filter="GET"), spec(preview="bob"), NONE),
    (header(ALICE), header(ALICE), CERTAIN),
    (header(ALICE), header(BOB), NONE),  # one name, different values
    (header(ALICE), header(ALICE, TEAM), CERTAIN),  # a subset of the other's names
    (header(TEAM), header(ALICE), NONE),  # neither a subset of the other
    (header("^X-Preview: Alice$"), header(ALICE), CERTAIN),  # header lines compare case-blind
    (header("^x-preview: ali.*"), header(ALICE), POSSIBLE),  # a regex: cannot tell
    (header("^x-preview: ali.*"), header(BOB), POSSIBLE),
    (spec(path_filter="^/api"), spec(path_filter="^/web"), POSSIBLE),
    (spec(method_filter="GET"), spec(method_filter="POST"), NONE),
    (spec(method_filter="get"), spec(method_filter="GET"), CERTAIN),
    (spec(any_of=(FilterClause(header=ALICE),)), header(BOB), POSSIBLE),
    (spec(mode=Mode.MIRROR), spec(), NONE),  # mirror never conflicts
    (spec(), spec(mode=Mode.MIRROR), NONE),
    (spec(incoming=False), spec(), NONE),  # outgoing only takes nothing
]


@pytest.mark.parametrize(("a", "b", "verdict"), TABLE)
def test_overlap_table(a: SessionSpec, b: SessionSpec, verdict: Verdict) -> None:
    assert overlap(a, b, (8080,), (8080,)).verdict is verdict
    assert overlap(b, a, (8080,), (8080,)).verdict is verdict, "the rules are symmetric"


def test_no_port_in_common_never_conflicts() -> None:
    assert overlap(spec(), spec(), (8080,), (9090,)).verdict is NONE


def test_the_reason_is_said() -> None:
    assert "same preview key alice" in overlap(spec(preview="alice"), spec(preview="alice"),
                                               (1,), (1,)).why  # fmt: skip
    assert "without a filter" in overlap(spec(), header(ALICE), (1,), (1,)).why
    assert "x-preview" in overlap(header(ALICE), header(ALICE, TEAM), (1,), (1,)).why
