"""The asyncio driver around `sidecar.tunnel.protocol.Connection`, shared by both ends.

It only moves bytes between a websocket and the sans-I/O connection, hands each
stream's events to the task that owns the stream, and wakes senders when the peer
grants window. All rules live in the protocol module.

Per stream, application code sees a `StreamHandle`: `await next()` for the
peer's messages (ending with End, Reset, or `Lost` when the tunnel goes away),
`send()` for heads, END and RESET, `await send_body()` for DATA (waits for
window), `ack()` once received bytes have been passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from websockets.exceptions import ConnectionClosed

from sidecar.tunnel.protocol import (
    MAX_DATA,
    Connect,
    Connected,
    Connection,
    Data,
    DnsAnswer,
    DnsQuery,
    End,
    Goodbye,
    Message,
    ProtocolError,
    RequestHead,
    Reset,
    ResetCode,
    ResponseHead,
    Stats,
    WindowUpdate,
)

__all__ = ["Lost", "OpeningHead", "StreamEvent", "StreamHandle", "Tunnel", "WebSocketLike"]

log = logging.getLogger(__name__)


class WebSocketLike(Protocol):
    """What the driver needs of a websocket (websockets' client and server
    connections both fit)."""

    async def send(self, message: bytes) -> None: ...

    async def recv(self) -> str | bytes: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


@dataclass(frozen=True, slots=True)
class Lost:
    """The stream can get no further message: the tunnel closed. `reason` says why."""

    reason: str


StreamEvent = RequestHead | ResponseHead | Connected | DnsAnswer | Data | End | Reset | Lost
OpeningHead = RequestHead | Connect | DnsQuery


class StreamHandle:
    """One stream of a tunnel, as its owning task sees it."""

    def __init__(self, tunnel: Tunnel, stream_id: int):
        self.tunnel = tunnel
        self.id = stream_id
        self._inbox: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._window = asyncio.Event()
        self._sink: Callable[[Data | Connected], bool] | None = None

    async def next(self) -> StreamEvent:
        return await self._inbox.get()

    def send(self, message: Message, *, flush: bool = True) -> bool:
        """Queue `message`; see `Tunnel.send` for `flush`."""
        return self.tunnel.send(message, flush=flush)

    @property
    def has_pending(self) -> bool:
        """Whether messages from the peer wait to be taken with `next()`."""
        return not self._inbox.empty()

    async def send_body(self, data: bytes) -> bool:
        """Send `data` as DATA frames, waiting for window as needed. Returns False
        if the stream ended or the tunnel closed before all of it was sent."""
        view = memoryview(data)
        while view:
            window = self.tunnel.conn.send_window(self.id)
            if window == 0:
                if not self.tunnel.conn.is_active(self.id) or self.tunnel.closed:
                    return False
                self._window.clear()
                await self._window.wait()
                continue
            n = min(window, MAX_DATA, len(view))
            if not self.tunnel.send(Data(self.id, bytes(view[:n]))):
                return False
            view = view[n:]
        return True

    def ack(self, n: int) -> None:
        if self.tunnel.conn.acknowledge(self.id, n):
            self.tunnel.wake()

    def reset(self, code: ResetCode, message: str = "") -> None:
        self.tunnel.send(Reset(self.id, code, message))

    @property
    def active(self) -> bool:
        return self.tunnel.conn.is_active(self.id) and not self.tunnel.closed

    def take_data(self, sink: Callable[[Data | Connected], bool] | None) -> None:
        """Hand DATA (and CONNECTED) to `sink` as it arrives, in the tunnel's own
        turn of the event loop, rather than queue it for `next()` (which costs the
        reading task a turn). `sink` returns False to have it queued after all;
        other messages, and any that arrive behind queued ones, are queued as
        always. None: queue everything again."""
        self._sink = sink

    def _deliver(self, event: StreamEvent) -> None:
        sink = self._sink
        if sink and isinstance(event, Data | Connected) and self._inbox.empty() and sink(event):
            return
        self._inbox.put_nowait(event)

    def _wake_window(self) -> None:
        self._window.set()


class Tunnel:
    """Drives one protocol connection over one websocket until either closes."""

    def __init__(
        self,
        conn: Connection,
        ws: WebSocketLike,
        *,
        on_request: Callable[[RequestHead, StreamHandle], None] | None = None,
        on_outgoing: Callable[[Connect | DnsQuery, StreamHandle], None] | None = None,
        on_stats: Callable[[Stats], None] | None = None,
        on_goodbye: Callable[[str], None] | None = None,
    ):
        self.conn = conn
        self.ws = ws
        self._on_request = on_request
        self.on_outgoing = on_outgoing
        self._on_stats = on_stats
        self.on_goodbye = on_goodbye
        self.goodbye_received = asyncio.Event()
        self.goodbye_reason = ""
        self._streams: dict[int, StreamHandle] = {}
        self._wake = asyncio.Event()
        self._flushes: set[asyncio.Task[None]] = set()
        self.closed = False
        self.close_reason = ""

    def wake(self) -> None:
        self._wake.set()

    def send(self, message: Message, *, flush: bool = True) -> bool:
        """Queue `message` to go at the next turn of the writer. `flush=False`: not
        urgent, it goes with the next message sent with a flush (in order)."""
        if self.closed:
            return False
        sent = self.conn.send(message)
        if isinstance(message, Reset) or (sent and not self.conn.is_active(message.stream_id)):
            self._streams.pop(message.stream_id, None)
        if flush:
            self._wake.set()
        return sent

    def open_stream(self, make_head: Callable[[int], OpeningHead]) -> StreamHandle | None:
        """Open a stream: the sidecar hands a request over, the client asks for a
        connection or a DNS answer. None if the session is ending."""
        if self.closed or not self.conn.accepting_streams:
            return None
        stream_id = self.conn.next_stream_id()
        handle = StreamHandle(self, stream_id)
        self._streams[stream_id] = handle
        self.send(make_head(stream_id))
        return handle

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    async def run(self) -> str:
        """Pump until the websocket or the protocol ends; return why it ended.
        Every open stream then receives `Lost` with that reason."""
        writer = asyncio.create_task(self._writer())
        reason = "the tunnel closed"
        try:
            async for message in _messages(self.ws):
                self.conn.receive_data(message)
                while (event := self.conn.next_event()) is not None:
                    if isinstance(event, Goodbye):
                        reason = f"the other side ended the session: {event.reason}"
                        self.goodbye_reason = event.reason
                        self.goodbye_received.set()
                        if self.on_goodbye:
                            self.on_goodbye(event.reason)
                        continue
                    self._dispatch(event)
        except ProtocolError as e:
            reason = f"tunnel protocol error: {e}"
            log.warning("%s", reason)
            with contextlib.suppress(Exception):
                await self.ws.close(1002, str(e)[:120])
        except ConnectionClosed as e:
            if e.rcvd is not None and e.rcvd.code == 1000:
                reason = f"the other side closed the tunnel: {e.rcvd.reason or 'no reason given'}"
            else:
                reason = f"the tunnel's connection was lost ({e})"
        finally:
            self._finish(reason)
            for task in (writer, *self._flushes):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        return reason

    def say_goodbye(self, reason: str) -> None:
        """Start ending the session: no new streams; open ones finish."""
        if not self.closed and not self.conn.goodbye_sent:
            self.send(Goodbye(reason))

    async def close(self, reason: str) -> None:
        """End the tunnel now, telling the peer why (if not told already)."""
        if not self.closed:
            if not self.conn.goodbye_sent:
                with contextlib.suppress(ProtocolError):
                    self.conn.send(Goodbye(reason))
            with contextlib.suppress(Exception):
                while data := self.conn.data_to_send():
                    await self.ws.send(data)
                await self.ws.close(1000, reason[:120])
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        for handle in self._streams.values():
            handle._deliver(Lost(reason))
            handle._wake_window()
        self._streams.clear()
        self._wake.set()

    def _dispatch(self, event: Message) -> None:
        if isinstance(event, Stats):
            if self._on_stats:
                self._on_stats(event)
            return
        if isinstance(event, RequestHead):
            handle = StreamHandle(self, event.stream_id)
            self._streams[event.stream_id] = handle
            if self._on_request is None:
                self.send(Reset(event.stream_id, ResetCode.INTERNAL, "this end takes no requests"))
                return
            self._on_request(event, handle)
            return
        if isinstance(event, Connect | DnsQuery):
            handle = StreamHandle(self, event.stream_id)
            self._streams[event.stream_id] = handle
            if self.on_outgoing is None:
                self.send(Reset(event.stream_id, ResetCode.DENIED, "this end dials nothing"))
                return
            self.on_outgoing(event, handle)
            return
        found = self._streams.get(event.stream_id)
        if found is None:
            return
        if isinstance(event, WindowUpdate):
            found._wake_window()
            return
        if isinstance(event, ResponseHead | Connected | DnsAnswer | Data | End | Reset):
            found._deliver(event)
        # The connection has already read every frame of this websocket message, so
        # its state may be ahead of this event: only an event that ends the peer's
        # half (or the whole stream) may retire the handle.
        ends_peer = isinstance(event, End | DnsAnswer) or (
            isinstance(event, ResponseHead) and event.end_stream
        )
        if isinstance(event, Reset) or (ends_peer and not self.conn.is_active(event.stream_id)):
            self._streams.pop(event.stream_id, None)
            found._wake_window()

    def flush(self) -> None:
        """Send what is queued now, in this turn of the event loop, rather than at
        the writer's next turn: for bytes on the way of a round trip. Messages
        leave in the order they were queued either way (a websocket send writes
        to the socket before it waits for anything). While an earlier flush waits
        for the socket to drain, that one sends what is queued meanwhile too."""
        if self.closed or self._flushes:
            return
        loop = asyncio.get_running_loop()
        sending = asyncio.Task(self._send_queued(), loop=loop, eager_start=True)
        if sending.done():
            self._wake.clear()  # all of it went: the writer has nothing to do
        else:  # the socket is full: the rest goes as it drains
            self._flushes.add(sending)
            sending.add_done_callback(self._flushes.discard)

    async def _send_queued(self) -> None:
        try:
            while data := self.conn.data_to_send():
                await self.ws.send(data)
        except Exception as e:
            self._finish(f"the tunnel broke while sending: {e}")

    async def _writer(self) -> None:
        while not self.closed:
            await self._wake.wait()
            self._wake.clear()
            await self._send_queued()


async def _messages(ws: WebSocketLike) -> AsyncIterator[bytes]:
    while True:
        message = await ws.recv()
        if isinstance(message, str):
            raise ProtocolError("text websocket message on a binary tunnel")
        yield message
