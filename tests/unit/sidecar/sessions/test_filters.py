"""Filter tables: what matches, what does not, and how bad patterns are refused."""

from __future__ import annotations

import pytest
import regex

from sidecar.sessions.filters import FilterError, RequestView, TimeoutCounter, compile_filter
from sidecar.sessions.spec import FilterClause, HttpFilterSpec

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
