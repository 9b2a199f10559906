"""Answers the local process's DNS queries: through the pod, or on the laptop.

A query whose name the filter sends to the pod travels as it came (one DNS_QUERY
stream) and the pod's nameservers' answer comes back as it is. One for a name
marked local is answered from the laptop's resolver (getaddrinfo, so
/etc/hosts counts), and one while DNS through the pod is off from the laptop's
nameservers. Every A/AAAA answer teaches the name book which name the process
asked for, so that its connections can be filtered by name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from local_proxy.outgoing.filter import NameBook, OutgoingFilter, Route
from sidecar.outgoing.resolver import DnsError, ResolvConf, forward_query
from sidecar.outgoing.rules import IpAddress
from sidecar.tunnel.driver import Lost, Tunnel
from sidecar.tunnel.protocol import DnsAnswer, DnsQuery, Reset

__all__ = ["DnsHandler", "TunnelSource"]

log = logging.getLogger(__name__)

TunnelSource = Callable[[], Awaitable[Tunnel | None]]
"""A tunnel that is open now (waiting a while for one), or None."""
LOCAL_TTL = 5


class DnsHandler:
    def __init__(
        self,
        outgoing: OutgoingFilter,
        names: NameBook,
        tunnel: TunnelSource,
        laptop_resolv: ResolvConf,
    ):
        self.filter = outgoing
        self.names = names
        self._tunnel = tunnel
        self._laptop = laptop_resolv
        self.remote = self.local = self.failed = 0

    async def answer(self, wire: bytes) -> bytes | None:
        """The answer to send back, or None to stay silent (the client retries)."""
        try:
            query = dns.message.from_wire(wire)
            question = query.question[0]
        except (dns.exception.DNSException, IndexError):
            return None  # not a DNS query: no answer, as a server would drop it
        name = question.name.to_text(omit_final_dot=True)
        route = self.filter.dns_route(name)
        try:
            if route is Route.REMOTE:
                answer = await self._through_pod(wire)
                self.remote += 1
            elif self.filter.dns:
                answer = await self._from_laptop(query, name, question.rdtype)
                self.local += 1
            else:
                answer = await forward_query(wire, self._laptop.nameservers)
                self.local += 1
        except (DnsError, OSError) as e:
            self.failed += 1
            log.info("DNS %s: %s", name, e)
            return _servfail(query)
        self._learn(answer, name)
        return answer

    async def _through_pod(self, wire: bytes) -> bytes:
        tunnel = await self._tunnel()
        if tunnel is None:
            raise DnsError("no tunnel to the pod is open")
        handle = tunnel.open_stream(lambda sid: DnsQuery(sid, wire))
        if handle is None:
            raise DnsError("the session is ending")
        event = await handle.next()
        if isinstance(event, DnsAnswer):
            return event.message
        if isinstance(event, Reset | Lost):
            raise DnsError(f"the pod did not answer: {getattr(event, 'message', '')}"
                           f"{getattr(event, 'reason', '')}")  # fmt: skip
        raise DnsError(f"unexpected {type(event).__name__} on a DNS stream")

    async def _from_laptop(
        self, query: dns.message.Message, name: str, rdtype: dns.rdatatype.RdataType
    ) -> bytes:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        family = {dns.rdatatype.A: socket.AF_INET, dns.rdatatype.AAAA: socket.AF_INET6}
        if rdtype in family:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(name, None, family=family[rdtype],
                                               type=socket.SOCK_STREAM)  # fmt: skip
            except socket.gaierror as e:
                if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                    return response.to_wire()
                raise DnsError(f"the laptop's resolver failed for {name}: {e}") from e
            addresses = sorted({str(info[4][0]) for info in infos})
            if addresses:
                response.answer.append(
                    dns.rrset.from_text_list(query.question[0].name, LOCAL_TTL, "IN",
                                             dns.rdatatype.to_text(rdtype), addresses)
                )  # fmt: skip
        return response.to_wire()

    def _learn(self, wire: bytes, name: str) -> None:
        try:
            answer = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return
        addresses: list[IpAddress] = []
        for rrset in answer.answer:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                addresses += [ipaddress.ip_address(r.address) for r in rrset]
        if addresses:
            self.names.learn(name, addresses)


def _servfail(query: dns.message.Message) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(dns.rcode.SERVFAIL)
    return response.to_wire()
