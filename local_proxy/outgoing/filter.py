"""mirrord's outgoing filter: which destinations leave from the laptop, which from the pod.

    feature.network.outgoing: {tcp, udp, filter: {local: [...]} | {remote: [...]}}

With a `local` list, what it matches leaves from the laptop and the rest from
the pod; with a `remote` list, the other way round; with neither, everything
leaves from the pod. Only one of the two may be given (as in mirrord). Entries
are `sidecar.outgoing.rules` (a name matches itself and its dotted suffixes).

DNS: a query goes to the pod unless DNS is off or its name matches a `local`
entry that names a host by name; then the laptop's resolver answers it.

The local process's own loopback is its own (it runs in a namespace of its
own): a connection to 127.0.0.1 stays inside, except to the ports of `local`
entries that name no host or a loopback one (`:8888`, `localhost:5432`), which
reach the laptop's loopback, and of `remote` entries that name a loopback
address (`127.0.0.1:9901`), which reach the pod's.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum

from sidecar.outgoing.rules import IpAddress, Protocol, Rule, RuleError, match_any, parse_rules

__all__ = ["NameBook", "OutgoingFilter", "Route"]

_LOOPBACK = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


class Route(StrEnum):
    LOCAL = "local"
    REMOTE = "remote"


@dataclass(frozen=True)
class OutgoingFilter:
    local: tuple[Rule, ...] = ()
    remote: tuple[Rule, ...] = ()
    tcp: bool = True
    """TCP through the pod at all (mirrord's `outgoing.tcp`); off: every connection is local."""
    dns: bool = True
    """DNS through the pod at all (mirrord's `feature.network.dns`)."""
    udp: bool = True
    """UDP other than DNS through the pod at all (mirrord's `outgoing.udp`)."""

    @classmethod
    def build(
        cls,
        local: list[str],
        remote: list[str],
        *,
        tcp: bool = True,
        dns: bool = True,
        udp: bool = True,
    ) -> OutgoingFilter:
        if local and remote:
            raise RuleError(
                "the outgoing filter takes either local or remote entries, not both (as "
                "mirrord's): list what leaves from the laptop (--local) or what leaves from "
                "the pod (--remote)"
            )
        return cls(parse_rules(local), parse_rules(remote), tcp, dns, udp)

    @property
    def enabled(self) -> bool:
        return self.tcp or self.dns or self.udp

    def route(
        self,
        port: int,
        address: IpAddress | None,
        name: str | None,
        protocol: Protocol = Protocol.TCP,
    ) -> Route:
        """Where a TCP connection (or UDP flow) to `address`:`port` (asked for as
        `name`) leaves from."""
        if not (self.tcp if protocol is Protocol.TCP else self.udp):
            return Route.LOCAL
        if self.local:
            hit = match_any(self.local, protocol, port, address, name)
            return Route.LOCAL if hit else Route.REMOTE
        if self.remote:
            hit = match_any(self.remote, protocol, port, address, name)
            return Route.REMOTE if hit else Route.LOCAL
        if address is not None and address.is_loopback:
            return Route.LOCAL
        return Route.REMOTE

    def dns_route(self, name: str) -> Route:
        if not self.dns:
            return Route.LOCAL
        by_name = tuple(r for r in self.local if r.name is not None)
        for rule in by_name:
            if rule.matches(rule.protocol or Protocol.UDP, rule.port or 53, None, name):
                return Route.LOCAL
        return Route.REMOTE

    @property
    def loopback_ports(self) -> tuple[int, ...]:
        """Ports whose loopback connections come to offramp (then to the laptop's
        loopback, or for a `remote` entry that names loopback, the pod's)."""
        ports = set()
        for rule in self.local + self.remote:
            if rule.port is None or rule.protocol is Protocol.UDP:
                continue
            loopback = rule.name == "localhost" or (
                rule.network is not None and any(a in rule.network for a in _LOOPBACK)
            )
            if loopback or (not rule.names_host and rule in self.local):
                ports.add(rule.port)
        return tuple(sorted(ports))

    @property
    def named(self) -> tuple[str, ...]:
        """What the developer named for the pod: the sidecar's guards let these through."""
        return tuple(r.text for r in self.remote if r.names_host)


class NameBook:
    """Which name the local process resolved to which address (the latest, bounded),
    so that a connection to an address can be filtered by name."""

    def __init__(self, size: int = 4096):
        self._size = size
        self._names: OrderedDict[IpAddress, str] = OrderedDict()

    def learn(self, name: str, addresses: list[IpAddress]) -> None:
        for address in addresses:
            self._names[address] = name.rstrip(".").lower()
            self._names.move_to_end(address)
        while len(self._names) > self._size:
            self._names.popitem(last=False)

    def name_of(self, address: IpAddress) -> str | None:
        return self._names.get(address)
