"""What a session may reach from the pod: the sidecar's rules, as a pure function.

A session token must not become an open proxy into the cluster's network, so:

- outgoing is off unless the session asks for it (`SessionSpec.outgoing`);
- these are refused unless the session names them explicitly (a `remote`
  entry of its outgoing filter that names the host, not only a port):
  the pod's own loopback (other containers' admin ports), link-local
  addresses (cloud metadata services live there: 169.254.169.254,
  fd00:ec2::254), Alibaba's 100.100.100.200, and the sidecar's own ports
  on any address;
- the admin's allow-list (`--outgoing-allow`, from the pod annotation
  `offramp.dev/outgoing-allow`), when set, narrows everything further: only
  destinations it matches are reached, named or not.

Names are resolved by the sidecar before the check, and the connection goes to
an address that was checked (no DNS rebinding between the two).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sidecar.outgoing.rules import IpAddress, Protocol, Rule, match_any

__all__ = ["ALLOW_ANNOTATION", "ALLOW_ENV", "GUARDED", "OutgoingPolicy"]

ALLOW_ANNOTATION = "offramp.dev/outgoing-allow"
"""The pod annotation with the admin's allow-list (comma-separated rules)."""
ALLOW_ENV = "OFFRAMP_OUTGOING_ALLOW"
"""The sidecar container's variable that injection fills from that annotation."""

GUARDED: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    (ipaddress.ip_network("127.0.0.0/8"), "the pod's own loopback"),
    (ipaddress.ip_network("::1/128"), "the pod's own loopback"),
    (ipaddress.ip_network("169.254.0.0/16"), "a link-local (cloud metadata) address"),
    (ipaddress.ip_network("fe80::/10"), "a link-local address"),
    (ipaddress.ip_network("fd00:ec2::254/128"), "a cloud metadata address"),
    (ipaddress.ip_network("100.100.100.200/32"), "a cloud metadata address"),
    (ipaddress.ip_network("0.0.0.0/8"), "the unspecified address"),
    (ipaddress.ip_network("::/128"), "the unspecified address"),
)


@dataclass(frozen=True)
class OutgoingPolicy:
    sidecar_ports: frozenset[int]
    own_addresses: frozenset[IpAddress] = frozenset()
    """The pod's addresses: the sidecar's ports are guarded on these and loopback."""
    allow: tuple[Rule, ...] | None = None
    """The admin's allow-list; None: no list, the guards alone apply."""

    def check(
        self,
        protocol: Protocol,
        address: IpAddress,
        port: int,
        name: str | None,
        named: tuple[Rule, ...],
    ) -> str | None:
        """None if the session may reach `address`:`port` (asked for as `name`,
        if by name), else why not, for the session's developer."""
        where = f"{name} ({address})" if name else str(address)
        if self.allow is not None and match_any(self.allow, protocol, port, address, name) is None:
            return (
                f"{where}:{port} is not on this pod's outgoing allow-list "
                f"({', '.join(r.text for r in self.allow) or 'empty'}); the cluster's admin sets "
                "it with the annotation offramp.dev/outgoing-allow"
            )
        explicit = [r for r in named if r.names_host]
        if match_any(tuple(explicit), protocol, port, address, name) is not None:
            return None
        if port in self.sidecar_ports and (address.is_loopback or address in self.own_addresses):
            return (
                f"{where}:{port} is a port of the offramp sidecar itself; name it in the "
                f"outgoing filter's remote list to reach it anyway (e.g. --remote {address}:{port})"
            )
        for network, what in GUARDED:
            if address.version == network.version and address in network:
                return (
                    f"{where}:{port} is {what}, which a session reaches only when it names it; "
                    f"add it to the outgoing filter's remote list (e.g. --remote {address}:{port})"
                )
        return None
