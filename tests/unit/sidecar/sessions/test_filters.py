"""Filter tables: what matches, what does not, and how bad patterns are refused."""

from __future__ import annotations

import asyncio
import resource
import time

import pytest
import regex
from pydantic import ValidationError

from sidecar.sessions import filters
from sidecar.sessions.compile_check import check_cost
from sidecar.sessions.filters import (
    REQUEST_BUDGET,
    FilterError,
    LoopBudget,
    RequestView,
    TimeoutCounter,
    compile_filter,
    patterns_of,
)
from sidecar.sessions.spec import (
    MAX_CLAUSES,
    MAX_PATTERN,
    FilterClause,
    HttpFilterSpec,
    SessionSpec,
)
from sidecar.settings import describe_validation_error
from tests.support import Clock

pytestmark = pytest.mark.timeout(10)


def req(
    method: str = "GET", target: str = "/", headers: dict[str, str] | None = None
) -> RequestView:
    lines = [f"{k}: {v}" for k, v in (headers or {}).items()]
    return RequestView(method, target, lines)


def matches(spec: HttpFilterSpec, request: RequestView) -> bool:
    predicate = compile_filter(spec)
    return predicate is None or predicate(request)


@pytest.mark.parametrize(
    ("pattern", "headers", "expected"),
    [
        ("^x-preview: alice$", {"x-preview": "alice"}, True),
        ("^x-preview: alice$", {"X-Preview": "ALICE"}, True),  # case-insensitive
        ("^x-preview: alice$", {"x-preview": "alice2"}, False),
        ("^x-preview: alice$", {"x-other": "x-preview: alice"}, False),  # anchored to the line
        ("alice", {"cookie": "user=alice; theme=dark"}, True),  # unanchored search
        ("MyHeader", {"myheader": "1"}, True),
        ("MyHeader", {"x": "myheader"}, True),  # names and values both searched
        ("^User-Agent: (?!kube-probe)", {"user-agent": "curl/8"}, True),
        ("^User-Agent: (?!kube-probe)", {"user-agent": "kube-probe/1.31"}, False),
        ("^User-Agent: (?!kube-probe)", {}, False),
        (r"^baggage: .*\bpreview=alice\b", {"baggage": "a=1, preview=alice"}, True),
        (r"^baggage: .*\bpreview=alice\b", {"baggage": "preview=alicex"}, False),
    ],
)
def test_header_filter(pattern: str, headers: dict[str, str], expected: bool) -> None:
    assert matches(HttpFilterSpec(header_filter=pattern), req(headers=headers)) is expected


@pytest.mark.parametrize(
    ("pattern", "target", "expected"),
    [
        ("^/api/", "/api/items", True),
        ("^/api/", "/v1/api/items", False),
        ("items$", "/api/items?page=2", True),  # matched against the path without query
        ("page=2", "/api/items?page=2", True),  # and against path with query
        ("^/api/items\\?page=2$", "/api/items?page=2", True),
        ("^(?!/health/)", "/health/live", False),
        ("^(?!/health/)", "/orders", True),
        ("^/Orders", "/orders", False),  # paths are case-sensitive
        ("(?i)^/Orders", "/orders", True),
    ],
)
def test_path_filter(pattern: str, target: str, expected: bool) -> None:
    assert matches(HttpFilterSpec(path_filter=pattern), req(target=target)) is expected


@pytest.mark.parametrize(
    ("method_filter", "method", "expected"),
    [
        ("POST", "POST", True),
        ("post", "POST", True),
        ("POST", "post", True),
        ("GET", "POST", False),
    ],
)
def test_method_filter(method_filter: str, method: str, expected: bool) -> None:
    assert matches(HttpFilterSpec(method_filter=method_filter), req(method=method)) is expected


def test_all_of_and_any_of() -> None:
    both = HttpFilterSpec(all_of=(FilterClause(header="^x-a: 1$"), FilterClause(path="^/p")))
    either = HttpFilterSpec(any_of=(FilterClause(header="^x-a: 1$"), FilterClause(method="DELETE")))
    assert matches(both, req(target="/p", headers={"x-a": "1"}))
    assert not matches(both, req(target="/q", headers={"x-a": "1"}))
    assert not matches(both, req(target="/p"))
    assert matches(either, req(method="DELETE"))
    assert matches(either, req(headers={"x-a": "1"}))
    assert not matches(either, req())


def test_no_filter_matches_everything() -> None:
    assert compile_filter(HttpFilterSpec()) is None


