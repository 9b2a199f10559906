"""The local process's UDP other than DNS: each flow through the pod, or from here.

In the namespace (`netns`), a UDP datagram to anything but loopback and port 53
is redirected to one of a few sockets of offramp's (a port range, so that one
socket of the process may talk to several destinations at once: the kernel
picks a free port of the range for each). The kernel's connection tracking
remembers where each flow was going; offramp asks it over ctnetlink, with a
netlink socket made in the namespace (`original_destination`). A flow is the
process's address and port and its destination:

- through the pod (a CONNECT with protocol "udp", resolved and checked there by
  name if the process learnt the address from the pod's DNS), or from here (a
  socket of offramp's connected to the destination), as the outgoing filter's
  `udp://` entries (or entries without a protocol) say;
- the answers are sent from the socket the flow's datagrams arrived on, and the
  connection tracking gives them the destination's address as their source: to
  the process they come from where it sent to;
- a flow that has seen no datagram for IDLE seconds is closed (the pod closes
  its end after the same time). Datagrams that cannot go on at once (the flow
  is still opening, beyond QUEUE of them, or the tunnel's window is full) are
  dropped, as a full network would drop them: nothing piles up. So are those
  that would open more than MAX_FLOWS flows, and for REFUSED_FOR seconds those
  to a destination that could not be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from local_proxy.outgoing.dns import TunnelSource
from local_proxy.outgoing.filter import NameBook, OutgoingFilter, Route
from sidecar.outgoing.rules import Protocol
from sidecar.tunnel.driver import StreamHandle
from sidecar.tunnel.protocol import (
    MAX_DATA,
    Connect,
    Connected,
    Data,
    Datagrams,
    End,
    ResetCode,
    frame_datagram,
)

__all__ = ["IDLE", "UdpRelay", "original_destination"]

log = logging.getLogger(__name__)

IDLE = 60.0
"""Seconds a flow lasts without a datagram either way (as the pod's end)."""
CONNECT_TIMEOUT = 15.0
QUEUE = 64
"""Datagrams a flow keeps while it opens."""
MAX_FLOWS = 1024
"""Flows at once; datagrams that would open more are dropped."""
REFUSED_FOR = 5.0
"""Seconds datagrams to a destination that could not be reached are dropped
without asking again (the pod would refuse each of them the same way)."""
_Address = tuple[str, int]

# ctnetlink (linux/netfilter/nfnetlink_conntrack.h)
_NETLINK_NETFILTER = 12
_CT_GET = (1 << 8) | 1  # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_NLA_F_NESTED = 0x8000
_CTA_TUPLE_ORIG, _CTA_TUPLE_REPLY = 1, 2
_CTA_TUPLE_IP, _CTA_TUPLE_PROTO = 1, 2
_CTA_PROTO_NUM, _CTA_PROTO_SRC_PORT, _CTA_PROTO_DST_PORT = 1, 2, 3


def _attribute(kind: int, payload: bytes, nested: bool = False) -> bytes:
    header = struct.pack("=HH", 4 + len(payload), kind | (_NLA_F_NESTED if nested else 0))
    return header + payload + bytes(-len(payload) % 4)


def _attributes(data: bytes) -> dict[int, bytes]:
    found, at = {}, 0
    while at + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, at)
        if size < 4:
            break
        found[kind & ~_NLA_F_NESTED] = data[at + 4 : at + size]
        at += (size + 3) & ~3
    return found


