"""Whether two steal sessions could want the same request: the rules that keep one
developer's session from silently eating another's requests.

Telepresence's rules for personal intercepts are the floor:
- mirror sessions never conflict (each gets its copy), nor sessions on no common
  port, nor sessions that take no requests (outgoing only);
- a session without a filter takes everything: it conflicts with every other;
- equal preview keys conflict; different ones never do;
- literal header filters (`^x-preview: alice$`) conflict when one session's
  header names are a subset of the other's and the values of the names they
  share are equal (a request carrying both sets of headers goes to the first);
  different values for a shared name never overlap;
- literal methods that differ never overlap;
- anything else (a regex, a path, any_of) *may* overlap: offramp cannot tell,
  so it says so and the developer decides (`--force`).

Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from sidecar.sessions.spec import FilterClause, Mode, SessionSpec

__all__ = ["ENDED_BY", "TAKEN_OVER", "Overlap", "Verdict", "overlap"]

TAKEN_OVER = "taken over by"
"""How the GOODBYE of a session that another took over with --force begins."""
ENDED_BY = "ended by"
"""How the GOODBYE of a session that someone ended (`offramp sessions --end`) begins."""

_LITERAL = re.compile(r"\^([A-Za-z0-9_-]+): ([A-Za-z0-9_ =,;/@%~.-]*)\$")


class Verdict(StrEnum):
    NONE = "none"
    CERTAIN = "certain"
    POSSIBLE = "possible"


@dataclass(frozen=True)
class Overlap:
    verdict: Verdict
    why: str


@dataclass(frozen=True)
class _Shape:
    """What a filter requires, as far as it can be read exactly."""

    headers: dict[str, str]
    """Lower-case header name -> lower-case literal value."""
    methods: frozenset[str]
    """The method it requires, if literal (at most one in a conjunction)."""
    opaque: bool
    """Something else constrains it (a regex, a path, any_of)."""
    empty: bool


def _shape(spec: SessionSpec) -> _Shape:
    f = spec.http_filter
    clauses: list[FilterClause] = []
    opaque = f.any_of is not None
    if f.header_filter is not None:
        clauses.append(FilterClause(header=f.header_filter))
    if f.path_filter is not None:
        clauses.append(FilterClause(path=f.path_filter))
    if f.method_filter is not None:
        clauses.append(FilterClause(method=f.method_filter))
    clauses += list(f.all_of or ())
    headers: dict[str, str] = {}
    methods: set[str] = set()
    if f.preview is not None:
        headers["\0preview"] = f.preview  # a name no header has
    for clause in clauses:
        if clause.header is not None:
            literal = _LITERAL.fullmatch(clause.header)
            if literal is None:
                opaque = True
                continue
            name, value = literal[1].lower(), literal[2].lower()
            if headers.get(name, value) != value:
                # Two values for one name in a conjunction: a request with both
                # lines could match; keep it honest and call it opaque.
                opaque = True
            headers[name] = value
        elif clause.method is not None:
            methods.add(clause.method.strip().upper())
        else:
            opaque = True
    return _Shape(headers, frozenset(methods), opaque, f.is_empty)


def overlap(
    a: SessionSpec, b: SessionSpec, ports_a: tuple[int, ...], ports_b: tuple[int, ...]
) -> Overlap:
    """Whether sessions `a` and `b` (covering those app ports) could take the same request."""
    if Mode.MIRROR in (a.mode, b.mode) or not (a.incoming and b.incoming):
        return Overlap(Verdict.NONE, "a mirror or outgoing-only session takes nothing away")
    if not set(ports_a) & set(ports_b):
        return Overlap(Verdict.NONE, "no port in common")
    sa, sb = _shape(a), _shape(b)
    if sa.empty or sb.empty:
        return Overlap(Verdict.CERTAIN, "a session without a filter takes every request")
    pa, pb = a.http_filter.preview, b.http_filter.preview
    if pa is not None and pb is not None and pa != pb:
        return Overlap(Verdict.NONE, "different preview keys")
    shared = set(sa.headers) & set(sb.headers)
    differs = sorted(n for n in shared if sa.headers[n] != sb.headers[n])
    if differs:
        return Overlap(Verdict.NONE, f"different values of {differs[0]}")
    if len(sa.methods) == 1 and len(sb.methods) == 1 and sa.methods != sb.methods:
        return Overlap(Verdict.NONE, "different methods")
    if sa.opaque or sb.opaque:
        return Overlap(Verdict.POSSIBLE, "their filters may match the same requests (offramp "
                       "cannot compare regexes, paths or any_of)")  # fmt: skip
    if pa is not None and pa == pb:
        return Overlap(Verdict.CERTAIN, f"the same preview key {pa}")
    names_a, names_b = set(sa.headers), set(sb.headers)
    if names_a <= names_b or names_b <= names_a:
        named = ", ".join(sorted(n for n in shared if not n.startswith("\0")))
        what = f"a request with {named} as both ask" if named else "a request"
        return Overlap(Verdict.CERTAIN, f"{what} can match both filters")
    return Overlap(Verdict.NONE, "neither asks for a subset of the other's headers")
