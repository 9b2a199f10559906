"""An asyncio driver around the `h2` library's sans-I/O HTTP/2 connection.

Used on both sides of a stolen HTTP/2 request: the sidecar's gateway is the
server mitmproxy sends stolen h2 streams to, and the local proxy is the client
of the developer's local (e.g. grpcio) server. Each stream is owned by one task
which reads its events with `await stream.next()` and writes with the stream's
methods; the connection's reader task only routes events.

Flow control is end to end: received DATA is acknowledged (`ack`) only once the
owner has passed it on, and `send_data` waits for the peer's window, so one
slow stream holds at most one window of bytes here.

Stream events are the `h2.events` objects (RequestReceived, ResponseReceived,
DataReceived, TrailersReceived, StreamEnded, StreamReset) and `H2Closed` when
the connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

__all__ = [
    "H2_PREFACE",
    "H2Closed",
    "H2Endpoint",
    "H2Stream",
    "StreamEvent",
    "starts_like_h2_settings",
]

log = logging.getLogger(__name__)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""What an HTTP/2 client sends first; with no TLS, the only sign of h2c."""
_READ = 64 * 1024
WINDOW = 256 * 1024
"""What each stream (and the connection) may have in flight towards us: the
tunnel's window too, so a stolen h2 stream holds no more here than an HTTP/1.1 one."""
CONNECTION_WINDOW = 16 * 1024 * 1024
"""Shared by all streams of a connection, so that many streams can be in flight."""


def starts_like_h2_settings(data: bytes) -> bool:
    """An HTTP/2 server's first frame: SETTINGS (type 4, no flags) on stream 0,
    its length a multiple of 6. A frame head not yet whole is judged on what is there."""
    expected = (None, None, None, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00)
    if any(want is not None and got != want for got, want in zip(data[:9], expected, strict=False)):
        return False
    return len(data) < 9 or int.from_bytes(data[:3], "big") % 6 == 0


@dataclass(frozen=True, slots=True)
class H2Closed:
    reason: str


StreamEvent = (
    h2.events.RequestReceived
    | h2.events.ResponseReceived
    | h2.events.InformationalResponseReceived
    | h2.events.DataReceived
    | h2.events.TrailersReceived
    | h2.events.StreamEnded
    | h2.events.StreamReset
    | H2Closed
)