@pytest.mark.parametrize(
    ("spec", "key", "position"),
    [
        (HttpFilterSpec(header_filter="^x-(a"), "http_filter.header_filter", 5),
        (HttpFilterSpec(path_filter="[/api"), "http_filter.path_filter", 5),
        (HttpFilterSpec(path_filter=""), "http_filter.path_filter", None),
        (
            HttpFilterSpec(all_of=(FilterClause(path="^/ok"), FilterClause(header="a{2,1}"))),
            "http_filter.all_of[1].header",
            None,
        ),
        (HttpFilterSpec(any_of=()), "http_filter.any_of", None),
        (HttpFilterSpec(method_filter="GE T"), "http_filter.method_filter", None),
    ],
)
def test_bad_filters_are_refused_with_key_pattern_and_position(
    spec: HttpFilterSpec, key: str, position: int | None
) -> None:
    with pytest.raises(FilterError) as error:
        compile_filter(spec)
    message = str(error.value)
    assert message.startswith(key + ":"), message
    if position is not None:
        assert error.value.position == position
        assert f"at position {position}" in message
        assert message.rstrip().endswith("^")  # a caret under the offending character


def test_empty_pattern_says_what_to_do_instead() -> None:
    with pytest.raises(FilterError, match="leave the filter out to take every request"):
        compile_filter(HttpFilterSpec(header_filter=""))


def test_spec_refuses_two_kinds_at_once_and_suggests_all_of() -> None:
    with pytest.raises(ValueError, match="list them under all_of"):
        HttpFilterSpec(header_filter="a", path_filter="b")


def test_clause_takes_exactly_one_key() -> None:
    with pytest.raises(ValueError, match="exactly one of 'header', 'path' or 'method'"):
        FilterClause(header="a", path="b")


def test_catastrophic_pattern_times_out_as_no_match() -> None:
    counter = TimeoutCounter()
    predicate = compile_filter(HttpFilterSpec(header_filter="^x: (a|aa)+$"), counter)
    assert predicate is not None
    assert predicate(req(headers={"x": "a" * 60 + "!"})) is False
    assert counter.count == 1


# Header filters skip the regex engine where the pattern itself says which header
# it needs (`^Name:`) or is a plain `^Name: value$`. Each pattern here must give
# exactly what the plain search over every line gives.
SHORTCUT_PATTERNS = [
    "^x-preview: alice$",
    "^X-Preview: ALICE$",
    "^x-preview: alice",
    "^x-preview:",
    "^x-preview: (?!alice)",
    "^x-preview: al.ce$",
    "^x-preview:? alice",
    "^x-preview:* alice",
    "^x-previe: alice",
    "^x-preview: alice$|^x-debug: 1$",
    "x-preview: alice$",
    "^x-preview: ss$",
    "(?x) ^x-preview: \\s alice",
    "^x-preview: alice $",
    "^x-preview: a=1, b/2;c@d%e~f$",
]
SHORTCUT_HEADERS = [
    {},
    {"x-preview": "alice"},
    {"X-PREVIEW": "Alice"},
    {"x-preview": "alice "},
    {"x-preview": "alice2"},
    {"x-preview": "bob", "x-debug": "1"},
    {"x-x-preview": "alice"},
    {"other": "x-preview: alice"},
    {"x-preview": "ß"},
    {"x-preview": "alIce", "accept": "*/*"},
    {"x-preview": "a=1, b/2;c@d%e~f"},
    {"x-previewalice": "1"},
]


@pytest.mark.parametrize("pattern", SHORTCUT_PATTERNS)
def test_header_shortcuts_agree_with_the_plain_search(pattern: str) -> None:
    plain = regex.compile(pattern, regex.IGNORECASE | regex.VERSION1)
    predicate = compile_filter(HttpFilterSpec(header_filter=pattern))
    assert predicate is not None
    for headers in SHORTCUT_HEADERS:
        request = req(headers=headers)
        expected = any(plain.search(line) for line in request.header_lines)
        assert predicate(request) is expected, (pattern, headers)


def test_header_shortcuts_are_taken_where_the_pattern_allows() -> None:
    # The comparison and the by-name lookup are what keep 100 sessions cheap.
    exact = compile_filter(HttpFilterSpec(header_filter="^x-preview: alice$"))
    named = compile_filter(HttpFilterSpec(header_filter="^x-preview: (?!alice)"))
    either = compile_filter(HttpFilterSpec(header_filter="^x-preview: a$|^x-b: 1$"))
    assert (getattr(exact, "name", None), getattr(exact, "exact", None)) == (
        "x-preview",
        "x-preview: alice",
    )
    assert (getattr(named, "name", None), getattr(named, "exact", None)) == ("x-preview", None)
    assert getattr(either, "name", "") is None


