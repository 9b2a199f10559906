"""Preview keys: which developer's session a request is meant for.

A request carries a preview key in any of:
- the header `x-offramp-preview: KEY` (several headers, or values separated by
  commas, carry several keys);
- the cookie `offramp-preview=KEY` (RFC 6265's Cookie header; HTTP/2 may split
  it over several header fields);
- a member `offramp-preview=KEY` of W3C `baggage` (https://www.w3.org/TR/baggage/):
  list members separated by commas, each `key = value` with optional
  `;`-separated properties, values percent-encoded (UTF-8), several baggage
  headers read as one list. A member that does not follow the grammar is
  skipped, never the whole header.

A key is 1 to 64 characters of letters, digits, `.`, `_` and `-`, starting
with a letter or digit (KEY_RULE): it must fit in a cookie, a header and a URL
path unescaped. `clear` is not a key (the link that removes the cookie).

The link (`link_answer`): the sidecar answers `GET PREFIX/preview/KEY?to=PATH`
itself with a redirect to PATH that sets the cookie (HttpOnly, SameSite=Lax,
COOKIE_MAX_AGE; Secure when the caller came over TLS), and
`PREFIX/preview/clear?to=PATH` with one that removes it. PATH must be a path on
the same site (`/...`, never `//host`), so the link cannot send anyone
elsewhere. Pure: no I/O.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "BAGGAGE_MEMBER",
    "COOKIE",
    "COOKIE_MAX_AGE",
    "DEFAULT_PREFIX",
    "HEADER",
    "KEY_RULE",
    "PREFIX_ANNOTATION",
    "PREFIX_ENV",
    "LinkAnswer",
    "PreviewKeyError",
    "add_to_baggage",
    "check_key",
    "check_prefix",
    "keys_in",
    "link_answer",
    "parse_baggage",
    "parse_cookies",
]

HEADER = "x-offramp-preview"
COOKIE = "offramp-preview"
BAGGAGE_MEMBER = "offramp-preview"
KEY_RULE = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
DEFAULT_PREFIX = "/__offramp"
PREFIX_ENV = "OFFRAMP_PREVIEW_PREFIX"
PREFIX_ANNOTATION = "offramp.dev/preview-prefix"
"""On a pod: where its sidecar answers the link, or "off"; injection passes it on
as PREFIX_ENV."""
COOKIE_MAX_AGE = 86400
"""Seconds the link's cookie lasts: a working day and then some."""
CLEAR = "clear"
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TOKEN = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")
_BAGGAGE_OCTETS = frozenset(
    chr(c) for c in range(0x21, 0x7F) if chr(c) not in '",;\\'
)  # printable ASCII less DQUOTE, comma, semicolon and backslash


class PreviewKeyError(ValueError):
    pass


def check_key(key: str) -> str:
    """`key` if it is a valid preview key, else PreviewKeyError saying why."""
    if not _KEY.fullmatch(key):
        raise PreviewKeyError(f"preview key {key!r} is not valid: write {KEY_RULE}")
    if key == CLEAR:
        raise PreviewKeyError(f"{CLEAR!r} cannot be a preview key (the link that removes it)")
    return key


def check_prefix(prefix: str) -> str:
    """A link prefix: a path of one or more segments, without a trailing slash."""
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", prefix):
        raise PreviewKeyError(
            f"preview link prefix {prefix!r} is not valid: write a path such as "
            f"{DEFAULT_PREFIX} (letters, digits, '.', '_', '~', '-'; no trailing slash)"
        )
    return prefix


def _ows(text: str) -> str:
    return text.strip(" \t")


def _token(text: str) -> bool:
    return bool(text) and all(c in _TOKEN for c in text)


def parse_baggage(values: Iterable[str]) -> list[tuple[str, str, tuple[str, ...]]]:
    """The list members of one or more baggage header values, in order: (key,
    percent-decoded value, raw properties). Members that break the grammar are left
    out."""
    members: list[tuple[str, str, tuple[str, ...]]] = []
    for header in values:
        for raw in header.split(","):
            member = _ows(raw)
            if not member:
                continue
            head, *properties = member.split(";")
            key, eq, value = head.partition("=")
            key, value = _ows(key), _ows(value)
            if not eq or not _token(key) or not all(c in _BAGGAGE_OCTETS for c in value):
                continue
            props = tuple(_ows(p) for p in properties)
            if not all(_property(p) for p in props):
                continue
            try:
                decoded = unquote(value, errors="strict")
            except UnicodeDecodeError:
                continue
            members.append((key, decoded, props))
    return members


