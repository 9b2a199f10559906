"""Preview keys: W3C baggage and Cookie parsing, the keys a request carries, the
link the sidecar answers, and preview as a filter."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.sessions.filters import RequestView, compile_filter
from sidecar.sessions.preview import (
    COOKIE_MAX_AGE,
    PreviewKeyError,
    add_to_baggage,
    check_key,
    check_prefix,
    keys_in,
    link_answer,
    parse_baggage,
    parse_cookies,
)
from sidecar.sessions.spec import HttpFilterSpec

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("values", "want"),
    [
        (["a=1"], [("a", "1", ())]),
        # Optional whitespace around members, keys, values and properties.
        ([" a = 1 ,\tb=2 "], [("a", "1", ()), ("b", "2", ())]),
        # Properties, with and without values.
        (["k=v;p1;p2=x"], [("k", "v", ("p1", "p2=x"))]),
        # Percent-encoding, UTF-8.
        (["name=Jos%C3%A9%20M%2C"], [("name", "José M,", ())]),
        # Several headers read as one list; duplicates kept in order.
        (["a=1", "a=2,b=3"], [("a", "1", ()), ("a", "2", ()), ("b", "3", ())]),
        # Empty members are skipped.
        (["a=1,,  ,b=2"], [("a", "1", ()), ("b", "2", ())]),
        # Broken members are skipped, their neighbours kept: no '=', a key that
        # is not a token, a value with a space or a quote, a bad property, bad
        # UTF-8 in the encoding.
        (
            ['x, bad key=1, c=va lue, d="q", e=1;=p, f=%FF, ok=1'],
            [("ok", "1", ())],
        ),
        (["=1"], []),
        ([""], []),
    ],
)
def test_baggage_members(values: list[str], want: list[tuple[str, str, tuple[str, ...]]]) -> None:
    assert parse_baggage(values) == want


@given(st.lists(st.text(max_size=40), max_size=4))
def test_baggage_parsing_never_raises(values: list[str]) -> None:
    for key, _, _ in parse_baggage(values):
        assert key and " " not in key and "," not in key


@pytest.mark.parametrize(
    ("values", "want"),
    [
        (["a=1; b=2"], [("a", "1"), ("b", "2")]),
        (["a=1;b=2"], [("a", "1"), ("b", "2")]),
        (['a="quoted"'], [("a", "quoted")]),
        (["a=1", "b=2"], [("a", "1"), ("b", "2")]),  # HTTP/2 splits cookies
        (["novalue; =x; a=1"], [("a", "1")]),
        (["a=; b=x=y"], [("a", ""), ("b", "x=y")]),
    ],
)
def test_cookie_pairs(values: list[str], want: list[tuple[str, str]]) -> None:
    assert parse_cookies(values) == want


def test_keys_from_header_cookie_and_baggage() -> None:
    lines = [
        "Host: shop",
        "X-Offramp-Preview: alice, bob",
        "Cookie: theme=dark; offramp-preview=carol",
        "cookie: offramp-preview=dave",
        "baggage: userId=7,offramp-preview=erin;ttl=1",
        "Baggage: offramp-preview=%66rank",  # percent-encoded 'frank'
        "X-Other: offramp-preview=mallory",
        "Cookie: offramp-preview=not valid!",
    ]
    assert keys_in(lines) == {"alice", "bob", "carol", "dave", "erin", "frank"}
    # Not a regex over raw text: a member in another member's value is no member.
    assert keys_in(["baggage: a=offramp-preview%3Dzed"]) == frozenset()


@pytest.mark.parametrize("key", ["alice", "a", "team-1.feat_x", "A" * 64])
def test_good_keys(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize("key", ["", "-a", "a b", "a/b", "ä", "A" * 65, "clear", "a;b"])
def test_bad_keys_say_the_rule(key: str) -> None:
    with pytest.raises(PreviewKeyError, match=r"not valid|cannot be a preview key"):
        check_key(key)


def test_prefixes() -> None:
    assert check_prefix("/__offramp") == "/__offramp"
    assert check_prefix("/a/b") == "/a/b"
    for bad in ("", "/", "x", "/a/", "/a b", "//a"):
        with pytest.raises(PreviewKeyError):
            check_prefix(bad)


def test_the_link_sets_the_cookie_and_redirects() -> None:
    answer = link_answer("/__offramp", "GET", "/__offramp/preview/alice?to=/shop%3Fx%3D1", False)
    assert answer is not None and answer.status == 302
    headers = dict(answer.headers)
    assert headers["location"] == "/shop?x=1"
    assert headers["set-cookie"] == (
        f"offramp-preview=alice; Max-Age={COOKIE_MAX_AGE}; Path=/; HttpOnly; SameSite=Lax"
    )
    assert headers["cache-control"] == "no-store"
    secure = link_answer("/__offramp", "GET", "/__offramp/preview/alice", True)
    assert secure is not None and dict(secure.headers)["location"] == "/"
    assert dict(secure.headers)["set-cookie"].endswith("; Secure")


def test_the_clear_link_removes_the_cookie() -> None:
    answer = link_answer("/__offramp", "GET", "/__offramp/preview/clear?to=/a", False)
    assert answer is not None and answer.status == 302
    assert dict(answer.headers)["set-cookie"].startswith("offramp-preview=; Max-Age=0; Path=/")


@pytest.mark.parametrize(
    ("method", "target", "status", "says"),
    [
        ("GET", "/__offramp/preview/bad%20key", 400, "not valid"),
        ("GET", "/__offramp/preview/alice?to=//evil.example/", 400, "must be a path on this site"),
        ("GET", "/__offramp/preview/alice?to=https://evil.example/", 400, "must be a path"),
        ("GET", "/__offramp/preview/alice?to=/\\evil.example", 400, "must be a path"),
        ("POST", "/__offramp/preview/alice", 405, "answers GET"),
    ],
)
def test_link_requests_that_cannot_be_served(
    method: str, target: str, status: int, says: str
) -> None:
    answer = link_answer("/__offramp", method, target, False)
    assert answer is not None and answer.status == status and says in answer.body


def test_other_paths_are_not_the_links() -> None:
    for target in ("/", "/__offramp", "/__offramp/previewx/a", "/shop/__offramp/preview/a"):
        assert link_answer("/__offramp", "GET", target, False) is None


def test_baggage_is_added_once_to_the_last_header() -> None:
    assert add_to_baggage(((b"host", b"x"),), "alice") == (
        (b"host", b"x"),
        (b"baggage", b"offramp-preview=alice"),
    )
    fields = ((b"baggage", b"a=1"), (b"Baggage", b"b=2 "))
    assert add_to_baggage(fields, "alice") == (
        (b"baggage", b"a=1"),
        (b"Baggage", b"b=2,offramp-preview=alice"),
    )
    kept = ((b"baggage", b"offramp-preview=alice;p=1"),)
    assert add_to_baggage(kept, "alice") == kept


def test_preview_as_a_filter_and_with_another() -> None:
    def view(*lines: str, method: str = "GET") -> RequestView:
        return RequestView(method, "/", list(lines))

    only = compile_filter(HttpFilterSpec(preview="alice"))
    assert only is not None
    assert only(view("Cookie: offramp-preview=alice"))
    assert not only(view("Cookie: offramp-preview=bob"))
    both = compile_filter(HttpFilterSpec(preview="alice", method_filter="POST"))
    assert both is not None
    assert both(view("x-offramp-preview: alice", method="POST"))
    assert not both(view("x-offramp-preview: alice"))
    assert not HttpFilterSpec(preview="alice").is_empty
    with pytest.raises(ValueError, match="not valid"):
        HttpFilterSpec(preview="no good")