def conntrack_socket() -> socket.socket:
    """A ctnetlink socket; made in the namespace, it asks that namespace's tracking."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)


def original_destination(ctnetlink: socket.socket, local: _Address, peer: _Address) -> _Address:
    """Where the UDP datagram that `peer` sent, redirected to our `local` socket, was
    going: the tracked flow whose answers go from `local` to `peer`. Raises OSError."""
    family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
    source, destination = (1, 2) if family == socket.AF_INET else (3, 4)
    ip = _attribute(source, socket.inet_pton(family, local[0])) + _attribute(
        destination, socket.inet_pton(family, peer[0])
    )
    ports = (
        _attribute(_CTA_PROTO_NUM, bytes([socket.IPPROTO_UDP]))
        + _attribute(_CTA_PROTO_SRC_PORT, struct.pack("!H", local[1]))
        + _attribute(_CTA_PROTO_DST_PORT, struct.pack("!H", peer[1]))
    )
    reply = _attribute(
        _CTA_TUPLE_REPLY,
        _attribute(_CTA_TUPLE_IP, ip, True) + _attribute(_CTA_TUPLE_PROTO, ports, True),
        True,
    )
    body = struct.pack("=BBH", family, 0, 0) + reply
    ctnetlink.send(struct.pack("=IHHII", 16 + len(body), _CT_GET, _NLM_F_REQUEST, 0, 0) + body)
    answer = ctnetlink.recv(65536)
    size, kind = struct.unpack_from("=IH", answer)
    if kind == _NLMSG_ERROR:
        code = -struct.unpack_from("=i", answer, 16)[0]
        raise OSError(code, f"connection tracking: {errno.errorcode.get(code, code)}")
    tuple_ = _attributes(_attributes(answer[20:size])[_CTA_TUPLE_ORIG])
    addresses, protocol = _attributes(tuple_[_CTA_TUPLE_IP]), _attributes(tuple_[_CTA_TUPLE_PROTO])
    address = socket.inet_ntop(family, addresses[destination])
    return address, struct.unpack("!H", protocol[_CTA_PROTO_DST_PORT])[0]


@dataclass
class _Flow:
    peer: _Address
    """The process's address and port."""
    destination: _Address
    inbound: asyncio.DatagramTransport
    """The socket the process's datagrams arrive on; answers leave from it."""
    counts: dict[str, int]
    """The relay's counters: this flow adds the datagrams it drops."""
    queue: list[bytes] = field(default_factory=list)
    stream: StreamHandle | None = None
    local: asyncio.DatagramTransport | None = None
    opened: bool = False
    last: float = field(default_factory=time.monotonic)

    def answer(self, datagram: bytes) -> None:
        self.last = time.monotonic()
        self.inbound.sendto(datagram, self.peer)

    def send(self, datagram: bytes) -> None:
        self.last = time.monotonic()
        if not self.opened:
            if len(self.queue) < QUEUE:
                self.queue.append(datagram)
            else:
                self.counts["dropped"] += 1
            return
        if self.local is not None:
            self.local.sendto(datagram)
            return
        stream = self.stream
        framed = frame_datagram(datagram)
        if (
            stream is None
            or not stream.active
            or (stream.tunnel.conn.send_window(stream.id) < len(framed))
        ):
            self.counts["dropped"] += 1
            return
        for i in range(0, len(framed), MAX_DATA):
            stream.send(Data(stream.id, framed[i : i + MAX_DATA]))

    def close(self) -> None:
        if self.stream is not None and self.stream.active:
            self.stream.send(End(self.stream.id))
        if self.local is not None:
            self.local.close()


