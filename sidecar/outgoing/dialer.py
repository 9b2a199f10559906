"""The pod end of a session's outgoing traffic: CONNECT and DNS streams.

A CONNECT is resolved here (the pod's resolver, search list and all), every
address checked against the policy, the first allowed one dialed; then bytes
flow both ways with half-closes until both directions end (`splice`). Failures
travel back as RESET codes the laptop turns into the matching socket error:
REFUSED, TIMEOUT, NETWORK_UNREACHABLE, NXDOMAIN, DENIED.

The connections leave from the pod's network namespace with its address, as
the app's own do (a mesh's outbound capture applies to them alike); the
sidecar's capture chain is on PREROUTING only, so they are never captured by it.

Per session: at most MAX_CONNECTIONS open at once (more are DENIED) and new
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

from sidecar.outgoing.policy import OutgoingPolicy
from sidecar.outgoing.resolver import DnsError, ResolvConf, forward_query
from sidecar.outgoing.rules import IpAddress, Protocol, Rule
from sidecar.tunnel.driver import StreamHandle
from sidecar.tunnel.protocol import Connect, Connected, DnsAnswer, DnsQuery, ResetCode
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
        counts = Transferred()
        self._open += 1
        try:
            try:
                reader, writer, address = await self._dial(connect)
            except _Refusal as e:
                handle.reset(e.code, str(e))
                log.info("%s: tcp to %s refused: %s", self.who, where, e)
                return
            self.connections += 1
            handle.send(Connected(handle.id, address))
            try:
                broke = await splice(handle, reader, writer, counts=counts)
            finally:
                writer.close()
            log.info(
                "%s: tcp to %s (%s): %d bytes out, %d in, %.1f s%s",
                self.who, where, address, counts.to_socket, counts.to_tunnel,
                time.monotonic() - started, f" ({broke})" if broke else "",
            )  # fmt: skip
        finally:
            self._open -= 1

    async def _dial(
        self, connect: Connect
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        if not self.tcp:
            raise _Refusal(ResetCode.DENIED, "outgoing TCP through the pod is off for this session")
        if self._open > MAX_CONNECTIONS:
            raise _Refusal(
                ResetCode.DENIED, f"this session already has {MAX_CONNECTIONS} outgoing connections"
            )
        await self._take_token()
        name, addresses = await _resolve(connect.host, connect.port)
        allowed: list[IpAddress] = []
        first_reason = ""
        for address in addresses:
            reason = self.policy.check(Protocol.TCP, address, connect.port, name, self.named)
            if reason is None:
                allowed.append(address)
            elif not first_reason:
                first_reason = reason
        if not allowed:
            raise _Refusal(ResetCode.DENIED, first_reason)
        problem: _Refusal | None = None
        for address in allowed:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    reader, writer = await asyncio.open_connection(str(address), connect.port)
            except TimeoutError:
                problem = _Refusal(
                    ResetCode.TIMEOUT,
                    f"{_where(address, connect.port)} did not answer within {CONNECT_TIMEOUT:g} s",
                )
            except ConnectionRefusedError:
                problem = _Refusal(ResetCode.REFUSED, f"{_where(address, connect.port)} refused")
            except OSError as e:
                code = (
                    ResetCode.NETWORK_UNREACHABLE
                    if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)
                    else ResetCode.INTERNAL
                )
                problem = _Refusal(code, f"{_where(address, connect.port)}: {e.strerror or e}")
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
