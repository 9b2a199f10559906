"""Hand stolen HTTP/2 requests (gRPC among them) to the local app over h2c.

The local app gets what the caller sent: HTTP/2 with prior knowledge (what
grpcio and other in-cluster gRPC servers speak without TLS), the same pseudo
headers and metadata, request and response streamed message by message, and
trailers. All requests share one connection, opened on first use and again
whenever the app closed it.

A caller that cancels (its stream is reset) cancels the local call: the local
stream is reset too. A local app that resets or drops its stream makes the
caller's stream break off the same way.
"""

from __future__ import annotations

import asyncio
import contextlib

import h2.errors
import h2.events

from local_proxy.forward.dial import SocketFactory, open_connection
from local_proxy.forward.verbatim import MAY_HAVE_RUN
from sidecar.tunnel.driver import Lost, StreamHandle
from sidecar.tunnel.h2bridge import h2_fields, h2_to_tunnel, tunnel_to_h2
from sidecar.tunnel.h2conn import H2Closed, H2Endpoint, H2Stream
from sidecar.tunnel.protocol import RequestHead, Reset, ResetCode, ResponseHead

__all__ = ["H2Forwarder"]


class _Failed(Exception):
    def __init__(self, code: ResetCode, why: str, status: str):
        super().__init__(why)
        self.code = code
        self.status = status


class H2Forwarder:
    def __init__(self, host: str, port: int, timeout: float, factory: SocketFactory | None = None):
        self.factory = factory
        self.host = host
        self.port = port
        self.timeout = timeout
        self._endpoint: H2Endpoint | None = None
        self._reader: asyncio.Task[str] | None = None
        self._lock = asyncio.Lock()

    async def aclose(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close("the session ended")
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader

    async def _connection(self) -> H2Endpoint:
        async with self._lock:
            if self._endpoint is not None and not self._endpoint.closed:
                return self._endpoint
            try:
                reader, writer = await asyncio.wait_for(
                    open_connection(self.host, self.port, self.factory), 5
                )
            except (OSError, TimeoutError) as e:
                raise _Failed(
                    ResetCode.UNREACHABLE,
                    f"nothing accepts connections on {self.host}:{self.port} ({e}); "
                    "is your local process running and listening on --to?",
                    "502",
                ) from e
            self._endpoint = H2Endpoint(reader, writer, client_side=True)
            self._reader = asyncio.create_task(self._endpoint.run())
            return self._endpoint

    async def forward(self, head: RequestHead, stream: StreamHandle) -> str:
        """Run one request; returns what to report (the status, or what went wrong)."""
        try:
            local = await self._open(head)
        except _Failed as e:
            stream.reset(e.code, str(e))
            return f"{e.status} ({e})"
        caller = asyncio.create_task(_request_half(stream, local, head.end_stream))
        answer = asyncio.create_task(self._answer(head, local, stream))
        try:
            await asyncio.wait({caller, answer}, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done() and local.closed:
                # The local app reset the stream and the request pump noticed first
                # (both wake on the same frame): the answer task says how it ended.
                return await answer
            if not answer.done():
                # The caller went away (or the tunnel did): cancel the local call.
                local.reset(h2.errors.ErrorCodes.CANCEL)
                return "abandoned by the caller"
            return answer.result()
        except _Failed as e:
            local.reset(h2.errors.ErrorCodes.CANCEL)
            stream.reset(e.code, str(e))
            return f"{e.status} ({e})"
        finally:
            for task in (answer, caller):
                if not task.done():
                    task.cancel()
            local.done()

    async def _open(self, head: RequestHead) -> H2Stream:
        fields = [
            (b":method", head.method.encode("latin-1")),
            (b":scheme", b"http"),
            (b":authority", (head.authority or f"{self.host}:{self.port}").encode("latin-1")),
            (b":path", head.target.encode("latin-1")),
            *h2_fields(head.headers),
        ]
        for _ in range(2):  # a connection the app closed a moment ago gets one retry
            endpoint = await self._connection()
            local = endpoint.open_stream(fields, end_stream=head.end_stream)
            if local is not None:
                return local
        raise _Failed(
            ResetCode.UNREACHABLE,
            f"the local process on {self.host}:{self.port} closed its HTTP/2 connection",
            "502",
        )

    async def _answer(self, head: RequestHead, local: H2Stream, stream: StreamHandle) -> str:
        try:
            async with asyncio.timeout(self.timeout or None):
                event = await local.next()
                while isinstance(event, h2.events.InformationalResponseReceived):
                    event = await local.next()
        except TimeoutError:
            raise _Failed(
                ResetCode.TIMEOUT,
                f"the local process on {self.host}:{self.port} did not answer within "
                f"{self.timeout:g} s (--timeout; 0 waits forever)",
                "504",
            ) from None
        if not isinstance(event, h2.events.ResponseReceived):
            raise _Failed(ResetCode.UPSTREAM_BROKEN, _broke(event), "502")
        status = 0
        fields = []
        for name, value in event.headers or ():
            if name == b":status":
                status = int(value)
            elif not name.startswith(b":"):
                fields.append((bytes(name), bytes(value)))
        ended = event.stream_ended is not None
        if head.mirror:
            # The answer to a copy goes nowhere: drain it to keep the connection's window.
            stream.send(ResponseHead(stream.id, status, tuple(fields), end_stream=True))
            while not ended:
                event = await local.next()
                if isinstance(event, h2.events.DataReceived):
                    local.ack(event.flow_controlled_length or 0)
                ended = isinstance(event, h2.events.StreamEnded | h2.events.StreamReset | H2Closed)
            return str(status)
        stream.send(ResponseHead(stream.id, status, tuple(fields), end_stream=ended))
        if ended:
            return f"{status}{_grpc_status(fields)}"
        broke = await h2_to_tunnel(local, stream)
        if broke is not None:
            stream.reset(
                ResetCode.UPSTREAM_BROKEN, f"the local process's answer broke off: {broke}"
            )
            return f"{status}, broke off"
        return str(status)


async def _request_half(stream: StreamHandle, local: H2Stream, ended: bool) -> object:
    """Pass the request body on to the local app; then wait, as long as the
    call lasts, for a sign that the caller went away (RESET, or the tunnel lost).
    Returns that sign."""
    if not ended:
        broke = await tunnel_to_h2(stream, local)
        if broke is not None:
            return broke
    while True:
        event = await stream.next()
        if isinstance(event, Reset | Lost):
            return event


def _broke(event: object) -> str:
    if isinstance(event, h2.events.StreamReset):
        return f"the local process reset the stream (error code {event.error_code!r}){MAY_HAVE_RUN}"
    if isinstance(event, H2Closed):
        return f"the local process's HTTP/2 connection ended: {event.reason}{MAY_HAVE_RUN}"
    return f"unexpected HTTP/2 event {event!r}"


def _grpc_status(fields: list[tuple[bytes, bytes]]) -> str:
    for name, value in fields:
        if name == b"grpc-status":
            return f" grpc-status {value.decode('latin-1')}"
    return ""