class H2Stream:
    def __init__(self, endpoint: H2Endpoint, stream_id: int):
        self.endpoint = endpoint
        self.id = stream_id
        self._inbox: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self.gone = asyncio.Event()
        """Set once either end reset the stream or the connection ended; an owner
        busy with the other direction can wait on it."""

    @property
    def closed(self) -> bool:
        return self.gone.is_set()

    async def next(self) -> StreamEvent:
        return await self._inbox.get()

    def send_headers(self, headers: list[tuple[bytes, bytes]], end_stream: bool = False) -> bool:
        return self.endpoint._do(lambda c: c.send_headers(self.id, headers, end_stream=end_stream))

    def end(self) -> bool:
        return self.endpoint._do(lambda c: c.end_stream(self.id))

    async def send_data(self, data: bytes) -> bool:
        """Send `data`, waiting for the peer's window. False if the stream or the
        connection ended first."""
        ep = self.endpoint
        view = memoryview(data)
        while view:
            if self.closed or ep.closed:
                return False
            try:
                window = ep.conn.local_flow_control_window(self.id)
            except h2.exceptions.StreamClosedError:
                return False
            if window <= 0:
                await ep._window_changed()
                continue
            n = min(window, ep.conn.max_outbound_frame_size, len(view))

            def op(c: h2.connection.H2Connection, piece: bytes = bytes(view[:n])) -> None:
                c.send_data(self.id, piece)

            if not ep._do(op):
                return False
            view = view[n:]
            await ep.drain()
        return True

    def ack(self, flow_controlled_length: int) -> None:
        """The owner has passed on this much received DATA: let the peer send more."""
        if flow_controlled_length:
            self.endpoint._do(
                lambda c: c.acknowledge_received_data(flow_controlled_length, self.id)
            )

    def reset(self, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        if not self.closed:
            self.gone.set()
            self.endpoint._do(lambda c: c.reset_stream(self.id, code))
        self.endpoint._forget(self.id)

    def done(self) -> None:
        """The owner is finished with this stream (both halves ended)."""
        self.endpoint._forget(self.id)

    def _deliver(self, event: StreamEvent) -> None:
        if isinstance(event, h2.events.StreamReset | H2Closed):
            self.gone.set()
        self._inbox.put_nowait(event)


class H2Endpoint:
    """One HTTP/2 connection over an asyncio stream pair, either role."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        client_side: bool,
        on_stream: Callable[[H2Stream, h2.events.RequestReceived], None] | None = None,
    ):
        self.reader = reader
        self.writer = writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        )
        self._on_stream = on_stream
        self.streams: dict[int, H2Stream] = {}
        self.closed = False
        self.close_reason = ""
        self._window = asyncio.Event()
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW})
        self.conn.increment_flow_control_window(CONNECTION_WINDOW)
        self._flush()

    # -- used by streams -------------------------------------------------------------

    def open_stream(
        self, headers: list[tuple[bytes, bytes]], end_stream: bool = False
    ) -> H2Stream | None:
        """Client side: start a request. None if the connection is gone."""
        if self.closed:
            return None
        stream_id = self.conn.get_next_available_stream_id()
        stream = H2Stream(self, stream_id)
        self.streams[stream_id] = stream
        if not self._do(lambda c: c.send_headers(stream_id, headers, end_stream=end_stream)):
            del self.streams[stream_id]
            return None
        return stream

    def _do(self, op: Callable[[h2.connection.H2Connection], object]) -> bool:
        if self.closed:
            return False
        try:
            op(self.conn)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            log.debug("h2 operation refused: %s", e)
            return False
        self._flush()
        return True

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def _window_changed(self) -> None:
        self._window.clear()
        await self._window.wait()

    def _forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)

    # -- the reader ------------------------------------------------------------------

    async def run(self, initial: bytes = b"") -> str:
        """Read until the connection ends; returns why. `initial`: bytes already
        read from the connection (e.g. while sniffing for the preface)."""
        data = initial
        try:
            while not self.closed:
                if not data:
                    data = await self.reader.read(_READ)
                if not data:
                    return self._close("the peer closed the connection")
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    self._flush()
                    return self._close(f"HTTP/2 protocol error: {e}")
                data = b""
                for event in events:
                    self._route(event)
                self._flush()
            return self.close_reason
        except ConnectionError as e:
            return self._close(f"connection error: {e}")
        finally:
            self._close("the connection ended")

    def _route(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            assert event.stream_id is not None
            stream = H2Stream(self, event.stream_id)
            self.streams[event.stream_id] = stream
            if self._on_stream is not None:
                self._on_stream(stream, event)
            else:
                stream.reset(h2.errors.ErrorCodes.REFUSED_STREAM)
        elif isinstance(
            event,
            h2.events.ResponseReceived
            | h2.events.InformationalResponseReceived
            | h2.events.DataReceived
            | h2.events.TrailersReceived
            | h2.events.StreamEnded
            | h2.events.StreamReset,
        ):
            stream_id = event.stream_id
            assert stream_id is not None
            target = self.streams.get(stream_id)
            if target is not None:
                target._deliver(event)
            elif isinstance(event, h2.events.DataReceived):
                # Nobody will pass these bytes on: give the window back at once.
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
            if isinstance(event, h2.events.StreamReset):
                self._window.set()  # a sender waiting on this stream must look again
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._close(f"the peer ended the connection (GOAWAY {event.error_code!r})")

    def _close(self, reason: str) -> str:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            for stream in list(self.streams.values()):
                stream._deliver(H2Closed(reason))
            self.streams.clear()
            self._window.set()
            with contextlib.suppress(Exception):
                self.writer.close()
        return self.close_reason

    def close(self, reason: str = "closing") -> None:
        if not self.closed:
            self._do(lambda c: c.close_connection())
            self._close(reason)
