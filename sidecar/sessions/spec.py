"""The session spec: what a developer asks the sidecar to take, as it travels in the handshake.

The keys follow mirrord's `feature.network.incoming` so that a mirrord user's
config file means the same thing here:

    mode: "steal" | "mirror"
    http_filter:
      header_filter | path_filter | method_filter | all_of | any_of   (at most one)
      ports: [app ports the filter applies to]       (absent: every port the sidecar fronts)
      preview: KEY     (offramp's own: the request carries the preview key; and the above)

`all_of` and `any_of` are lists of one-key objects: `{"header": REGEX}`,
`{"path": REGEX}` or `{"method": NAME}`.

A spec is bounded: at most MAX_CLAUSES items in all_of/any_of and MAX_PATTERN
characters in any pattern (a filter is a few short patterns; these bounds keep
what a session costs the proxy small).

`force` opens the session where another user's steal session overlaps it
(`sidecar.sessions.overlap`): that one is ended, and told who took over.

`outgoing` (absent: none) asks for the local process's connections and DNS to
leave from the pod; `named` lists the destinations the developer named in the
outgoing filter's remote list, which the sidecar's guards then let through
(sidecar.outgoing.policy). `incoming: false` takes no requests at all (a session
that only sends outgoing traffic, as `offramp proxy` opens).

The spec is validated here for shape and size only; the regexes are compiled (and refused
with the offending position) by `sidecar.sessions.filters.compile_filter`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sidecar.outgoing.rules import RuleError, parse_rules
from sidecar.sessions.preview import check_key

__all__ = [
    "MAX_CLAUSES",
    "MAX_PATTERN",
    "FilterClause",
    "HttpFilterSpec",
    "Mode",
    "OutgoingSpec",
    "SessionSpec",
]

MAX_CLAUSES = 32
"""Items all_of or any_of may list."""
MAX_PATTERN = 1024
"""Characters a header or path pattern may have."""


def _check_length(key: str, pattern: str | None) -> None:
    if pattern is not None and len(pattern) > MAX_PATTERN:
        raise ValueError(
            f"{key} is {len(pattern)} characters long; a pattern may have at most "
            f"{MAX_PATTERN}. Match a shorter, distinctive part of the value"
        )


class Mode(StrEnum):
    STEAL = "steal"
    MIRROR = "mirror"


class FilterClause(BaseModel):
    """One item of `all_of` / `any_of`: exactly one of header, path, method."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    header: str | None = None
    path: str | None = None
    method: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        given = [k for k in ("header", "path", "method") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "each all_of/any_of item takes exactly one of 'header', 'path' or 'method', "
                f'got {given or "none"}; write e.g. {{"header": "^x-preview: alice$"}}'
            )
        _check_length(given[0], self.header if self.header is not None else self.path)
        return self


class HttpFilterSpec(BaseModel):
    """mirrord's `http_filter` object."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    header_filter: str | None = None
    path_filter: str | None = None
    method_filter: str | None = None
    all_of: tuple[FilterClause, ...] | None = None
    any_of: tuple[FilterClause, ...] | None = None
    ports: tuple[int, ...] | None = None
    preview: str | None = None
    """offramp's own key: take requests that carry this preview key; with another
    filter, both must match."""

    @field_validator("preview")
    @classmethod
    def _preview_key(cls, key: str | None) -> str | None:
        return None if key is None else check_key(key)

    @model_validator(mode="after")
    def _at_most_one_kind(self) -> Self:
        given = [
            k
            for k in ("header_filter", "path_filter", "method_filter", "all_of", "any_of")
            if getattr(self, k) is not None
        ]
        if len(given) > 1:
            raise ValueError(
                f"http_filter takes one of header_filter, path_filter, method_filter, all_of, "
                f"any_of, but got {', '.join(given)}; to require several, list them under "
                "all_of, e.g. all_of: [{header: ...}, {path: ...}]"
            )
        _check_length("http_filter.header_filter", self.header_filter)
        _check_length("http_filter.path_filter", self.path_filter)
        for name in ("all_of", "any_of"):
            clauses = getattr(self, name)
            if clauses is not None and len(clauses) > MAX_CLAUSES:
                raise ValueError(
                    f"http_filter.{name} lists {len(clauses)} items; at most {MAX_CLAUSES} are "
                    "allowed. Combine patterns with | (e.g. one header regex "
                    "'^x-preview: (alice|bob)$') instead of one item each"
                )
        for port in self.ports or ():
            if not 1 <= port <= 65535:
                raise ValueError(f"http_filter.ports: {port} is not a TCP port (1-65535)")
        return self

    @property
    def is_empty(self) -> bool:
        """No predicate at all: every request (on the covered ports) matches."""
        return all(
            getattr(self, k) is None
            for k in ("header_filter", "path_filter", "method_filter", "all_of", "any_of",
                      "preview")
        )  # fmt: skip


class OutgoingSpec(BaseModel):
    """What outgoing traffic the session asks the pod to carry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tcp: bool = True
    udp: bool = True
    """UDP other than DNS (mirrord's `outgoing.udp`)."""
    dns: bool = True
    named: tuple[str, ...] = Field(default=(), max_length=MAX_CLAUSES)

    @field_validator("named")
    @classmethod
    def _rules(cls, named: tuple[str, ...]) -> tuple[str, ...]:
        try:
            parse_rules(named)
        except RuleError as e:
            raise ValueError(str(e)) from None
        return named


class SessionSpec(BaseModel):
    """Everything a session asks of the sidecar. Sent in the tunnel's HELLO."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = Mode.STEAL
    http_filter: HttpFilterSpec = Field(default_factory=HttpFilterSpec)
    take_probes: bool = False
    """Steal/mirror Kubernetes probes too. Off by default: a breakpoint must never
    make kubelet restart the pod."""
    client: str = Field(default="", max_length=200)
    """Free text shown in the sidecar's log, e.g. user@host."""
    incoming: bool = True
    outgoing: OutgoingSpec | None = None
    force: bool = False
    """Take over: open even where another user's steal session overlaps this one
    (sidecar.sessions.overlap); that session is ended and told why."""

    def covers_port(self, port: int) -> bool:
        ports = self.http_filter.ports
        return self.incoming and (ports is None or port in ports)
