"""Carries one outgoing connection of the local process: from the pod, or from here.

A remote destination becomes a CONNECT stream on the tunnel (by name when the
process asked for it by name, so the pod resolves and checks it); a local one is
dialed from the laptop. Bytes then flow both ways with half-closes
(`sidecar.tunnel.splice`) until both directions end.

When the destination cannot be reached, `open` says why as a `Failure` whose
code is the tunnel's: a SOCKS or HTTP proxy client is told in its protocol's
terms; a connection the namespace already accepted is reset (the process sees
ECONNRESET where a direct connect would have seen ECONNREFUSED: the namespace's
listener had to accept before the pod could try).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass

from local_proxy.outgoing.dns import TunnelSource
from local_proxy.outgoing.filter import NameBook, OutgoingFilter, Route
from sidecar.outgoing.rules import IpAddress
from sidecar.tunnel.driver import Lost, StreamHandle
from sidecar.tunnel.protocol import Connect, Connected, Reset, ResetCode
from sidecar.tunnel.splice import Transferred, splice

__all__ = ["CONNECT_TIMEOUT", "Failure", "OutgoingRelay", "Path", "reset"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0
"""How long a connection waits for its destination (the pod's own limit is 10 s)."""


class Failure(Exception):
    def __init__(self, code: ResetCode, message: str):
        self.code = code
        super().__init__(message)


@dataclass
class Path:
    """An open way to the destination: a tunnel stream or a socket from here."""

    route: Route
    where: str
    stream: StreamHandle | None = None
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None


@dataclass
class Counters:
    remote: int = 0
    local: int = 0
    failed: int = 0


class OutgoingRelay:
    def __init__(self, outgoing: OutgoingFilter, names: NameBook, tunnel: TunnelSource):
        self.filter = outgoing
        self.names = names
        self._tunnel = tunnel
        self.counters = Counters()
        self._tasks: set[asyncio.Task[None]] = set()

    async def open(self, host: str, port: int) -> Path:
        """Open the way to `host` (a name or an address) and `port`. Raises Failure."""
        address, name = self._address_and_name(host)
        route = self.filter.route(port, address, name)
        try:
            if route is Route.REMOTE:
                path = await self._remote(name or host, port)
            else:
                path = await self._local(host, port)
        except Failure:
            self.counters.failed += 1
            raise
        if route is Route.REMOTE:
            self.counters.remote += 1
        else:
            self.counters.local += 1
        return path

    async def carry(
        self, path: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Move bytes between the process's connection and `path` until both end."""
        try:
            if path.stream is not None:
                await splice(path.stream, reader, writer)
            else:
                assert path.reader is not None and path.writer is not None
                await asyncio.gather(
                    _pipe(reader, path.writer), _pipe(path.reader, writer), return_exceptions=True
                )
        finally:
            for w in (writer, path.writer):
                if w is not None:
                    w.close()

    def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
              host: str, port: int) -> None:  # fmt: skip
        """Carry an accepted connection to `host`:`port` in a task of its own; if the
        destination cannot be reached, reset the connection."""
        task = asyncio.create_task(self._serve(reader, writer, host, port))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     host: str, port: int) -> None:  # fmt: skip
        """An accepted connection has nobody to tell why it failed but by a reset, so a
        remote one does not wait for CONNECTED: its first bytes go with the CONNECT
        (one round trip through the tunnel saved per connection)."""
        address, name = self._address_and_name(host)
        if self.filter.route(port, address, name) is Route.REMOTE:
            tunnel = await self._tunnel()
            stream = None
            if tunnel is not None:
                stream = tunnel.open_stream(lambda sid: Connect(sid, name or host, port))
            if stream is None:
                self.counters.failed += 1
                log.info("outgoing %s:%d: no tunnel to the pod is open", host, port)
                reset(writer)
                return
            counts = Transferred()
            try:
                broke = await splice(stream, reader, writer, counts=counts, reset_socket=True)
            finally:
                writer.close()
            if counts.connected is None:
                self.counters.failed += 1
                log.info("outgoing %s:%d: %s", host, port, broke)
            else:
                self.counters.remote += 1
            return
        try:
            path = await self.open(host, port)
        except Failure as e:
            log.info("outgoing %s:%d: %s", host, port, e)
            reset(writer)
            return
        await self.carry(path, reader, writer)

    def _address_and_name(self, host: str) -> tuple[IpAddress | None, str | None]:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None, host.rstrip(".").lower()
        return address, self.names.name_of(address)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _remote(self, host: str, port: int) -> Path:
        tunnel = await self._tunnel()
        if tunnel is None:
            raise Failure(ResetCode.NETWORK_UNREACHABLE, "no tunnel to the pod is open")
        stream = tunnel.open_stream(lambda sid: Connect(sid, host, port))
        if stream is None:
            raise Failure(ResetCode.NETWORK_UNREACHABLE, "the session is ending")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                event = await stream.next()
        except TimeoutError:
            stream.reset(ResetCode.CANCEL, "gave up waiting")
            raise Failure(ResetCode.TIMEOUT, f"the pod did not connect to {host}:{port} "
                          f"within {CONNECT_TIMEOUT:g} s") from None  # fmt: skip
        if isinstance(event, Connected):
            return Path(Route.REMOTE, event.address, stream=stream)
        if isinstance(event, Reset):
            raise Failure(event.code, event.message)
        if isinstance(event, Lost):
            raise Failure(ResetCode.NETWORK_UNREACHABLE, event.reason)
        stream.reset(ResetCode.INTERNAL, "unexpected answer")
        raise Failure(ResetCode.INTERNAL, f"unexpected {type(event).__name__} on a CONNECT")

    async def _local(self, host: str, port: int) -> Path:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            raise Failure(ResetCode.TIMEOUT, f"{host}:{port} did not answer") from None
        except ConnectionRefusedError:
            raise Failure(ResetCode.REFUSED, f"{host}:{port} refused (from the laptop)") from None
        except socket.gaierror as e:
            raise Failure(ResetCode.NXDOMAIN, f"{host} does not resolve on the laptop") from e
        except OSError as e:
            code = (
                ResetCode.NETWORK_UNREACHABLE
                if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)
                else ResetCode.INTERNAL
            )
            raise Failure(code, f"{host}:{port}: {e.strerror or e}") from e
        return Path(Route.LOCAL, f"{host}:{port}", reader=reader, writer=writer)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(64 * 1024):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, so the other end sees its connection refused, not ended."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