def _property(text: str) -> bool:
    key, eq, value = text.partition("=")
    if not _token(_ows(key)):
        return False
    return not eq or all(c in _BAGGAGE_OCTETS for c in _ows(value))


def parse_cookies(values: Iterable[str]) -> list[tuple[str, str]]:
    """(name, value) pairs of one or more Cookie header values, as a server reads
    them: pairs separated by `;`, a value's surrounding double quotes removed."""
    pairs: list[tuple[str, str]] = []
    for header in values:
        for raw in header.split(";"):
            name, eq, value = raw.strip().partition("=")
            name, value = name.strip(), value.strip()
            if not eq or not _token(name):
                continue
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            pairs.append((name, value))
    return pairs


def keys_in(header_lines: Sequence[str]) -> frozenset[str]:
    """The valid preview keys a request carries, from its `Name: value` lines."""
    by_name: dict[str, list[str]] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        lower = name.strip().lower()
        if lower in (HEADER, "cookie", "baggage"):
            by_name.setdefault(lower, []).append(value.strip())
    found = [k.strip() for v in by_name.get(HEADER, ()) for k in v.split(",")]
    found += [v for n, v in parse_cookies(by_name.get("cookie", ())) if n == COOKIE]
    found += [v for k, v, _ in parse_baggage(by_name.get("baggage", ())) if k == BAGGAGE_MEMBER]
    return frozenset(k for k in found if _KEY.fullmatch(k))


def add_to_baggage(
    fields: Sequence[tuple[bytes, bytes]], key: str
) -> tuple[tuple[bytes, bytes], ...]:
    """Header fields with `offramp-preview=KEY` in their baggage: kept as they are if
    a member already says so, else appended to the last baggage header (most
    propagators read one), or a new baggage header when there is none."""
    values = [v.decode("latin-1") for n, v in fields if n.lower() == b"baggage"]
    if any(k == BAGGAGE_MEMBER and v == key for k, v, _ in parse_baggage(values)):
        return tuple(fields)
    member = f"{BAGGAGE_MEMBER}={key}".encode()
    last = max((i for i, (n, _) in enumerate(fields) if n.lower() == b"baggage"), default=None)
    if last is None:
        return (*fields, (b"baggage", member))
    out = list(fields)
    name, value = out[last]
    out[last] = (name, value.rstrip(b" \t") + b"," + member if value.strip() else member)
    return tuple(out)


@dataclass(frozen=True)
class LinkAnswer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: str


def link_answer(prefix: str, method: str, target: str, secure: bool) -> LinkAnswer | None:
    """The sidecar's own answer to a request for the preview link, or None when
    `target` is not under `PREFIX/preview/`."""
    split = urlsplit(target)
    base = f"{prefix}/preview/"
    if not split.path.startswith(base):
        return None
    text = (("content-type", "text/plain; charset=utf-8"), ("cache-control", "no-store"))
    if method not in ("GET", "HEAD"):
        return LinkAnswer(405, (*text, ("allow", "GET, HEAD")),
                          "offramp sidecar: the preview link answers GET\n")  # fmt: skip
    key = split.path[len(base) :]
    destination = (parse_qs(split.query).get("to") or ["/"])[0]
    if not destination.startswith("/") or destination.startswith(("//", "/\\")):
        return LinkAnswer(400, text, f"offramp sidecar: to={destination!r} must be a path on "
                          "this site, such as /shop?x=1\n")  # fmt: skip
    attributes = "; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if secure else "")
    if key == CLEAR:
        cookie = f"{COOKIE}=; Max-Age=0{attributes}"
        said = "preview cleared"
    else:
        try:
            check_key(key)
        except PreviewKeyError as e:
            return LinkAnswer(400, text, f"offramp sidecar: {e}\n")
        cookie = f"{COOKIE}={key}; Max-Age={COOKIE_MAX_AGE}{attributes}"
        said = f"preview {key} set for {COOKIE_MAX_AGE // 3600} h"
    headers = (*text, ("location", destination), ("set-cookie", cookie))
    return LinkAnswer(302, headers, f"offramp: {said}; continue to {destination}\n")
