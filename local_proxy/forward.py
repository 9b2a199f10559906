"""Hand each request that arrives through the tunnel to the local app.

Stolen requests: the body streams to the local app as it arrives, the answer
streams back. If the local app refuses the connection the caller gets 502, if it
does not answer within the timeout 504, each with a body that says so.

Mirrored copies: sent to the local app, the answer read and discarded. At most
`mirror_queue` copies are handled at once; more are dropped and counted, so a
slow local app never holds up the tunnel.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx

from sidecar.protocol import HOP_BY_HOP, Data, End, RequestHead, Reset, ResetCode, ResponseHead
from sidecar.tunnel import Lost, StreamHandle

__all__ = ["Counters", "Forwarder"]


class _StreamGone(Exception):
    pass


@dataclass
class Counters:
    stolen: int = 0
    mirrored: int = 0
    mirror_dropped_here: int = 0
    mirror_dropped_sidecar: int = 0
    failed: int = 0


class Forwarder:
    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        mirror_queue: int,
        report: Callable[[str], None],
    ):
        self.host = host
        self.port = port
        self.timeout = timeout
        self.mirror_queue = mirror_queue
        self.report = report
        self.counters = Counters()
        self._mirrors_running = 0
        self.tasks: set[asyncio.Task[None]] = set()
        limit = timeout or None
        self.client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)], retries=0
            ),
            timeout=httpx.Timeout(connect=5.0, read=limit, write=limit, pool=None),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
        )

    async def aclose(self) -> None:
        await self.client.aclose()

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
        headers = [(n, v) for n, v in head.headers if n.lower() not in HOP_BY_HOP]
        content = None if head.end_stream else _body(stream)
        request = httpx.Request(
            head.method,
            f"http://{self.host}:{self.port}{head.target}",
            headers=headers,
            content=content,
        )
        try:
            response = await self.client.send(request, stream=True)
        except _StreamGone:
            return "abandoned by the caller"
        except httpx.ConnectError as e:
            self.counters.failed += 1
            return self._fail(
                stream,
                ResetCode.UNREACHABLE,
                f"nothing accepts connections on {self.host}:{self.port} ({e}); "
                "is your local process running and listening on --to?",
                "502",
            )
        except httpx.TimeoutException:
            self.counters.failed += 1
            return self._fail(
                stream,
                ResetCode.TIMEOUT,
                f"the local process on {self.host}:{self.port} did not answer within "
                f"{self.timeout:g} s (--timeout; 0 waits forever)",
                "504",
            )
        except httpx.HTTPError as e:
            self.counters.failed += 1
            return self._fail(
                stream, ResetCode.UNREACHABLE, f"the local process broke the exchange: {e}", "502"
            )
        try:
            out_headers = tuple(
                (n, v) for n, v in response.headers.raw if n.lower() not in HOP_BY_HOP
            )
            if head.mirror:
                # The answer to a copy goes nowhere: read it to free the connection.
                async for _ in response.aiter_raw():
                    pass
                stream.send(
                    ResponseHead(stream.id, response.status_code, out_headers, end_stream=True)
                )
                return str(response.status_code)
            stream.send(
                ResponseHead(stream.id, response.status_code, out_headers, response.reason_phrase)
            )
            async for chunk in response.aiter_raw():
                if not await stream.send_body(chunk):
                    return f"{response.status_code}, abandoned by the caller"
            stream.send(End(stream.id))
            return str(response.status_code)
        except httpx.HTTPError as e:
            stream.reset(ResetCode.UPSTREAM_BROKEN, f"the local process's answer broke off: {e}")
            return f"{response.status_code}, broke off"
        finally:
            await response.aclose()

    def _fail(self, stream: StreamHandle, code: ResetCode, why: str, status: str) -> str:
        stream.reset(code, why)
        return f"{status} ({why})"


async def _body(stream: StreamHandle) -> AsyncIterator[bytes]:
    """The request body as it arrives through the tunnel; each chunk's window is
    given back once httpx has written it to the local app."""
    while True:
        event = await stream.next()
        if isinstance(event, Data):
            yield event.data
            stream.ack(len(event.data))
        elif isinstance(event, End):
            return
        elif isinstance(event, Reset | Lost):
            raise _StreamGone(event)