def test_first_gives_a_headers_first_value_with_or_without_the_index() -> None:
    view = RequestView("GET", "/", ["User-Agent: kube-probe/1.30", "user-agent: other", "a: b"])
    assert view.first("user-agent") == "kube-probe/1.30"
    assert view.first("x-missing") is None
    odd = RequestView("GET", "/", ["User-Agent: kube-probe/1.30", "x-name: café"])
    assert odd.by_name is None  # a non-ASCII line: no index
    assert odd.first("user-agent") == "kube-probe/1.30"


def test_a_request_gets_a_few_milliseconds_of_regex_time_in_all() -> None:
    """Ten sessions with the same backtracking filter cost one request about
    REQUEST_BUDGET, not ten times a per-match timeout."""
    counters = [TimeoutCounter() for _ in range(10)]
    predicates = [compile_filter(HttpFilterSpec(header_filter="^x: (a|aa)+$"), c) for c in counters]
    crafted = req(headers={"x": "a" * 60 + "!"})
    start = time.perf_counter()
    assert not any(p(crafted) for p in predicates if p is not None)
    spent = time.perf_counter() - start
    assert spent < REQUEST_BUDGET * 4, spent  # 4x: scheduling on a shared machine
    assert sum(c.count for c in counters) == 10  # each session's miss is counted


def test_when_the_loop_budget_is_spent_regex_filters_fail_open_and_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    budget = LoopBudget(share=0.1, burst=0.02, clock=clock)
    monkeypatch.setattr(filters, "SHARED_BUDGET", budget)
    counter = TimeoutCounter()
    regex_filter = compile_filter(HttpFilterSpec(header_filter="^x: a+$"), counter)
    literal = compile_filter(HttpFilterSpec(header_filter="^x: aaa$"), counter)
    assert regex_filter is not None and literal is not None
    matching = req(headers={"x": "aaa"})
    assert regex_filter(matching)
    budget.spend(budget.available())  # someone else used it all
    assert not regex_filter(matching)
    assert counter.count == 1
    assert literal(matching)  # a comparison costs no budget
    clock.now += 0.5  # refills at 10% of the time passed: 50 ms, capped at the burst
    assert budget.available() == pytest.approx(0.02)
    assert regex_filter(matching)


@pytest.mark.parametrize(
    ("http_filter", "message"),
    [
        ({"any_of": [{"header": f"^x: {i}$"} for i in range(MAX_CLAUSES + 1)]},
         f"http_filter.any_of lists {MAX_CLAUSES + 1} items; at most {MAX_CLAUSES}"),
        ({"header_filter": "a" * (MAX_PATTERN + 1)},
         f"http_filter.header_filter is {MAX_PATTERN + 1} characters long; a pattern may "
         f"have at most {MAX_PATTERN}"),
        ({"all_of": [{"method": "GET"}, {"path": "/" * (MAX_PATTERN + 1)}]},
         f"http_filter.all_of.1: path is {MAX_PATTERN + 1} characters long"),
    ],
)  # fmt: skip
def test_a_spec_is_bounded_and_says_the_limit_and_the_value(
    http_filter: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        SessionSpec.model_validate({"http_filter": http_filter})
    said = describe_validation_error(caught.value)
    assert message in said
    assert "Value error" not in said


@pytest.mark.parametrize("pattern", ["((a{100}){100}){100}", "(x{1000}){1000}", "a{65535}" * 8])
def test_a_pattern_too_costly_to_compile_is_refused_without_compiling_it_here(
    pattern: str,
) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    spec = HttpFilterSpec(all_of=(FilterClause(method="GET"), FilterClause(header=pattern)))
    with pytest.raises(FilterError, match=r"all_of\[1\]\.header: this pattern is too costly"):
        asyncio.run(check_cost(patterns_of(spec)))
    # This process never held the compiled pattern (some 250 MiB for the first).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 20 * 1024


def test_ordinary_patterns_pass_the_cost_check() -> None:
    spec = HttpFilterSpec(
        any_of=(
            FilterClause(header="^x-preview: (alice|bob)$"),
            FilterClause(path=r"^/api/v[0-9]+/users/\d{1,12}(?!/admin)"),
            FilterClause(header=r"^user-agent: \p{L}{1,50}"),
        )
    )
    asyncio.run(check_cost(patterns_of(spec)))
