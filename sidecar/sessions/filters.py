"""HTTP filters compiled once into pure predicates.

A filter is compiled when a session opens; a bad pattern is refused there with
the key, the pattern and the position of the error (`FilterError`), never per
request. Matching rules (shared with mirrord):

- header: the regex is *searched* (unanchored), case-insensitively, in each
  header written `Name: value`; any header matching is a match.
- path: the regex is searched in the path without its query and in the path with
  its query; either matching is a match. Case-sensitive, as paths are.
- method: compared case-insensitively, exactly.
- all_of / any_of: conjunction / disjunction of the above.
- preview: the request carries the preview key (`sidecar.sessions.preview`: a
  header, a cookie or a baggage member); with another filter, both must match.

Patterns use the `regex` module: look-arounds work (`^User-Agent: (?!kube-probe)`).
Regex matching runs on the proxy's event loop, so it is bounded twice, and a
catastrophic pattern cannot stall other traffic:

- each request gets REQUEST_BUDGET seconds of regex time across all sessions;
- all requests together get at most LOOP_SHARE of the loop's time (a bucket
  that holds LOOP_BURST seconds and refills at LOOP_SHARE per second), so a
  flood of crafted requests cannot add up to a stall either.

A match that runs out of budget counts as *no match*: the request goes to the
real app (fail open), and the session's TimeoutCounter counts it, which the
developer is told about. Literal header filters (`^x-preview: alice$`) and
method filters are comparisons, not regex work, and cost no budget.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import regex

from sidecar.sessions.preview import keys_in
from sidecar.sessions.spec import FilterClause, HttpFilterSpec

__all__ = [
    "LOOP_BURST",
    "LOOP_SHARE",
    "REQUEST_BUDGET",
    "SHARED_BUDGET",
    "TIMEOUT_REPORT_EVERY",
    "FilterError",
    "LoopBudget",
    "Predicate",
    "RequestView",
    "TimeoutCounter",
    "compile_filter",
    "literal_header",
    "patterns_of",
    "preview_key",
]

REQUEST_BUDGET = 0.005
"""Seconds of regex matching one request may take, across all sessions."""
LOOP_SHARE = 0.10
"""Share of the event loop's time that regex matching may take in all."""
LOOP_BURST = 0.020
"""Seconds of regex matching the loop may spend at once before LOOP_SHARE holds."""


