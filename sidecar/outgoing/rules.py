"""Destinations as mirrord's outgoing filter writes them, parsed once, matched often.

    [tcp://|udp://][NAME | ADDRESS | SUBNET/MASK][:PORT]

`app-db`, `app-db:5432`, `10.0.0.0/8`, `:8888`, `tcp://[::1]:6379`, `udp://:53`.
An empty host matches every host; no port matches every port; no protocol
matches both.

A NAME matches the host name itself and the longer names that begin with it
followed by a dot: `app-db` matches `app-db` and `app-db.shop.svc.cluster.local`
but not `my-app-db` (mirrord matches any substring; one dev's `db` would then
also catch `mongodb-admin`). Names compare case-insensitively, without a
trailing dot. An ADDRESS or SUBNET matches the addresses a connection goes to;
a NAME matches only when the name the connection was made for is known (it was
asked for by name, or resolved by the local process's DNS through offramp).

Used on both sides: the laptop's outgoing filter (`local` / `remote`) and the
sidecar's policy (what a session named explicitly, the admin's allow-list).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum

import regex

__all__ = ["Protocol", "Rule", "RuleError", "match_any", "parse_rule", "parse_rules"]

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LABEL = r"[a-z0-9_][a-z0-9_-]{0,62}"
_NAME = regex.compile(rf"(?i)^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


class RuleError(ValueError):
    """A destination that cannot be read; the message shows the syntax."""


class Protocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True, slots=True)
class Rule:
    text: str
    protocol: Protocol | None = None
    name: str | None = None
    network: IpNetwork | None = None
    port: int | None = None

    def matches(
        self, protocol: Protocol, port: int, address: IpAddress | None, name: str | None
    ) -> bool:
        if self.protocol is not None and self.protocol is not protocol:
            return False
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return address is not None and address in self.network
        if self.name is not None:
            if name is None:
                return False
            name = name.rstrip(".").lower()
            return name == self.name or name.startswith(self.name + ".")
        return True

    @property
    def names_host(self) -> bool:
        """Whether it names a host (a name, an address or a subnet), not only a port."""
        return self.name is not None or self.network is not None


def _fail(text: str, why: str) -> RuleError:
    return RuleError(
        f"outgoing filter entry {text!r}: {why}; write [tcp://|udp://][NAME|ADDRESS|"
        "SUBNET/MASK][:PORT], e.g. app-db, app-db:5432, 10.0.0.0/8, :8888 or udp://:53"
    )


def parse_rule(text: str) -> Rule:
    rest = text.strip()
    if not rest:
        raise _fail(text, "it is empty")
    protocol = None
    scheme, sep, after = rest.partition("://")
    if sep:
        try:
            protocol = Protocol(scheme.lower())
        except ValueError:
            raise _fail(text, f"{scheme!r} is no protocol (tcp or udp)") from None
        rest = after
    port: int | None = None
    host = rest
    if rest.startswith("["):  # [IPv6]:port or [IPv6/mask]
        close = rest.find("]")
        if close < 0:
            raise _fail(text, "an IPv6 address opened with [ is not closed with ]")
        host, tail = rest[1:close], rest[close + 1 :]
        if tail:
            if not tail.startswith(":"):
                raise _fail(text, f"{tail!r} after the address")
            port = _port(text, tail[1:])
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
        port = _port(text, port_text)
    elif rest.count(":") > 1 and "/" not in rest:
        try:  # a bare IPv6 address, without a port
            ipaddress.ip_address(rest)
        except ValueError:
            raise _fail(text, "write an IPv6 address with a port as [ADDRESS]:PORT") from None
    if not host:
        if port is None:
            raise _fail(text, "it names neither a host nor a port")
        return Rule(text, protocol, port=port)
    try:
        network = ipaddress.ip_network(host, strict=False)
        return Rule(text, protocol, network=network, port=port)
    except ValueError:
        pass
    if "/" in host:
        raise _fail(text, f"{host!r} is not a subnet")
    name = host.rstrip(".").lower()
    if not _NAME.match(name):
        raise _fail(text, f"{host!r} is neither an address nor a host name")
    return Rule(text, protocol, name=name, port=port)


def _port(text: str, port_text: str) -> int:
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _fail(text, f"{port_text!r} is not a port (1-65535)")
    return int(port_text)


def parse_rules(texts: tuple[str, ...] | list[str]) -> tuple[Rule, ...]:
    return tuple(parse_rule(t) for t in texts)


def match_any(
    rules: tuple[Rule, ...],
    protocol: Protocol,
    port: int,
    address: IpAddress | None,
    name: str | None,
) -> Rule | None:
    """The first rule that matches, or None."""
    for rule in rules:
        if rule.matches(protocol, port, address, name):
            return rule
    return None
