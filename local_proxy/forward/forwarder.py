"""Hand each request that arrives through the tunnel to the local app.

Stolen requests: the body streams to the local app as it arrives, the answer
streams back. If the local app refuses the connection the caller gets 502, if it
does not answer within the timeout 504, each with a body that says so. A request
that the pooled HTTP client would alter (a control character, or a byte above
0x7f, in its target or headers) goes out byte for byte on a connection of its
own instead (`verbatim.py`). Whatever fails, the stream ends: with the answer,
or with a reset whose reason the caller reads in offramp's 502.

Mirrored copies: sent to the local app, the answer read and discarded. At most
`mirror_queue` copies are handled at once; more are dropped and counted, so a
slow local app never holds up the tunnel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from yarl import URL

from local_proxy.forward.dial import SocketFactory
from local_proxy.forward.http2 import H2Forwarder
from local_proxy.forward.upgrade import forward_upgrade
from local_proxy.forward.verbatim import MAY_HAVE_RUN, forward_verbatim, pooled_client_keeps
from sidecar.tunnel.driver import Lost, StreamHandle
from sidecar.tunnel.protocol import (
    HOP_BY_HOP,
    Data,
    End,
    RequestHead,
    Reset,
    ResetCode,
    ResponseHead,
)

__all__ = ["Counters", "Forwarder"]

# aiohttp adds these when a request lacks them; a forwarded request must reach the
# local app with the caller's headers only.
_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class _StreamGone(Exception):
    pass


@dataclass
class Counters:
    stolen: int = 0
    mirrored: int = 0
    mirror_dropped_here: int = 0
    mirror_dropped_sidecar: int = 0
    match_timeouts: int = 0
    """Requests the sidecar sent to the app because matching the filter took too long."""
    failed: int = 0


class Forwarder:
    """Sends each request to the local app over pooled keep-alive connections
    (aiohttp; TCP_NODELAY is its default). httpx cost about four times the CPU
    per request here, which showed as latency on every stolen request."""

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        mirror_queue: int,
        report: Callable[[str], None],
        factory: SocketFactory | None = None,
    ):
        self.factory = factory
        """Where the local process runs in a namespace of its own: makes sockets there."""
        self.host = host
        self.port = port
        self.timeout = timeout
        self.mirror_queue = mirror_queue
        self.report = report
        self.counters = Counters()
        self._mirrors_running = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.ending = False
        """The developer ended the session with requests still held: a stream that
        goes away now was cut off by us, not abandoned by its caller."""
        self._client: aiohttp.ClientSession | None = None
        self._h2 = H2Forwarder(host, port, timeout, factory)

    def _session(self) -> aiohttp.ClientSession:
        # Made on first use: an aiohttp session belongs to the running event loop.
        if self._client is None:
            limit = self.timeout or None
            factory = self.factory
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=256,
                    force_close=False,
                    socket_factory=(lambda ai: factory(ai[0]))
                    if (factory := self.factory)
                    else None,
                ),
                timeout=aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=limit),
                auto_decompress=False,
                skip_auto_headers=_AUTO_HEADERS,
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
        await self._h2.aclose()

    def on_request(self, head: RequestHead, stream: StreamHandle) -> None:
        """Tunnel callback for each new stream: handle it in its own task."""
        if head.mirror:
            if self._mirrors_running >= self.mirror_queue:
                self.counters.mirror_dropped_here += 1
                stream.reset(ResetCode.MIRROR_DROPPED, "the local mirror queue is full")
                return
            self._mirrors_running += 1
        task = asyncio.create_task(self._handle(head, stream))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, head: RequestHead, stream: StreamHandle) -> None:
        started = time.monotonic()
        kind = "mirror" if head.mirror else "steal"
        try:
            status = await self._forward(head, stream)
            if self.ending and status.endswith("abandoned by the caller"):
                status = status.replace("abandoned by the caller", "cut off: the session ended")
        except asyncio.CancelledError:
            if self.ending:
                self.report(f"{kind:<6} {head.method} {head.target} -> cut off: the session ended")
            raise
        except Exception as e:
            # A failure nobody foresaw still ends the stream: the caller gets
            # offramp's 502 with this reason instead of waiting forever.
            self.counters.failed += 1
            why = f"the local proxy failed on this request: {type(e).__name__}: {e}"
            if stream.active:
                stream.reset(ResetCode.INTERNAL, why)
            status = f"502 ({why})"
        finally:
            if head.mirror:
                self._mirrors_running -= 1
        if head.mirror:
            self.counters.mirrored += 1
        else:
            self.counters.stolen += 1
        ms = (time.monotonic() - started) * 1000
        self.report(f"{kind:<6} {head.method} {head.target} -> {status} ({ms:.1f} ms)")

    async def _forward(self, head: RequestHead, stream: StreamHandle) -> str:
        if head.http2:
            return await self._h2.forward(head, stream)
        if head.upgrade:
            return await forward_upgrade(
                self.host, self.port, self.timeout, head, stream, self.factory
            )
        if not pooled_client_keeps(head):
            return await forward_verbatim(
                self.host, self.port, self.timeout, head, stream, self.factory
            )
        headers = [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in head.headers
            if n.lower() not in HOP_BY_HOP
        ]
        # The target goes out exactly as the caller wrote it, not re-quoted.
        url = URL(f"http://{self.host}:{self.port}{head.target}", encoded=True)
        try:
            response = await self._session().request(
                head.method,
                url,
                headers=headers,
                data=None if head.end_stream else _body(stream),
                allow_redirects=False,
                compress=False,
            )
        except _StreamGone:
            return "abandoned by the caller"
        except aiohttp.ClientConnectorError as e:
            self.counters.failed += 1
            return self._fail(
                stream,
                ResetCode.UNREACHABLE,
                f"nothing accepts connections on {self.host}:{self.port} ({e.os_error}); "
                "is your local process running and listening on --to?",
                "502",
            )
        except TimeoutError:
            self.counters.failed += 1
            return self._fail(
                stream,
                ResetCode.TIMEOUT,
                f"the local process on {self.host}:{self.port} did not answer within "
                f"{self.timeout:g} s (--timeout; 0 waits forever)",
                "504",
            )
        except aiohttp.ClientError as e:
            if not stream.active:
                # The request body stopped because the caller went away.
                return "abandoned by the caller"
            self.counters.failed += 1
            return self._fail(
                stream,
                ResetCode.UNREACHABLE,
                f"the local process broke the exchange: {e}{MAY_HAVE_RUN}",
                "502",
            )
        try:
            out_headers = tuple(
                (n, v) for n, v in response.raw_headers if n.lower() not in HOP_BY_HOP
            )
            if head.mirror:
                # The answer to a copy goes nowhere: read it to free the connection.
                async for _ in response.content.iter_any():
                    pass
                stream.send(ResponseHead(stream.id, response.status, out_headers, end_stream=True))
                return str(response.status)
            stream.send(
                ResponseHead(stream.id, response.status, out_headers, response.reason or "")
            )
            async for chunk in response.content.iter_any():
                if not await stream.send_body(chunk):
                    return f"{response.status}, abandoned by the caller"
            stream.send(End(stream.id))
            return str(response.status)
        except (aiohttp.ClientError, TimeoutError) as e:
            why = str(e) or "no data within the timeout"
            stream.reset(ResetCode.UPSTREAM_BROKEN, f"the local process's answer broke off: {why}")
            return f"{response.status}, broke off"
        finally:
            response.release()

    def _fail(self, stream: StreamHandle, code: ResetCode, why: str, status: str) -> str:
        stream.reset(code, why)
        return f"{status} ({why})"


async def _body(stream: StreamHandle) -> AsyncIterator[bytes]:
    """The request body as it arrives through the tunnel; each chunk's window is
    given back once aiohttp has taken it for the local app."""
    while True:
        event = await stream.next()
        if isinstance(event, Data):
            yield event.data
            stream.ack(len(event.data))
        elif isinstance(event, End):
            return
        elif isinstance(event, Reset | Lost):
            raise _StreamGone(event)