class LoopBudget:
    """The regex time all requests of one process share: a bucket of `burst`
    seconds that refills at `share` seconds per second."""

    __slots__ = ("_at", "_clock", "_left", "burst", "share")

    def __init__(
        self,
        share: float = LOOP_SHARE,
        burst: float = LOOP_BURST,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.share = share
        self.burst = burst
        self._clock = clock
        self._left = burst
        self._at = clock()

    def available(self) -> float:
        now = self._clock()
        self._left = min(self.burst, self._left + (now - self._at) * self.share)
        self._at = now
        return self._left

    def spend(self, seconds: float) -> None:
        self._left -= seconds


TIMEOUT_REPORT_EVERY = 1.0
"""Seconds between reports of a session's filter timeouts (only when they grew)."""

SHARED_BUDGET = LoopBudget()
"""This process's budget; every request's matching draws on it."""


class FilterError(ValueError):
    """A filter in a session spec cannot be compiled. The message names the key,
    the pattern and the position, and says what to do."""

    def __init__(self, key: str, pattern: str, problem: str, position: int | None = None):
        self.key = key
        self.pattern = pattern
        self.position = position
        where = ""
        if position is not None:
            where = f" at position {position}\n    {pattern}\n    {' ' * position}^"
        super().__init__(f"{key}: {problem} in pattern {pattern!r}{where}")


@dataclass(frozen=True, slots=True)
class RequestView:
    """What a filter sees of a request: built once per request by the router."""

    method: str
    target: str
    """Path with its query, as on the request line (origin form)."""
    header_lines: Sequence[str]
    """Each header written `Name: value`."""
    by_name: dict[str, list[str]] | None = field(init=False, repr=False, compare=False)
    """The same lines by lower-case header name; None if any line is not ASCII
    (the regex engine's full case folding can match such a line where a plain
    lower-case comparison would not, so those requests get the plain search)."""
    deadline: float = field(default=0.0, init=False, repr=False, compare=False)
    """perf_counter() time by which this request's regex matching must be done;
    set by its first regex search."""
    _previews: frozenset[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, list[str]] = {}
        for line in self.header_lines:
            if not line.isascii():
                object.__setattr__(self, "by_name", None)
                return
            by_name.setdefault(line.partition(":")[0].lower(), []).append(line)
        object.__setattr__(self, "by_name", by_name)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def preview_keys(self) -> frozenset[str]:
        """The preview keys the request carries (header, cookie, baggage), read once."""
        if self._previews is None:
            object.__setattr__(self, "_previews", keys_in(self.header_lines))
        assert self._previews is not None
        return self._previews

    def first(self, name: str) -> str | None:
        """The value of the first header called `name` (lower case), or None."""
        if self.by_name is not None:
            lines: Sequence[str] = self.by_name.get(name, ())
        else:
            lines = [line for line in self.header_lines if line.partition(":")[0].lower() == name]
        return lines[0].partition(":")[2].strip() if lines else None


@dataclass(slots=True)
class TimeoutCounter:
    """Matches of one session that ran out of budget (and so went to the app):
    `count` in this process, `elsewhere` as other processes reported theirs."""

    count: int = 0
    elsewhere: dict[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.count + sum(self.elsewhere.values())


def _search(pattern: regex.Pattern[str], text: str, req: RequestView) -> bool:
    """`pattern` searched in `text` within what is left of the request's and the
    loop's budget; TimeoutError when nothing is left or the search overruns."""
    budget = SHARED_BUDGET
    start = time.perf_counter()
    if not req.deadline:
        object.__setattr__(req, "deadline", start + REQUEST_BUDGET)
    allowed = min(req.deadline - start, budget.available())
    if allowed <= 0:
        raise TimeoutError("no regex budget left")
    try:
        return pattern.search(text, timeout=allowed) is not None
    finally:
        budget.spend(time.perf_counter() - start)


Predicate = Callable[[RequestView], bool]


# A header pattern that starts `^Name:` can only match the lines of that header,
# and one that reads `^Name: value$` in plain characters is a comparison. Found
# once when the filter compiles, this spares the regex engine (about 2 us per
# call with a timeout) on every other header, which is what makes many sessions
# cheap. Anything with an alternation or other syntax in those places keeps the
# plain search over every line.
_NAMED = re.compile(r"\^([A-Za-z0-9_-]+):(?![*?{])")
_LITERAL = re.compile(r"\^([A-Za-z0-9_-]+): ([A-Za-z0-9_ =,;/@%~-]*)\$")


@dataclass(frozen=True, slots=True)
class _Header:
    pattern: regex.Pattern[str]
    timeouts: TimeoutCounter = field(compare=False)
    name: str | None = None
    """Lower-case header name the pattern requires, if it says so literally."""
    exact: str | None = None
    """Lower-case `name: value` line the pattern is equivalent to, if it is literal."""

    @classmethod
    def of(cls, source: str, pattern: regex.Pattern[str], timeouts: TimeoutCounter) -> _Header:
        if "|" in source or pattern.flags & regex.VERBOSE or not source.isascii():
            return cls(pattern, timeouts)
        if literal := _LITERAL.fullmatch(source):
            name = literal[1].lower()
            return cls(pattern, timeouts, name, f"{name}: {literal[2].lower()}")
        named = _NAMED.match(source)
        return cls(pattern, timeouts, named[1].lower() if named else None)

    def __call__(self, req: RequestView) -> bool:
        lines: Sequence[str] | None = req.header_lines
        if req.by_name is not None and self.name is not None:
            lines = req.by_name.get(self.name)
            if not lines:
                return False
            if self.exact is not None:
                return any(line.lower() == self.exact for line in lines)
        assert lines is not None
        try:
            return any(_search(self.pattern, line, req) for line in lines)
        except TimeoutError:
            self.timeouts.count += 1
            return False


@dataclass(frozen=True, slots=True)
class _Path:
    pattern: regex.Pattern[str]
    timeouts: TimeoutCounter = field(compare=False)

    def __call__(self, req: RequestView) -> bool:
        try:
            if _search(self.pattern, req.path, req):
                return True
            return "?" in req.target and _search(self.pattern, req.target, req)
        except TimeoutError:
            self.timeouts.count += 1
            return False


@dataclass(frozen=True, slots=True)
class _Method:
    method: str

    def __call__(self, req: RequestView) -> bool:
        return req.method.upper() == self.method


@dataclass(frozen=True, slots=True)
class _Preview:
    key: str

    def __call__(self, req: RequestView) -> bool:
        return self.key in req.preview_keys


@dataclass(frozen=True, slots=True)
class _AllOf:
    parts: tuple[Predicate, ...]

    def __call__(self, req: RequestView) -> bool:
        return all(p(req) for p in self.parts)


@dataclass(frozen=True, slots=True)
class _AnyOf:
    parts: tuple[Predicate, ...]

    def __call__(self, req: RequestView) -> bool:
        return any(p(req) for p in self.parts)


def _compile_regex(key: str, pattern: str, flags: int) -> regex.Pattern[str]:
    if pattern == "":
        raise FilterError(
            key,
            pattern,
            "an empty pattern matches every request; leave the filter out to take every "
            "request, or write what to match",
        )
    try:
        return regex.compile(pattern, flags | regex.VERSION1)
    except regex.error as e:
        # The stubs omit regex.error's msg/pos, which the module does set.
        msg, pos = getattr(e, "msg", str(e)), getattr(e, "pos", None)
        raise FilterError(key, pattern, f"invalid regex ({msg})", pos) from e


def _compile_method(key: str, method: str) -> _Method:
    name = method.strip().upper()
    if not name or not name.isascii() or not all(c.isalpha() or c in "-_" for c in name):
        raise FilterError(key, method, "not an HTTP method name (e.g. GET, POST)")
    return _Method(name)


def _header(key: str, source: str, timeouts: TimeoutCounter) -> _Header:
    return _Header.of(source, _compile_regex(key, source, regex.IGNORECASE), timeouts)


def _compile_clause(key: str, clause: FilterClause, timeouts: TimeoutCounter) -> Predicate:
    if clause.header is not None:
        return _header(f"{key}.header", clause.header, timeouts)
    if clause.path is not None:
        return _Path(_compile_regex(f"{key}.path", clause.path, 0), timeouts)
    assert clause.method is not None  # FilterClause guarantees exactly one
    return _compile_method(f"{key}.method", clause.method)


def _compile_list(
    key: str, clauses: tuple[FilterClause, ...], timeouts: TimeoutCounter
) -> tuple[Predicate, ...]:
    if not clauses:
        raise FilterError(key, "[]", "an empty list matches nothing useful; list at least one")
    return tuple(_compile_clause(f"{key}[{i}]", c, timeouts) for i, c in enumerate(clauses))


def compile_filter(
    spec: HttpFilterSpec, timeouts: TimeoutCounter | None = None
) -> Predicate | None:
    """Compile `spec` into a predicate; `None` means "every request matches".

    Raises `FilterError` for a pattern that does not compile, an empty pattern
    or an empty list.
    """
    t = timeouts if timeouts is not None else TimeoutCounter()
    rest = _compile_rest(spec, t)
    if spec.preview is None:
        return rest
    return _Preview(spec.preview) if rest is None else _AllOf((_Preview(spec.preview), rest))


def _compile_rest(spec: HttpFilterSpec, t: TimeoutCounter) -> Predicate | None:
    if spec.header_filter is not None:
        return _header("http_filter.header_filter", spec.header_filter, t)
    if spec.path_filter is not None:
        return _Path(_compile_regex("http_filter.path_filter", spec.path_filter, 0), t)
    if spec.method_filter is not None:
        return _compile_method("http_filter.method_filter", spec.method_filter)
    if spec.all_of is not None:
        return _AllOf(_compile_list("http_filter.all_of", spec.all_of, t))
    if spec.any_of is not None:
        return _AnyOf(_compile_list("http_filter.any_of", spec.any_of, t))
    return None


_HEADER_FLAGS = int(regex.IGNORECASE | regex.VERSION1)
_PATH_FLAGS = int(regex.VERSION1)


def patterns_of(spec: HttpFilterSpec) -> list[tuple[str, str, int]]:
    """(key, pattern, flags) of every regex `compile_filter` would compile."""
    key = "http_filter"
    if spec.header_filter is not None:
        return [(f"{key}.header_filter", spec.header_filter, _HEADER_FLAGS)]
    if spec.path_filter is not None:
        return [(f"{key}.path_filter", spec.path_filter, _PATH_FLAGS)]
    found = []
    for name in ("all_of", "any_of"):
        for i, clause in enumerate(getattr(spec, name) or ()):
            if clause.header is not None:
                found.append((f"{key}.{name}[{i}].header", clause.header, _HEADER_FLAGS))
            elif clause.path is not None:
                found.append((f"{key}.{name}[{i}].path", clause.path, _PATH_FLAGS))
    return found


def preview_key(predicate: Predicate | None) -> str | None:
    """The preview key when `predicate` is a preview filter and nothing else."""
    return predicate.key if isinstance(predicate, _Preview) else None


def literal_header(predicate: Predicate | None) -> tuple[str, str] | None:
    """(lower-case name, lower-case `name: value` line) when `predicate` is a
    header filter that matches exactly the requests carrying that line."""
    if isinstance(predicate, _Header) and predicate.name and predicate.exact is not None:
        return predicate.name, predicate.exact
    return None
