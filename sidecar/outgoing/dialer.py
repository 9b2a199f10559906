"""The pod end of a session's outgoing traffic: CONNECT (TCP or UDP) and DNS streams.

A CONNECT is resolved here (the pod's resolver, search list and all), every
address checked against the policy, the first allowed one dialed; then bytes
flow both ways with half-closes until both directions end (`splice`). Failures
travel back as RESET codes the laptop turns into the matching socket error:
REFUSED, TIMEOUT, NETWORK_UNREACHABLE, NXDOMAIN, DENIED.

The connections leave from the pod's network namespace with its address, as
the app's own do (a mesh's outbound capture applies to them alike); the
sidecar's capture chain is on PREROUTING only, so they are never captured by it.

A UDP CONNECT is resolved and checked the same way; its flow is a socket in the
pod connected to the first allowed address, datagrams going both ways (framed
on the stream, see `sidecar.tunnel.protocol.frame_datagram`) until the laptop
ends it or it has been idle for UDP_IDLE seconds.

Per session: at most MAX_CONNECTIONS open at once (UDP flows count) (more are DENIED) and new
connections at most RATE per second (more wait their turn). Each dial leaves a
line in the sidecar's log: session, destination, bytes each way, duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from sidecar.outgoing.policy import OutgoingPolicy
from sidecar.outgoing.resolver import DnsError, ResolvConf, forward_query
from sidecar.outgoing.rules import IpAddress, Protocol, Rule
from sidecar.tunnel.driver import StreamHandle
from sidecar.tunnel.protocol import (
    MAX_DATA,
    Connect,
    Connected,
    Data,
    Datagrams,
    DnsAnswer,
    DnsQuery,
    End,
    ResetCode,
    frame_datagram,
)
from sidecar.tunnel.splice import Transferred, splice

__all__ = ["CONNECT_TIMEOUT", "MAX_CONNECTIONS", "RATE", "OutgoingService"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
MAX_CONNECTIONS = 512
"""Outgoing connections one session may hold open at once."""
RATE = 500.0
"""New outgoing connections per second one session may open (a burst of as many)."""
MAX_DNS_IN_FLIGHT = 64


class _Refusal(Exception):
    def __init__(self, code: ResetCode, message: str):
        self.code = code
        super().__init__(message)


@dataclass
class OutgoingService:
    """Serves one session's outgoing streams (`on_stream` is the tunnel's callback)."""

    who: str
    policy: OutgoingPolicy
    resolv: ResolvConf
    named: tuple[Rule, ...]
    tcp: bool
    dns: bool
    udp: bool = False
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _open: int = 0
    _dns_in_flight: int = 0
    _tokens: float = RATE
    _refilled: float = field(default_factory=time.monotonic)
    connections: int = 0

    def on_stream(self, event: Connect | DnsQuery, handle: StreamHandle) -> None:
        if isinstance(event, Connect):
            task = asyncio.create_task(self._connect(event, handle))
        else:
            task = asyncio.create_task(self._dns(event, handle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _dns(self, query: DnsQuery, handle: StreamHandle) -> None:
        if not self.dns:
            handle.reset(ResetCode.DENIED, "DNS through the pod is off for this session")
            return
        if self._dns_in_flight >= MAX_DNS_IN_FLIGHT:
            handle.reset(ResetCode.DENIED, f"more than {MAX_DNS_IN_FLIGHT} DNS queries at once")
            return
        self._dns_in_flight += 1
        try:
            answer = await forward_query(query.message, self.resolv.nameservers)
        except DnsError as e:
            handle.reset(ResetCode.TIMEOUT, str(e))
            return
        finally:
            self._dns_in_flight -= 1
        try:
            handle.send(DnsAnswer(handle.id, answer))
        except ValueError as e:  # an answer shorter than a DNS header
            handle.reset(ResetCode.INTERNAL, f"the nameserver's answer is malformed: {e}")

    async def _connect(self, connect: Connect, handle: StreamHandle) -> None:
        started = time.monotonic()
        where = f"{connect.host}:{connect.port}"
        self._open += 1
        try:
            try:
                if connect.protocol == "udp":
                    flow, address = await self._udp_flow(connect, handle)
                else:
                    reader, writer, address = await self._dial(connect)
            except _Refusal as e:
                handle.reset(e.code, str(e))
                log.info("%s: %s to %s refused: %s", self.who, connect.protocol, where, e)
                return
            self.connections += 1
            # A client that sent bytes before our answer is not waiting for it: then
            # CONNECTED goes with the next message of this tunnel (often the
            # destination's first bytes), one websocket message fewer each way.
            handle.send(Connected(handle.id, address), flush=not handle.has_pending)
            why: str | None
            if connect.protocol == "udp":
                why = await flow.run()
                carried = (
                    f"{flow.out} datagrams out ({flow.bytes_out} bytes), {flow.into} in "
                    f"({flow.bytes_in} bytes), {flow.dropped} dropped"
                )
            else:
                counts = Transferred()
                try:
                    why = await splice(handle, reader, writer, counts=counts)
                finally:
                    writer.close()
                carried = f"{counts.to_socket} bytes out, {counts.to_tunnel} in"
            log.info(
                "%s: %s to %s (%s): %s, %.1f s%s",
                self.who, connect.protocol, where, address, carried,
                time.monotonic() - started, f" ({why})" if why else "",
            )  # fmt: skip
        finally:
            self._open -= 1

    async def _udp_flow(self, connect: Connect, handle: StreamHandle) -> tuple[_UdpFlow, str]:
        address = (await self._allowed(connect, Protocol.UDP))[0]
        loop = asyncio.get_running_loop()
        try:
            _, flow = await loop.create_datagram_endpoint(
                lambda: _UdpFlow(handle), remote_addr=(str(address), connect.port)
            )
        except OSError as e:
            raise _network_refusal(e, _where(address, connect.port)) from e
        return flow, _where(address, connect.port)

    async def _allowed(self, connect: Connect, protocol: Protocol) -> list[IpAddress]:
        """The addresses of the CONNECT's host that the policy allows, in order: at
        least one, else _Refusal (also when the session may not open more)."""
        if not (self.tcp if protocol is Protocol.TCP else self.udp):
            raise _Refusal(
                ResetCode.DENIED,
                f"outgoing {protocol.value.upper()} through the pod is off for this session",
            )
        if self._open > MAX_CONNECTIONS:
            raise _Refusal(
                ResetCode.DENIED, f"this session already has {MAX_CONNECTIONS} outgoing connections"
            )
        await self._take_token()
        name, addresses = await _resolve(connect.host, connect.port)
        reasons = [
            self.policy.check(protocol, a, connect.port, name, self.named) for a in addresses
        ]
        allowed = [a for a, reason in zip(addresses, reasons, strict=True) if reason is None]
        if not allowed:
            raise _Refusal(ResetCode.DENIED, next(r for r in reasons if r))
        return allowed

    async def _dial(
        self, connect: Connect
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        problem: _Refusal | None = None
        for address in await self._allowed(connect, Protocol.TCP):
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    reader, writer = await _open(address, connect.port)
            except TimeoutError:
                problem = _Refusal(
                    ResetCode.TIMEOUT,
                    f"{_where(address, connect.port)} did not answer within {CONNECT_TIMEOUT:g} s",
                )
            except ConnectionRefusedError:
                problem = _Refusal(ResetCode.REFUSED, f"{_where(address, connect.port)} refused")
            except OSError as e:
                problem = _network_refusal(e, _where(address, connect.port))
            else:
                return reader, writer, _where(address, connect.port)
        assert problem is not None
        raise problem

    async def _take_token(self) -> None:
        now = time.monotonic()
        self._tokens = min(RATE, self._tokens + (now - self._refilled) * RATE)
        self._refilled = now
        self._tokens -= 1
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / RATE)


UDP_IDLE = 60.0
"""Seconds a UDP flow lasts without a datagram either way."""


class _UdpFlow(asyncio.DatagramProtocol):
    """One UDP flow's socket in the pod (connected to its destination) and its
    tunnel stream. A datagram the tunnel has no window for is dropped, as a full
    network would: UDP promises no delivery, and nothing may pile up here."""

    def __init__(self, handle: StreamHandle):
        self.handle = handle
        self.transport: asyncio.DatagramTransport | None = None
        self.out = self.into = self.bytes_out = self.bytes_in = self.dropped = 0
        self.last = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.last = time.monotonic()
        framed = frame_datagram(data)
        if not self.handle.active or self.handle.tunnel.conn.send_window(self.handle.id) < len(
            framed
        ):
            self.dropped += 1
            return
        for i in range(0, len(framed), MAX_DATA):
            self.handle.send(Data(self.handle.id, framed[i : i + MAX_DATA]))
        self.into += 1
        self.bytes_in += len(data)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier datagram (port unreachable, say): the
        # destination's answer to it, as a direct socket would see and ignore it.
        log.debug("udp flow: %s", exc)

    async def run(self) -> str:
        """Datagrams from the tunnel to the destination until the stream ends or
        the flow idles; says why it ended."""
        assert self.transport is not None
        datagrams = Datagrams()
        try:
            while True:
                wait = UDP_IDLE - (time.monotonic() - self.last)
                try:
                    event = await asyncio.wait_for(self.handle.next(), max(wait, 0.01))
                except TimeoutError:
                    if time.monotonic() - self.last < UDP_IDLE:
                        continue
                    self.handle.send(End(self.handle.id))
                    return f"idle for {UDP_IDLE:g} s"
                if isinstance(event, Data):
                    self.last = time.monotonic()
                    for datagram in datagrams.feed(event.data):
                        self.transport.sendto(datagram)
                        self.out += 1
                        self.bytes_out += len(datagram)
                    self.handle.ack(len(event.data))
                elif isinstance(event, End):
                    if self.handle.active:
                        self.handle.send(End(self.handle.id))
                    return "ended by the laptop"
                else:
                    return f"the stream broke: {event!r}"
        finally:
            self.transport.close()


async def _open(address: IpAddress, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to `address`:`port`, as a stream pair. To a destination on
    this host (or a pod beside it) the handshake is often complete when connect()
    returns: then the connection is used at once, not after a turn of the event
    loop that waits to see it writable."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            sock.connect((str(address), port))
        except BlockingIOError:
            try:
                sock.getpeername()  # connected already?
            except OSError:
                await asyncio.get_running_loop().sock_connect(sock, (str(address), port))
        return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


def _network_refusal(error: OSError, where: str) -> _Refusal:
    code = (
        ResetCode.NETWORK_UNREACHABLE
        if error.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)
        else ResetCode.INTERNAL
    )
    return _Refusal(code, f"{where}: {error.strerror or error}")


def _where(address: IpAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


async def _resolve(host: str, port: int) -> tuple[str | None, list[IpAddress]]:
    """(the name, if a name was given; its addresses, in the order glibc sorts them)."""
    try:
        return None, [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise _Refusal(ResetCode.NXDOMAIN, f"{host} does not resolve in the pod") from e
        raise _Refusal(ResetCode.TIMEOUT, f"{host}: the pod's resolver failed: {e}") from e
    addresses: list[IpAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return host, addresses
