"""A stand-in for the cluster's network, run inside the test's "cluster" namespace.

    python -m tests.outgoing_cluster DNS_IP SERVICE_IP [SERVICE_IP6]

- kube-dns on DNS_IP:53, UDP and TCP: `payment-service.default.svc.cluster.local`
  is SERVICE_IP, `big.default.svc.cluster.local` too but over UDP only as a
  truncated answer (TC, no records: the asker must retry over TCP), every other
  name NXDOMAIN (like a cluster resolver asked for a name outside the cluster).
- payment-service on SERVICE_IP: 8080 answers HTTP with the caller's address;
  7000 reads to end of file, then answers with the byte count and SHA-256 and
  closes (a half-close test); 7001 reads a byte count line and sends that many
  bytes of `tests.support.pattern_bytes`.

Prints "ready" once everything listens.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys

import dns.flags
import dns.message
import dns.rcode
import dns.rrset

from tests.support import pattern_bytes

SERVICE = "payment-service.default.svc.cluster.local."
BIG = "big.default.svc.cluster.local."
DUAL = "dual.default.svc.cluster.local."


def answer(wire: bytes, service_ip: str, *, tcp: bool, service_ip6: str = "") -> bytes:
    query = dns.message.from_wire(wire)
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    name = query.question[0].name.to_text().lower()
    rdtype = query.question[0].rdtype
    if name == BIG and not tcp:
        response.flags |= dns.flags.TC
    elif name in (SERVICE, BIG) or (name == DUAL and service_ip6):
        if rdtype == dns.rdatatype.A:
            response.answer.append(
                dns.rrset.from_text(query.question[0].name, 30, "IN", "A", service_ip)
            )
        elif rdtype == dns.rdatatype.AAAA and name == DUAL:
            response.answer.append(
                dns.rrset.from_text(query.question[0].name, 30, "IN", "AAAA", service_ip6)
            )
    else:
        response.set_rcode(dns.rcode.NXDOMAIN)
    return response.to_wire()


class Udp(asyncio.DatagramProtocol):
    def __init__(self, service_ip: str, service_ip6: str):
        self.service_ip, self.service_ip6 = service_ip, service_ip6

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = answer(data, self.service_ip, tcp=False, service_ip6=self.service_ip6)
        self.transport.sendto(reply, addr)  # type: ignore[attr-defined]


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, port: int):
        self.port = port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = f"udp {self.port}: you are {addr[0]}: ".encode() + data
        self.transport.sendto(reply, addr)  # type: ignore[attr-defined]


async def main(dns_ip: str, service_ip: str, service_ip6: str = "") -> None:
    loop = asyncio.get_running_loop()
    for address in (service_ip, service_ip6) if service_ip6 else (service_ip,):
        for port in (7002, 7003):
            await loop.create_datagram_endpoint(
                lambda p=port: UdpEcho(p), local_addr=(address, port)
            )
    await loop.create_datagram_endpoint(
        lambda: Udp(service_ip, service_ip6), local_addr=(dns_ip, 53)
    )

    async def dns_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int.from_bytes(await reader.readexactly(2), "big")
        query = await reader.readexactly(size)
        reply = answer(query, service_ip, tcp=True, service_ip6=service_ip6)
        writer.write(len(reply).to_bytes(2, "big") + reply)
        await writer.drain()
        writer.close()

    async def whoami(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = f"payment-service; you are {writer.get_extra_info('peername')[0]}\n".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % len(body) + body)  # fmt: skip
        await writer.drain()
        writer.close()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest, count = hashlib.sha256(), 0
        while data := await reader.read(1 << 16):
            digest.update(data)
            count += len(data)
        writer.write(f"got {count} bytes sha256 {digest.hexdigest()}\n".encode())
        await writer.drain()
        writer.close()

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count = int(await reader.readline())
        for chunk in pattern_bytes(count):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    servers = [
        await asyncio.start_server(dns_tcp, dns_ip, 53),
        await asyncio.start_server(whoami, service_ip, 8080),
        await asyncio.start_server(sink, service_ip, 7000),
        await asyncio.start_server(source, service_ip, 7001),
    ]
    if service_ip6:
        servers.append(await asyncio.start_server(whoami, service_ip6, 8080))
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
