"""How the local side opens a connection to the local process.

Usually a plain TCP connection to 127.0.0.1:--to. When the process runs in a
network namespace of its own (`local_proxy.outgoing.netns`), its 127.0.0.1 is
not the laptop's: the socket is then made inside the namespace (`factory`) and
connected from here.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

__all__ = ["SocketFactory", "open_connection"]

SocketFactory = Callable[[int], socket.socket]
"""Given an address family, a new unconnected TCP socket."""


async def open_connection(
    host: str, port: int, factory: SocketFactory | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if factory is None:
        return await asyncio.open_connection(host, port)
    sock = factory(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)