class _Answers(asyncio.DatagramProtocol):
    """A local flow's socket here: what the destination sends goes back to the process."""

    def __init__(self, flow: _Flow):
        self.flow = flow

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.flow.answer(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp to %s: %s", self.flow.destination, exc)


class UdpRelay:
    def __init__(
        self,
        outgoing: OutgoingFilter,
        names: NameBook,
        tunnel: TunnelSource,
        ctnetlink: socket.socket,
    ):
        self.filter = outgoing
        self.names = names
        self._tunnel = tunnel
        self._ctnetlink = ctnetlink
        self._flows: dict[tuple[_Address, _Address], _Flow] = {}
        self._refused: dict[_Address, float] = {}
        """Destinations that could not be reached, and until when that holds."""
        self._transports: list[asyncio.DatagramTransport] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.flows = {"remote": 0, "local": 0, "failed": 0, "dropped": 0}
        """Flows opened each way, flows that could not open, datagrams dropped."""

    async def serve(self, sock: socket.socket) -> None:
        """Take the process's datagrams that arrive on `sock` (redirected to it)."""
        relay = self
        local: _Address = sock.getsockname()[:2]

        class Inbound(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.DatagramTransport)
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
                relay._received(self.transport, local, (str(addr[0]), int(addr[1])), data)

        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(Inbound, sock=sock)
        self._transports.append(transport)
        if len(self._transports) == 1:
            self._spawn(self._sweep())

    def _received(
        self, inbound: asyncio.DatagramTransport, local: _Address, peer: _Address, data: bytes
    ) -> None:
        key = (local, peer)
        flow = self._flows.get(key)
        if flow is None:
            try:
                destination = original_destination(self._ctnetlink, local, peer)
            except (OSError, KeyError, struct.error) as e:
                log.info("udp from %s:%d: where it was going is not known: %s", *peer, e)
                return
            if self._refused.get(destination, 0.0) > time.monotonic():
                self.flows["dropped"] += 1
                return
            if len(self._flows) >= MAX_FLOWS:
                log.info("udp to %s:%d dropped: %d flows are open", *destination, MAX_FLOWS)
                self.flows["dropped"] += 1
                return
            flow = _Flow(peer, destination, inbound, self.flows)
            self._flows[key] = flow
            self._spawn(self._open(key, flow))
        flow.send(data)

    async def _open(self, key: tuple[_Address, _Address], flow: _Flow) -> None:
        host, port = flow.destination
        address = ipaddress.ip_address(host)
        name = self.names.name_of(address)
        route = self.filter.route(port, address, name, Protocol.UDP)
        try:
            if route is Route.REMOTE:
                await self._open_remote(flow, name or host, port)
            else:
                loop = asyncio.get_running_loop()
                flow.local, _ = await loop.create_datagram_endpoint(
                    lambda: _Answers(flow), remote_addr=(host, port)
                )
        except (OSError, _Refused) as e:
            self.flows["failed"] += 1
            self.flows["dropped"] += len(flow.queue)
            log.info("udp to %s:%d: %s", host, port, e)
            self._flows.pop(key, None)
            self._refused[flow.destination] = time.monotonic() + REFUSED_FOR
            return
        self.flows[route.value] += 1
        flow.opened = True
        queued, flow.queue = flow.queue, []
        for datagram in queued:
            flow.send(datagram)
        if flow.stream is not None:
            await self._answers(key, flow, flow.stream)

    async def _open_remote(self, flow: _Flow, host: str, port: int) -> None:
        tunnel = await self._tunnel()
        stream = None
        if tunnel is not None:
            stream = tunnel.open_stream(lambda sid: Connect(sid, host, port, "udp"))
        if stream is None:
            raise _Refused("no tunnel to the pod is open")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                event = await stream.next()
        except TimeoutError:
            stream.reset(ResetCode.CANCEL, "gave up waiting")
            raise _Refused(f"the pod did not answer within {CONNECT_TIMEOUT:g} s") from None
        if not isinstance(event, Connected):
            raise _Refused(str(getattr(event, "message", event)))
        flow.stream = stream

    async def _answers(
        self, key: tuple[_Address, _Address], flow: _Flow, stream: StreamHandle
    ) -> None:
        """What the pod's end of the flow receives, back to the process."""
        datagrams = Datagrams()
        event: object = None
        try:
            while True:
                event = await stream.next()
                if not isinstance(event, Data):
                    break
                for datagram in datagrams.feed(event.data):
                    flow.answer(datagram)
                stream.ack(len(event.data))
        finally:
            if self._flows.get(key) is flow:
                del self._flows[key]
            if stream.active and not isinstance(event, End):
                stream.reset(ResetCode.CANCEL, "the flow ended")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(IDLE / 4, 5.0))
            now = time.monotonic()
            self._refused = {d: until for d, until in self._refused.items() if until > now}
            for key, flow in list(self._flows.items()):
                if now - flow.last >= IDLE and flow.opened:
                    del self._flows[key]
                    flow.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for flow in list(self._flows.values()):
            flow.close()
        self._flows.clear()
        for transport in self._transports:
            transport.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Refused(Exception):
    pass
