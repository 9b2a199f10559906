"""Carries one outgoing connection of the local process: from the pod, or from here.

A remote destination becomes a CONNECT stream on the tunnel (by name when the
process asked for it by name, so the pod resolves and checks it); a local one is
dialed from the laptop. Bytes then flow both ways with half-closes
(`sidecar.tunnel.splice`) until both directions end.

When the destination cannot be reached, `open` says why as a `Failure` whose
code is the tunnel's: a SOCKS or HTTP proxy client is told in its protocol's
terms. In the namespace, the process's connect() waits for `decide` (see
`connects`), which opens the way first and fails the call with the matching
errno; the redirected connection then takes the way made ready for it. To a
destination reached in the last 30 seconds a connect goes on at
once and its first bytes travel with the CONNECT (one round trip to the pod
saved); should that one fail after all, it is reset (ECONNRESET), and the next
connect to that destination waits again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from local_proxy.outgoing.dns import TunnelSource
from local_proxy.outgoing.filter import NameBook, OutgoingFilter, Route
from sidecar.outgoing.rules import IpAddress
from sidecar.tunnel.driver import Lost, StreamHandle, Tunnel
from sidecar.tunnel.protocol import Connect, Connected, Data, Reset, ResetCode
from sidecar.tunnel.splice import Transferred, splice

__all__ = ["CONNECT_TIMEOUT", "ERRNO", "Failure", "OutgoingRelay", "Path", "reset"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0
"""How long a connection waits for its destination (the pod's own limit is 10 s)."""
READY_FOR = 10.0
"""How long a way made ready for a connect waits for the connection to arrive."""
ERRNO = {
    ResetCode.REFUSED: errno.ECONNREFUSED,
    ResetCode.NETWORK_UNREACHABLE: errno.ENETUNREACH,
    ResetCode.TIMEOUT: errno.ETIMEDOUT,
    ResetCode.DENIED: errno.EPERM,
    ResetCode.NXDOMAIN: errno.EHOSTUNREACH,
}
"""The errno a connect() fails with, per reason the pod (or the laptop) gives."""


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
    def __init__(
        self,
        outgoing: OutgoingFilter,
        names: NameBook,
        tunnel: TunnelSource,
        open_tunnel: Callable[[], Tunnel | None] = lambda: None,
    ):
        """`tunnel` waits a while for a tunnel; `open_tunnel` is the one open now."""
        self.filter = outgoing
        self.names = names
        self._tunnel = tunnel
        self._open_tunnel = open_tunnel
        self.counters = Counters()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready: dict[tuple[str, int], deque[Path]] = {}
        self._deciding: dict[tuple[str, int], list[asyncio.Future[None]]] = {}
        """Decisions in flight, per destination: a connection let go before its
        decision (a non-blocking socket held too long) waits for one here."""
        self.forget: Callable[[str, int], None] | None = None
        """Told when a connection that went on at once failed after all: the next
        connect to that destination should wait for the pod again."""

    async def decide(self, host: str, port: int) -> int:
        """For a connect() held by the namespace: open the way to `host`:`port` and
        keep it for the connection about to arrive (0), or say the errno it fails with."""
        key = (host, port)
        deciding = asyncio.get_running_loop().create_future()
        self._deciding.setdefault(key, []).append(deciding)
        try:
            path = await self.open(host, port)
        except Failure as e:
            log.info("outgoing %s:%d: %s", host, port, e)
            return ERRNO.get(e.code, errno.ECONNREFUSED)
        else:
            self._ready.setdefault(key, deque()).append(path)
            asyncio.get_running_loop().call_later(READY_FOR, self._expire, key, path)
            return 0
        finally:
            deciding.set_result(None)
            self._deciding[key].remove(deciding)
            if not self._deciding[key]:
                del self._deciding[key]

    def _expire(self, key: tuple[str, int], path: Path) -> None:
        waiting = self._ready.get(key)
        if waiting is not None and path in waiting:
            waiting.remove(path)
            _close(path)
        if not waiting:
            self._ready.pop(key, None)

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
        self,
        path: Path,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        first: bytes = b"",
    ) -> None:
        """Move bytes between the process's connection and `path` until both end.
        `first`: bytes already read from the process's connection."""
        try:
            if path.stream is not None:
                await splice(path.stream, reader, writer, first)
            else:
                assert path.reader is not None and path.writer is not None
                path.writer.write(first)
                await asyncio.gather(
                    _pipe(reader, path.writer), _pipe(path.reader, writer), return_exceptions=True
                )
        finally:
            for w in (writer, path.writer):
                if w is not None:
                    w.close()

    def serve(self, sock: socket.socket, host: str, port: int, first: bytes = b"") -> None:
        """Carry an accepted connection to `host`:`port` in a task of its own; if the
        destination cannot be reached, reset the connection. `first`: bytes the
        process had sent when it was accepted (they travel with the CONNECT).

        With no way made ready for it, a remote connection sends its CONNECT (and
        `first`) before this returns, while its socket is still being set up; a
        local one to the laptop's loopback is dialed (and sent `first`) then too."""
        stream = self._connect_now(host, port, first)
        here = None if stream is not None else self._dial_now(host, port, first)
        task = asyncio.create_task(self._serve(sock, host, port, first, stream, here))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _dial_now(self, host: str, port: int, first: bytes) -> tuple[socket.socket, int] | None:
        """For a connection to this machine's loopback that leaves from here with no
        decision pending: a socket to its destination connected in this very turn
        (on loopback the handshake is over when connect() returns), and how much of
        `first` went on it already. None: the usual way dials, and reports failures
        (a destination elsewhere never sees a second attempt)."""
        key = (host, port)
        if self._ready.get(key) or self._deciding.get(key):
            return None
        address, name = self._address_and_name(host)
        if address is None or not address.is_loopback:
            return None
        if self.filter.route(port, address, name) is not Route.LOCAL:
            return None
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            try:
                sock.connect((host, port))
            except BlockingIOError:
                sock.getpeername()  # OSError unless connected already
        except OSError:
            sock.close()
            return None
        self.counters.local += 1
        sent = 0
        with contextlib.suppress(OSError):  # the streams made of it will see the error
            sent = sock.send(first) if first else 0
        return sock, sent

    def _connect_now(self, host: str, port: int, first: bytes) -> StreamHandle | None:
        """A CONNECT (with `first`) on the open tunnel, for a connection that goes
        through the pod without waiting for a decision; else None."""
        key = (host, port)
        if self._ready.get(key) or self._deciding.get(key):
            return None
        address, name = self._address_and_name(host)
        if self.filter.route(port, address, name) is not Route.REMOTE:
            return None
        tunnel = self._open_tunnel()
        if tunnel is None:
            return None
        stream = tunnel.open_stream(lambda sid: Connect(sid, name or host, port))
        if stream is not None and first:  # within the stream's first window: MAX_DATA at most
            stream.send(Data(stream.id, first))
        return stream

    async def _serve(self, sock: socket.socket, host: str, port: int, first: bytes,
                     stream: StreamHandle | None,
                     here: tuple[socket.socket, int] | None) -> None:  # fmt: skip
        """The way `decide` made ready, if any; else (a connect that went on at once,
        or no supervisor) a remote connection does not wait for CONNECTED: its
        first bytes go with the CONNECT, and a failure can only reset it."""
        try:
            reader, writer = await asyncio.open_connection(sock=sock)
        except OSError as e:
            log.info("outgoing %s:%d: the connection could not be read: %s", host, port, e)
            sock.close()
            if stream is not None:
                stream.reset(ResetCode.CANCEL, "the connection broke")
            if here is not None:
                here[0].close()
            return
        if stream is not None:
            await self._through_pod(stream, reader, writer, host, port, sent=len(first))
            return
        if here is not None:
            there, sent = here
            try:
                there_reader, there_writer = await asyncio.open_connection(sock=there)
            except OSError as e:
                log.info("outgoing %s:%d: %s", host, port, e)
                there.close()
                reset(writer)
                return
            path = Path(Route.LOCAL, f"{host}:{port}", reader=there_reader, writer=there_writer)
            await self.carry(path, reader, writer, first[sent:])
            return
        key = (host, port)
        if not self._ready.get(key) and (deciding := self._deciding.get(key)):
            await asyncio.wait(list(deciding), return_when=asyncio.FIRST_COMPLETED)
            if not self._ready.get(key):  # the pod said no after the call went on
                reset(writer)
                return
        waiting = self._ready.get(key)
        if waiting:
            path = waiting.popleft()
            if not waiting:
                del self._ready[key]
            await self.carry(path, reader, writer, first)
            return
        address, name = self._address_and_name(host)
        if self.filter.route(port, address, name) is Route.REMOTE:
            tunnel = await self._tunnel()
            if tunnel is not None:
                stream = tunnel.open_stream(lambda sid: Connect(sid, name or host, port))
            if stream is None:
                self.counters.failed += 1
                log.info("outgoing %s:%d: no tunnel to the pod is open", host, port)
                reset(writer)
                return
            await self._through_pod(stream, reader, writer, host, port, first=first)
            return
        try:
            path = await self.open(host, port)
        except Failure as e:
            log.info("outgoing %s:%d: %s", host, port, e)
            reset(writer)
            return
        await self.carry(path, reader, writer, first)

    async def _through_pod(
        self, stream: StreamHandle, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        host: str, port: int, *, first: bytes = b"", sent: int = 0,
    ) -> None:  # fmt: skip
        """Splice a CONNECT sent without waiting for its answer; `sent`: bytes that
        went with it, `first`: bytes still to send."""
        counts = Transferred(to_tunnel=sent)
        try:
            broke = await splice(stream, reader, writer, first, counts, reset_socket=True)
        finally:
            writer.close()
        if counts.connected is None:
            self.counters.failed += 1
            if self.forget is not None:
                self.forget(host, port)
            log.info("outgoing %s:%d: %s", host, port, broke)
        else:
            self.counters.remote += 1

    def _address_and_name(self, host: str) -> tuple[IpAddress | None, str | None]:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None, host.rstrip(".").lower()
        return address, self.names.name_of(address)

    async def aclose(self) -> None:
        for waiting in self._ready.values():
            for path in waiting:
                _close(path)
        self._ready.clear()
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


def _close(path: Path) -> None:
    if path.stream is not None and path.stream.active:
        path.stream.reset(ResetCode.CANCEL, "the connection it was opened for never came")
    if path.writer is not None:
        path.writer.close()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, so the other end sees its connection refused, not ended."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
