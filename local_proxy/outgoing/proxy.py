"""A local SOCKS5 and HTTP proxy whose connections leave from the pod (or from here,
as the outgoing filter says): for tools that honour ALL_PROXY / HTTP(S)_PROXY, and
for the local process where a namespace cannot be had (macOS; user namespaces off).

One port speaks both, told apart by the first byte:
- SOCKS5 (RFC 1928), no authentication, CONNECT only; a hostname is resolved by
  the pod (`socks5h://`); a failure is the matching reply code (connection
  refused 5, network unreachable 3, host unreachable 4 (also a name that does
  not resolve), not allowed 2, TTL expired 6 for a timeout);
- HTTP: `CONNECT host:port` (200, or 403/502/504 with why), and plain
  `GET http://host/...` requests, passed on in origin form, one request per
  connection (`Connection: close`).

Not covered in this mode: programs that ignore the proxy variables (most
database drivers, Java without -D flags, anything speaking raw sockets) and
UDP. Their connections leave from the laptop, unseen by offramp.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import struct
from urllib.parse import urlsplit

from local_proxy.outgoing.relay import Failure, OutgoingRelay, Path
from sidecar.tunnel.protocol import ResetCode

__all__ = ["ProxyServer", "proxy_environment"]

log = logging.getLogger(__name__)

HEAD_LIMIT = 64 * 1024
HEAD_TIMEOUT = 30.0
_SOCKS_REPLY = {
    ResetCode.REFUSED: 5,
    ResetCode.NETWORK_UNREACHABLE: 3,
    ResetCode.NXDOMAIN: 4,
    ResetCode.DENIED: 2,
    ResetCode.TIMEOUT: 6,
}
_HTTP_STATUS = {
    ResetCode.DENIED: b"403 Forbidden",
    ResetCode.TIMEOUT: b"504 Gateway Timeout",
}


def proxy_environment(host: str, port: int) -> dict[str, str]:
    """The variables that point clients at the proxy (both spellings, as tools differ)."""
    http = f"http://{host}:{port}"
    socks = f"socks5h://{host}:{port}"
    env = {"ALL_PROXY": socks, "HTTP_PROXY": http, "HTTPS_PROXY": http,
           "NO_PROXY": "localhost,127.0.0.1,::1"}  # fmt: skip
    return env | {k.lower(): v for k, v in env.items()}


class ProxyServer:
    def __init__(self, relay: OutgoingRelay, host: str = "127.0.0.1", port: int = 0):
        self.relay = relay
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                first = await reader.readexactly(1)
                if first == b"\x05":
                    opened = await self._socks(reader, writer)
                else:
                    opened = await self._http(first, reader, writer)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as e:
            log.debug("proxy client went away or spoke garbage: %s", e)
            writer.close()
            return
        if opened is None:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
            return
        path, extra = opened
        if extra and path.stream is not None:
            await path.stream.send_body(extra)
        elif extra and path.writer is not None:
            path.writer.write(extra)
        await self.relay.carry(path, reader, writer)

    async def _socks(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> (
        tuple[Path, bytes] | None
    ):  # fmt: skip
        (count,) = await reader.readexactly(1)
        methods = await reader.readexactly(count)
        if 0 not in methods:
            writer.write(b"\x05\xff")  # only "no authentication" is offered
            return None
        writer.write(b"\x05\x00")
        version, command, _, kind = await reader.readexactly(4)
        if version != 5:
            raise ValueError("not SOCKS5")
        if kind == 1:
            host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
        elif kind == 4:
            host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
        elif kind == 3:
            (size,) = await reader.readexactly(1)
            host = (await reader.readexactly(size)).decode("idna")
        else:
            writer.write(_socks_reply(8))
            return None
        (port,) = struct.unpack("!H", await reader.readexactly(2))
        if command != 1:
            writer.write(_socks_reply(7))  # only CONNECT; no BIND, no UDP ASSOCIATE
            return None
        try:
            path = await self.relay.open(host, port)
        except Failure as e:
            log.info("socks %s:%d: %s", host, port, e)
            writer.write(_socks_reply(_SOCKS_REPLY.get(e.code, 1)))
            return None
        writer.write(_socks_reply(0))
        return path, b""

    async def _http(self, first: bytes, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> tuple[Path, bytes] | None:  # fmt: skip
        head = first + await reader.readuntil(b"\r\n\r\n")
        if len(head) > HEAD_LIMIT:
            raise ValueError("request head too large")
        line, _, rest = head.partition(b"\r\n")
        method, target, version = line.decode("latin-1").split(" ", 2)
        if method == "CONNECT":
            host, _, port_text = target.rpartition(":")
            host = host.strip("[]")
            try:
                path = await self.relay.open(host, int(port_text))
            except Failure as e:
                status = _HTTP_STATUS.get(e.code, b"502 Bad Gateway")
                writer.write(_http_error(status, str(e)))
                return None
            except ValueError:
                writer.write(_http_error(b"400 Bad Request", "write CONNECT host:port"))
                return None
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            return path, b""
        url = urlsplit(target)
        if url.scheme != "http" or not url.hostname:
            writer.write(_http_error(b"400 Bad Request", "this proxy takes CONNECT host:port "
                                     "or an absolute http:// URL"))  # fmt: skip
            return None
        try:
            path = await self.relay.open(url.hostname, url.port or 80)
        except Failure as e:
            writer.write(_http_error(_HTTP_STATUS.get(e.code, b"502 Bad Gateway"), str(e)))
            return None
        origin = (url.path or "/") + (f"?{url.query}" if url.query else "")
        headers = [
            h for h in rest.split(b"\r\n")
            if h and not h.lower().startswith((b"proxy-connection:", b"connection:"))
        ]  # fmt: skip
        rewritten = (
            f"{method} {origin} {version}\r\n".encode("latin-1")
            + b"".join(h + b"\r\n" for h in headers)
            + b"Connection: close\r\n\r\n"
        )
        return path, rewritten


def _socks_reply(code: int) -> bytes:
    return bytes([5, code, 0, 1]) + bytes(6)


def _http_error(status: bytes, why: str) -> bytes:
    body = f"offramp: {why}\n".encode()
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )  # fmt: skip
