"""The pod's resolver, for the local process: resolv.conf read once, queries forwarded.

A query is sent as it came (a DNS message on the wire) to the pod's nameservers
in order, over UDP from a fresh socket (a random source port; an answer must
come from the server asked and carry the query's id), and again over TCP when
the UDP answer is truncated (TC). What the local process gets is what a
process in the pod would get: the same servers, the same answers; its search
list and ndots are those of this resolv.conf, handed to the laptop in WELCOME.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DnsError", "ResolvConf", "forward_query"]

log = logging.getLogger(__name__)

UDP_TIMEOUT = 2.0
TCP_TIMEOUT = 5.0
_TC = 0x02  # in the header's third byte


class DnsError(Exception):
    """No nameserver answered the query."""


@dataclass(frozen=True)
class ResolvConf:
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    ndots: int = 1

    @classmethod
    def read(cls, path: Path) -> ResolvConf:
        """As glibc reads it: the last `search`/`domain` line wins; `options ndots:N`."""
        try:
            text = path.read_text()
        except OSError as e:
            log.warning("cannot read %s (%s): outgoing DNS has no nameserver", path, e.strerror)
            return cls()
        servers: list[str] = []
        search: list[str] = []
        ndots = 1
        for line in text.splitlines():
            words = line.split("#", 1)[0].split(";", 1)[0].split()
            if not words:
                continue
            key, values = words[0], words[1:]
            if key == "nameserver" and values:
                servers.append(values[0])
            elif key in ("search", "domain"):
                search = values
            elif key == "options":
                for option in values:
                    name, _, value = option.partition(":")
                    if name == "ndots" and value.isdigit():
                        ndots = min(int(value), 15)
        return cls(tuple(servers), tuple(search), ndots)


async def forward_query(query: bytes, nameservers: tuple[str, ...]) -> bytes:
    """The first answer any nameserver gives, in order. Raises DnsError."""
    if not nameservers:
        raise DnsError("the pod's resolv.conf names no nameserver")
    problems = []
    for server in nameservers:
        try:
            answer = await _udp(query, server)
            if len(answer) > 2 and answer[2] & _TC:
                answer = await _tcp(query, server)
            return answer
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            problems.append(f"{server}: {e or type(e).__name__}")
    raise DnsError("no nameserver answered: " + "; ".join(problems))


class _OneAnswer(asyncio.DatagramProtocol):
    def __init__(self, query_id: bytes):
        self.query_id = query_id
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        # The socket is connected, so only the server asked can reach it.
        if data[:2] == self.query_id and not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def _udp(query: bytes, server: str) -> bytes:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _OneAnswer(query[:2]), remote_addr=(server, 53), family=family
    )
    try:
        transport.sendto(query)
        return await asyncio.wait_for(protocol.answer, UDP_TIMEOUT)
    finally:
        transport.close()


async def _tcp(query: bytes, server: str) -> bytes:
    async with asyncio.timeout(TCP_TIMEOUT):
        reader, writer = await asyncio.open_connection(server, 53)
        try:
            writer.write(len(query).to_bytes(2, "big") + query)
            size = int.from_bytes(await reader.readexactly(2), "big")
            return await reader.readexactly(size)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
