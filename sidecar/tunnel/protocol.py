"""The offramp tunnel protocol, without I/O.

One tunnel joins one session of one developer to one sidecar. It carries many
concurrent exchanges as *streams*, of three kinds:

- HTTP: the sidecar opens it with REQUEST_HEAD (a request taken from the pod), the
  client (the local proxy) answers with RESPONSE_HEAD;
- CONNECT: the client asks for a TCP connection from the pod to a host and port;
  the sidecar answers CONNECTED once it is open (or RESET with why not), then
  DATA and END carry the bytes and half-closes both ways. With protocol "udp"
  it asks for a UDP flow instead: DATA then carries datagrams, each as a u16
  length and its bytes (`frame_datagram`, `Datagrams`), and END ends the flow;
- DNS: the client sends one DNS_QUERY (a DNS message as on the wire), the sidecar
  answers one DNS_ANSWER from the pod's nameservers (or RESET).

The sidecar opens odd stream ids, the client even ones, so neither waits for
the other to pick an id.

This module owns framing, the message types, stream ids, stream state and flow
control. It takes bytes in (`receive_data`) and hands bytes (`data_to_send`) and
events (`next_event`) out; it imports no I/O library. The websocket drivers on
each side only move bytes.

Frame (every integer big-endian)::

    u32 length | u8 type | u32 stream id | payload (length - 5 bytes)

HELLO's layout (a JSON object with "version") is frozen for all versions, so a
peer of another version can always be told, clearly, that versions differ.

Handshake: the client sends HELLO {version, token, session}; the sidecar answers
WELCOME {version, session_id, ...} or REFUSED {code, message} and closes.

Ending: either side sends GOODBYE, once. From then on the sidecar opens no new
stream, but streams already open finish normally. A sidecar that receives
GOODBYE answers with its own, so the client knows that no request can follow;
the client closes the websocket when its streams are done.

Per stream, each direction is a *half* (the opener's and the answerer's) that goes
IDLE -> OPEN (its head) -> DONE (END); a DNS head ends its half at once; RESET
ends both halves at once. See `_HALF_TRANSITIONS` and `_KIND_OF`.

Flow control: each half starts with `INITIAL_WINDOW` bytes of credit. DATA spends
credit; the receiver returns it with WINDOW_UPDATE once the bytes have left its
hands (`acknowledge`). So one slow stream holds at most one window in memory.

Errors::

    ProtocolError        the peer broke the protocol: close the tunnel
    └── HandshakeRefused  the peer refused the handshake (bad token, version, spec)
    FlowControlError     we tried to send more DATA than the peer allowed (a bug here)
"""

from __future__ import annotations

import json
import struct
from collections import deque
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, ClassVar, Self

__all__ = [
    "HOP_BY_HOP",
    "INITIAL_WINDOW",
    "MAX_DATA",
    "MAX_DATAGRAM",
    "MAX_DNS",
    "MAX_FRAME",
    "MAX_HELLO",
    "MAX_MESSAGE",
    "PROTOCOL_VERSION",
    "TUNNEL_PATH",
    "Connect",
    "Connected",
    "Connection",
    "Data",
    "Datagrams",
    "DnsAnswer",
    "DnsQuery",
    "End",
    "FlowControlError",
    "Goodbye",
    "HandshakeRefused",
    "Headers",
    "Hello",
    "Message",
    "ProtocolError",
    "Refused",
    "RequestHead",
    "Reset",
    "ResetCode",
    "ResponseHead",
    "Role",
    "Stats",
    "Welcome",
    "WindowUpdate",
    "decode_frame",
    "encode",
    "frame_datagram",
]

PROTOCOL_VERSION = 3
"""2: request heads say whether the request came as HTTP/2 and whether it upgrades.
3: the client opens CONNECT and DNS streams (even ids); WELCOME says what outgoing
traffic the sidecar grants and the pod's DNS search list."""
TUNNEL_PATH = "/v1/tunnel"
"""Where the sidecar's control port serves the tunnel's websocket."""
INITIAL_WINDOW = 256 * 1024
MAX_DATA = 64 * 1024
"""Largest DATA payload one frame may carry."""
MAX_FRAME = 1024 * 1024
"""Largest frame of any type (heads with many headers included)."""
MAX_MESSAGE = MAX_FRAME
"""Largest websocket message either end sends: whole frames, up to this many bytes
together (`data_to_send`), so a receiver may refuse anything larger."""
MAX_HELLO = 256 * 1024
"""Largest first message a sidecar reads before it knows who is asking."""

_HEADER = struct.Struct("!IBI")

HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding",
     b"upgrade", b"trailer"}
)  # fmt: skip
"""Headers that describe one hop, not the message: heads never carry them (lower case).
Each end frames the body itself on its own connection."""

Headers = tuple[tuple[bytes, bytes], ...]


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow. Close the tunnel."""


class HandshakeRefused(ProtocolError):
    """The sidecar refused the session; `code` says why in one word."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


class FlowControlError(Exception):
    """Sending more DATA than the peer's window allows: wait for WINDOW_UPDATE."""


class Role(Enum):
    SIDECAR = "sidecar"
    CLIENT = "client"


class FrameType(IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    REFUSED = 0x03
    REQUEST_HEAD = 0x10
    RESPONSE_HEAD = 0x11
    DATA = 0x12
    END = 0x13
    RESET = 0x14
    WINDOW_UPDATE = 0x15
    CONNECT = 0x16
    CONNECTED = 0x17
    DNS_QUERY = 0x18
    DNS_ANSWER = 0x19
    STATS = 0x20
    GOODBYE = 0x21


class ResetCode(IntEnum):
    """Why a stream was reset; the text travels alongside for people."""

    CANCEL = 0  # the sender no longer needs the stream (caller went away, session closing)
    UNREACHABLE = 1  # the local app refused the connection
    TIMEOUT = 2  # the local app did not answer in time
    MIRROR_DROPPED = 3  # a mirror copy was dropped because the queue was full
    INTERNAL = 4  # a bug or an unexpected failure on the sender's side
    UPSTREAM_BROKEN = 5  # the local app's response broke off part-way
    REFUSED = 6  # CONNECT: the destination refused the connection
    NXDOMAIN = 7  # CONNECT: the name does not resolve in the pod
    DENIED = 8  # CONNECT/DNS: the sidecar's policy does not allow it
    NETWORK_UNREACHABLE = 9  # CONNECT: no route from the pod to the destination


# --- encoding helpers -------------------------------------------------------------


def _json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _unjson(frame_type: FrameType, payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except ValueError as e:
        raise ProtocolError(f"{frame_type.name} payload is not JSON: {e}") from e
    if not isinstance(value, dict):
        raise ProtocolError(f"{frame_type.name} payload is not a JSON object")
    return value


def _enc_headers(headers: Headers) -> list[list[str]]:
    # latin-1 maps every byte to one code point, so any header survives JSON exactly.
    return [[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers]


def _dec_headers(frame_type: FrameType, raw: Any) -> Headers:
    try:
        return tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in raw)
    except (TypeError, ValueError, AttributeError) as e:
        raise ProtocolError(f"{frame_type.name} has malformed headers") from e


def _field[T](frame_type: FrameType, obj: dict[str, Any], key: str, kind: type[T]) -> T:
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{frame_type.name}.{key} missing or not {kind.__name__}")
    return value


# --- messages -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    TYPE: ClassVar[FrameType] = FrameType.HELLO
    version: int
    token: str
    session: dict[str, Any]
    stream_id: int = 0

    def payload(self) -> bytes:
        return _json({"version": self.version, "token": self.token, "session": self.session})

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Self:
        obj = _unjson(cls.TYPE, payload)
        version = _field(cls.TYPE, obj, "version", int)
        # Only "version" is read strictly before the version check, so that a peer
        # of another version gets a clear answer rather than a parse error.
        token = obj.get("token")
        session = obj.get("session")
        return cls(
            version,
            token if isinstance(token, str) else "",
            session if isinstance(session, dict) else {},
        )


@dataclass(frozen=True, slots=True)
class Welcome:
    TYPE: ClassVar[FrameType] = FrameType.WELCOME
    version: int
    session_id: str
    sidecar_version: str
    app_ports: tuple[int, ...]
    outgoing: tuple[str, ...] = ()
    """What outgoing traffic this session may send through the pod: "tcp", "udp", "dns"."""
    dns_search: tuple[str, ...] = ()
    """The pod's resolver search list and ndots, for the local process's resolv.conf."""
    dns_ndots: int = 1
    stream_id: int = 0

    def payload(self) -> bytes:
        return _json(
            {
                "version": self.version,
                "session_id": self.session_id,
                "sidecar_version": self.sidecar_version,
                "app_ports": list(self.app_ports),
                "outgoing": list(self.outgoing),
                "dns_search": list(self.dns_search),
                "dns_ndots": self.dns_ndots,
            }
        )

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Self:
        obj = _unjson(cls.TYPE, payload)
        ports = obj.get("app_ports")
        if not isinstance(ports, list) or not all(isinstance(p, int) for p in ports):
            raise ProtocolError("WELCOME.app_ports missing or not a list of ports")
        outgoing = obj.get("outgoing", [])
        search = obj.get("dns_search", [])
        ndots = obj.get("dns_ndots", 1)
        if not all(isinstance(x, list) and all(isinstance(v, str) for v in x)
                   for x in (outgoing, search)):  # fmt: skip
            raise ProtocolError("WELCOME.outgoing and .dns_search must be lists of strings")
        if not isinstance(ndots, int) or isinstance(ndots, bool):
            raise ProtocolError("WELCOME.dns_ndots not int")
        return cls(
            _field(cls.TYPE, obj, "version", int),
            _field(cls.TYPE, obj, "session_id", str),
            _field(cls.TYPE, obj, "sidecar_version", str),
            tuple(ports),
            tuple(outgoing),
            tuple(search),
            ndots,
        )


@dataclass(frozen=True, slots=True)
class Refused:
    TYPE: ClassVar[FrameType] = FrameType.REFUSED
    code: str
    message: str
    stream_id: int = 0

    def payload(self) -> bytes:
        return _json({"code": self.code, "message": self.message})

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Self:
        obj = _unjson(cls.TYPE, payload)
        return cls(_field(cls.TYPE, obj, "code", str), _field(cls.TYPE, obj, "message", str))


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request the sidecar hands over. `mirror`: a copy; the answer is discarded.

    `http2`: the caller spoke HTTP/2 (gRPC does); the local side should too, so
    that trailers and full-duplex streams carry over. `authority` is then its
    `:authority`. `upgrade`: an HTTP/1.1 `Upgrade:` request (e.g. "websocket");
    after a 101 answer, DATA carries the new protocol's bytes both ways and END
    half-closes a direction."""

    TYPE: ClassVar[FrameType] = FrameType.REQUEST_HEAD
    stream_id: int
    method: str
    target: str
    headers: Headers
    port: int
    client_addr: str = ""
    mirror: bool = False
    end_stream: bool = False
    http2: bool = False
    authority: str = ""
    upgrade: str = ""

    def __post_init__(self) -> None:
        if self.stream_id <= 0:
            raise ValueError("REQUEST_HEAD needs a stream id > 0")
        if not self.method or not self.target:
            raise ValueError("REQUEST_HEAD needs a method and a target")

    def payload(self) -> bytes:
        return _json(
            {
                "method": self.method,
                "target": self.target,
                "headers": _enc_headers(self.headers),
                "port": self.port,
                "client": self.client_addr,
                "mirror": self.mirror,
                "end": self.end_stream,
                "http2": self.http2,
                "authority": self.authority,
                "upgrade": self.upgrade,
            }
        )

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Self:
        obj = _unjson(cls.TYPE, payload)
        try:
            return cls(
                stream_id,
                _field(cls.TYPE, obj, "method", str),
                _field(cls.TYPE, obj, "target", str),
                _dec_headers(cls.TYPE, obj.get("headers")),
                _field(cls.TYPE, obj, "port", int),
                str(obj.get("client", "")),
                bool(obj.get("mirror", False)),
                bool(obj.get("end", False)),
                bool(obj.get("http2", False)),
                str(obj.get("authority", "")),
                str(obj.get("upgrade", "")),
            )
        except ValueError as e:
            raise ProtocolError(str(e)) from e


@dataclass(frozen=True, slots=True)
class ResponseHead:
    TYPE: ClassVar[FrameType] = FrameType.RESPONSE_HEAD
    stream_id: int
    status: int
    headers: Headers
    reason: str = ""
    end_stream: bool = False

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 999:
            raise ValueError(f"RESPONSE_HEAD status {self.status} is not an HTTP status")

    def payload(self) -> bytes:
        return _json(
            {
                "status": self.status,
                "reason": self.reason,
                "headers": _enc_headers(self.headers),
                "end": self.end_stream,
            }
        )

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Self:
        obj = _unjson(cls.TYPE, payload)
        try:
            return cls(
                stream_id,
                _field(cls.TYPE, obj, "status", int),
                _dec_headers(cls.TYPE, obj.get("headers")),
                str(obj.get("reason", "")),
                bool(obj.get("end", False)),
            )
        except ValueError as e:
            raise ProtocolError(str(e)) from e


@dataclass(frozen=True, slots=True)
class Data:
    TYPE: ClassVar[FrameType] = FrameType.DATA
    stream_id: int
    data: bytes

    def __post_init__(self) -> None:
        if len(self.data) > MAX_DATA:
            raise ValueError(f"DATA carries at most {MAX_DATA} bytes, got {len(self.data)}")

    def payload(self) -> bytes:
        return self.data

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Self:
        if len(payload) > MAX_DATA:
            raise ProtocolError(f"DATA frame of {len(payload)} bytes exceeds {MAX_DATA}")
        return cls(stream_id, payload)


@dataclass(frozen=True, slots=True)
class End:
    TYPE: ClassVar[FrameType] = FrameType.END
    stream_id: int
    trailers: Headers = ()

    def payload(self) -> bytes:
        return _json({"trailers": _enc_headers(self.trailers)}) if self.trailers else b""

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Self:
        if not payload:
            return cls(stream_id)
        obj = _unjson(cls.TYPE, payload)
        return cls(stream_id, _dec_headers(cls.TYPE, obj.get("trailers", [])))


@dataclass(frozen=True, slots=True)
class Reset:
    TYPE: ClassVar[FrameType] = FrameType.RESET
    stream_id: int
    code: ResetCode
    message: str = ""

    def payload(self) -> bytes:
        return _json({"code": int(self.code), "message": self.message})

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Self:
        obj = _unjson(cls.TYPE, payload)
        raw = _field(cls.TYPE, obj, "code", int)
        code = ResetCode(raw) if raw in ResetCode._value2member_map_ else ResetCode.INTERNAL
        return cls(stream_id, code, str(obj.get("message", "")))


@dataclass(frozen=True, slots=True)
class WindowUpdate:
    TYPE: ClassVar[FrameType] = FrameType.WINDOW_UPDATE
    stream_id: int
    increment: int

    def __post_init__(self) -> None:
        if not 0 < self.increment < 2**31:
            raise ValueError(f"WINDOW_UPDATE increment {self.increment} out of range")

    def payload(self) -> bytes:
        return self.increment.to_bytes(4, "big")

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Self:
        if len(payload) != 4:
            raise ProtocolError("WINDOW_UPDATE payload must be 4 bytes")
        try:
            return cls(stream_id, int.from_bytes(payload, "big"))
        except ValueError as e:
            raise ProtocolError(str(e)) from e


@dataclass(frozen=True, slots=True)
class Connect:
    """The client asks for a TCP connection (or, `protocol` "udp", a UDP flow) from
    the pod to `host`:`port`; `host` is a name (resolved in the pod) or an IP address."""

    TYPE: ClassVar[FrameType] = FrameType.CONNECT
    stream_id: int
    host: str
    port: int
    protocol: str = "tcp"

    def __post_init__(self) -> None:
        if not self.host or len(self.host) > 255:
            raise ValueError("CONNECT needs a host of 1 to 255 characters")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"CONNECT port {self.port} is not a port number")
        if self.protocol not in ("tcp", "udp"):
            raise ValueError(f"CONNECT protocol {self.protocol!r} is neither tcp nor udp")

    def payload(self) -> bytes:
        body: dict[str, object] = {"host": self.host, "port": self.port}
        if self.protocol != "tcp":
            body["protocol"] = self.protocol
        return _json(body)

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Self:
        obj = _unjson(cls.TYPE, payload)
        try:
            return cls(
                stream_id,
                _field(cls.TYPE, obj, "host", str),
                _field(cls.TYPE, obj, "port", int),
                _field(cls.TYPE, obj, "protocol", str) if "protocol" in obj else "tcp",
            )
        except ValueError as e:
            raise ProtocolError(str(e)) from e


MAX_DATAGRAM = 65535
"""Largest datagram a UDP flow carries (its u16 length prefix's limit)."""


def frame_datagram(datagram: bytes) -> bytes:
    """One datagram as a UDP flow's DATA carries it: u16 length, then the bytes."""
    if len(datagram) > MAX_DATAGRAM:
        raise ValueError(f"a datagram has at most {MAX_DATAGRAM} bytes, got {len(datagram)}")
    return len(datagram).to_bytes(2, "big") + datagram


class Datagrams:
    """Reassembles a UDP flow's datagrams from its DATA, however the bytes were cut."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        out = []
        while len(self._buffer) >= 2:
            size = int.from_bytes(self._buffer[:2], "big")
            if len(self._buffer) < 2 + size:
                break
            out.append(bytes(self._buffer[2 : 2 + size]))
            del self._buffer[: 2 + size]
        return out


@dataclass(frozen=True, slots=True)
class Connected:
    """The sidecar's connection for a CONNECT is open; `address` is where it went
    (the resolved IP address and port)."""

    TYPE: ClassVar[FrameType] = FrameType.CONNECTED
    stream_id: int
    address: str

    def payload(self) -> bytes:
        return _json({"address": self.address})

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Self:
        return cls(stream_id, str(_unjson(cls.TYPE, payload).get("address", "")))


MAX_DNS = 65535
"""Largest DNS message (the TCP length prefix's limit)."""


@dataclass(frozen=True, slots=True)
class _DnsMessage:
    """A DNS message as on the wire; DnsQuery and DnsAnswer differ only in TYPE."""

    TYPE: ClassVar[FrameType]
    stream_id: int
    message: bytes

    def __post_init__(self) -> None:
        if not 12 <= len(self.message) <= MAX_DNS:
            raise ValueError(f"a DNS message has 12 to {MAX_DNS} bytes, got {len(self.message)}")

    def payload(self) -> bytes:
        return self.message

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Self:
        try:
            return cls(stream_id, payload)
        except ValueError as e:
            raise ProtocolError(str(e)) from e


@dataclass(frozen=True, slots=True)
class DnsQuery(_DnsMessage):
    """One DNS message, as on the wire, for the pod's nameservers."""

    TYPE: ClassVar[FrameType] = FrameType.DNS_QUERY


@dataclass(frozen=True, slots=True)
class DnsAnswer(_DnsMessage):
    """The pod's nameserver's answer to a DNS_QUERY, as on the wire."""

    TYPE: ClassVar[FrameType] = FrameType.DNS_ANSWER


@dataclass(frozen=True, slots=True)
class Stats:
    """Counters the sidecar reports to the client: mirror copies it dropped, and
    matches of the session's filter that ran out of time (those requests went to
    the app). `match_timeouts` may be absent (older sidecars): 0."""

    TYPE: ClassVar[FrameType] = FrameType.STATS
    mirror_dropped: int
    match_timeouts: int = 0
    stream_id: int = 0

    def payload(self) -> bytes:
        return _json({"mirror_dropped": self.mirror_dropped, "match_timeouts": self.match_timeouts})

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Self:
        obj = _unjson(cls.TYPE, payload)
        timeouts = obj.get("match_timeouts", 0)
        if not isinstance(timeouts, int) or isinstance(timeouts, bool):
            raise ProtocolError(f"{cls.TYPE.name}.match_timeouts not int")
        return cls(_field(cls.TYPE, obj, "mirror_dropped", int), timeouts)


@dataclass(frozen=True, slots=True)
class Goodbye:
    """The sender ends the session on purpose; `reason` is for people."""

    TYPE: ClassVar[FrameType] = FrameType.GOODBYE
    reason: str
    stream_id: int = 0

    def payload(self) -> bytes:
        return _json({"reason": self.reason})

    @classmethod
    def parse(cls, stream_id: int, payload: bytes) -> Self:
        return cls(str(_unjson(cls.TYPE, payload).get("reason", "")))


Message = (
    Hello
    | Welcome
    | Refused
    | RequestHead
    | ResponseHead
    | Data
    | End
    | Reset
    | WindowUpdate
    | Connect
    | Connected
    | DnsQuery
    | DnsAnswer
    | Stats
    | Goodbye
)

_PARSERS: dict[FrameType, Any] = {
    m.TYPE: m
    for m in (
        Hello,
        Welcome,
        Refused,
        RequestHead,
        ResponseHead,
        Data,
        End,
        Reset,
        WindowUpdate,
        Connect,
        Connected,
        DnsQuery,
        DnsAnswer,
        Stats,
        Goodbye,
    )
}
_CONTROL = {
    FrameType.HELLO,
    FrameType.WELCOME,
    FrameType.REFUSED,
    FrameType.STATS,
    FrameType.GOODBYE,
}


def encode(message: Message) -> bytes:
    payload = message.payload()
    return _HEADER.pack(len(payload) + 5, message.TYPE, message.stream_id) + payload


def decode_frame(buffer: bytes | bytearray, offset: int = 0) -> tuple[Message, int] | None:
    """Decode the frame at `offset`; return it and the offset after it, or None if
    the buffer does not yet hold a whole frame."""
    if len(buffer) - offset < _HEADER.size:
        return None
    length, raw_type, stream_id = _HEADER.unpack_from(buffer, offset)
    if length < 5 or length > MAX_FRAME:
        raise ProtocolError(f"frame length {length} outside 5..{MAX_FRAME}")
    end = offset + 4 + length
    if len(buffer) < end:
        return None
    try:
        frame_type = FrameType(raw_type)
    except ValueError as e:
        raise ProtocolError(f"unknown frame type 0x{raw_type:02x}") from e
    if (frame_type in _CONTROL) != (stream_id == 0):
        raise ProtocolError(f"{frame_type.name} on stream {stream_id} is not allowed")
    payload = bytes(buffer[offset + _HEADER.size : end])
    return _PARSERS[frame_type].parse(stream_id, payload), end


# --- state ------------------------------------------------------------------------


class ConnState(Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


class Half(Enum):
    IDLE = "idle"
    OPEN = "open"
    DONE = "done"


class StreamKind(Enum):
    HTTP = "http"
    CONNECT = "connect"
    DNS = "dns"


# (half state, frame type) -> next half state. A RESET ends both halves and is
# handled apart; anything not in this table is a protocol error.
_HALF_TRANSITIONS: dict[tuple[Half, FrameType], Half] = {
    (Half.IDLE, FrameType.REQUEST_HEAD): Half.OPEN,
    (Half.IDLE, FrameType.RESPONSE_HEAD): Half.OPEN,
    (Half.IDLE, FrameType.CONNECT): Half.OPEN,
    (Half.IDLE, FrameType.CONNECTED): Half.OPEN,
    (Half.IDLE, FrameType.DNS_QUERY): Half.DONE,
    (Half.IDLE, FrameType.DNS_ANSWER): Half.DONE,
    (Half.OPEN, FrameType.DATA): Half.OPEN,
    (Half.OPEN, FrameType.END): Half.DONE,
}

# Head frame -> (the stream kind it belongs to, the role that sends it, whether it
# opens the stream). The opener of a stream id is fixed by its parity.
_HEADS: dict[FrameType, tuple[StreamKind, Role, bool]] = {
    FrameType.REQUEST_HEAD: (StreamKind.HTTP, Role.SIDECAR, True),
    FrameType.RESPONSE_HEAD: (StreamKind.HTTP, Role.CLIENT, False),
    FrameType.CONNECT: (StreamKind.CONNECT, Role.CLIENT, True),
    FrameType.CONNECTED: (StreamKind.CONNECT, Role.SIDECAR, False),
    FrameType.DNS_QUERY: (StreamKind.DNS, Role.CLIENT, True),
    FrameType.DNS_ANSWER: (StreamKind.DNS, Role.SIDECAR, False),
}
_OPENERS = {t for t, (_, _, opens) in _HEADS.items() if opens}


def _opener(stream_id: int) -> Role:
    return Role.SIDECAR if stream_id % 2 else Role.CLIENT


@dataclass(slots=True)
class _Stream:
    kind: StreamKind
    sent: Half = Half.IDLE
    received: Half = Half.IDLE
    send_window: int = INITIAL_WINDOW
    recv_window: int = INITIAL_WINDOW
    unacked: int = 0

    @property
    def finished(self) -> bool:
        return self.sent is Half.DONE and self.received is Half.DONE


@dataclass
class Connection:
    """One end of a tunnel. Feed it bytes, read events and bytes to send."""

    role: Role
    state: ConnState = ConnState.HANDSHAKE
    _streams: dict[int, _Stream] = field(default_factory=dict)
    _inbuf: bytearray = field(default_factory=bytearray)
    _out: list[bytes] = field(default_factory=list)
    _events: deque[Message] = field(default_factory=deque)
    _last_ids: dict[Role, int] = field(default_factory=lambda: {Role.SIDECAR: 0, Role.CLIENT: 0})
    goodbye_sent: bool = False
    goodbye_received: bool = False

    @property
    def accepting_streams(self) -> bool:
        """Whether this end may still open streams on this connection."""
        return self.state is ConnState.OPEN and not (self.goodbye_sent or self.goodbye_received)

    # -- sending ----------------------------------------------------------------

    def next_stream_id(self) -> int:
        """The id of the next stream this end opens: odd for the sidecar, even for
        the client."""
        last = self._last_ids[self.role]
        if last:
            return last + 2
        return 1 if self.role is Role.SIDECAR else 2

    def send(self, message: Message) -> bool:
        """Queue `message` for sending, checking state and flow control.

        Returns False, sending nothing, when the message is for a stream that has
        already ended (typically reset by the peer while we were producing it)."""
        self._check_handshake(message, outgoing=True)
        if message.stream_id and not self._on_stream_frame(message, outgoing=True):
            return False
        self._out.append(encode(message))
        return True

    def send_window(self, stream_id: int) -> int:
        """How many DATA bytes may be sent on the stream now (0 if it is gone)."""
        stream = self._streams.get(stream_id)
        return stream.send_window if stream is not None and stream.sent is Half.OPEN else 0

    def acknowledge(self, stream_id: int, n: int) -> bool:
        """The application has passed on `n` received bytes; give the credit back.
        Returns whether a WINDOW_UPDATE was queued.

        Updates are batched (a quarter window at a time) to keep frames few."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.received is not Half.OPEN or n <= 0:
            return False
        stream.unacked += n
        if stream.unacked < INITIAL_WINDOW // 4:
            return False
        increment, stream.unacked = stream.unacked, 0
        stream.recv_window += increment
        self._out.append(encode(WindowUpdate(stream_id, increment)))
        return True

    def data_to_send(self, limit: int = MAX_MESSAGE) -> bytes:
        """The next websocket message: whole frames, at most `limit` bytes of them
        (call again until it returns b"")."""
        size = taken = 0
        for frame in self._out:
            if taken and size + len(frame) > limit:
                break
            size += len(frame)
            taken += 1
        out = b"".join(self._out[:taken])
        del self._out[:taken]
        return out

    def is_active(self, stream_id: int) -> bool:
        return stream_id in self._streams

    @property
    def active_streams(self) -> list[int]:
        return list(self._streams)

    # -- receiving --------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Parse whole frames out of `data` (plus what was left before) into events.
        Raises ProtocolError when the peer breaks the protocol."""
        if self.state is ConnState.CLOSED:
            return
        self._inbuf += data
        offset = 0
        try:
            while (decoded := decode_frame(self._inbuf, offset)) is not None:
                message, offset = decoded
                self._receive(message)
        finally:
            del self._inbuf[:offset]

    def next_event(self) -> Message | None:
        return self._events.popleft() if self._events else None

    def _receive(self, message: Message) -> None:
        self._check_handshake(message, outgoing=False)
        if message.stream_id and not self._on_stream_frame(message, outgoing=False):
            return  # a late frame for a stream already reset: dropped
        self._events.append(message)

    # -- rules ------------------------------------------------------------------

    def _check_handshake(self, message: Message, *, outgoing: bool) -> None:
        sender = self.role if outgoing else _other(self.role)
        kind = message.TYPE
        if self.state is ConnState.CLOSED:
            raise ProtocolError(f"{kind.name} after the tunnel closed")
        if self.state is ConnState.HANDSHAKE:
            allowed = {
                Role.CLIENT: {FrameType.HELLO},
                Role.SIDECAR: {FrameType.WELCOME, FrameType.REFUSED},
            }[sender]
            if kind not in allowed:
                raise ProtocolError(f"{kind.name} from the {sender.value} before the handshake")
            if kind is FrameType.WELCOME:
                self.state = ConnState.OPEN
            elif kind is FrameType.REFUSED:
                self.state = ConnState.CLOSED
                if not outgoing:
                    assert isinstance(message, Refused)
                    raise HandshakeRefused(message.code, message.message)
            return
        if kind in (FrameType.HELLO, FrameType.WELCOME, FrameType.REFUSED):
            raise ProtocolError(f"{kind.name} after the handshake")
        if kind in _HEADS and _HEADS[kind][1] is not sender:
            raise ProtocolError(f"only the {_HEADS[kind][1].value} sends {kind.name}")
        if kind is FrameType.STATS and sender is not Role.SIDECAR:
            raise ProtocolError("only the sidecar sends STATS")
        if kind in _OPENERS:
            if outgoing and (self.goodbye_sent or self.goodbye_received):
                raise ProtocolError(f"the {sender.value} opens no stream after GOODBYE")
            if not outgoing and self.goodbye_received:
                # Frames arrive in order, so this head came after the peer's
                # GOODBYE. (One that arrives after our own GOODBYE merely crossed
                # it; the application answers it.)
                raise ProtocolError(f"{kind.name} after the {sender.value}'s GOODBYE")
        if kind is FrameType.GOODBYE:
            if outgoing:
                if self.goodbye_sent:
                    raise ProtocolError("GOODBYE sent twice")
                self.goodbye_sent = True
            else:
                if self.goodbye_received:
                    raise ProtocolError("GOODBYE received twice")
                self.goodbye_received = True

    def _on_stream_frame(self, message: Message, *, outgoing: bool) -> bool:
        """Apply a stream frame to the stream's state. Returns False for a frame
        that belongs to a stream already gone (ended or reset): it is dropped."""
        sid = message.stream_id
        kind = message.TYPE
        stream = self._streams.get(sid)
        opener = _opener(sid)
        if stream is None:
            if kind in _OPENERS:
                sender = self.role if outgoing else _other(self.role)
                if opener is not sender:
                    raise ProtocolError(
                        f"{kind.name} on stream {sid}: the {sender.value} opens "
                        f"{'odd' if sender is Role.SIDECAR else 'even'} stream ids"
                    )
                if sid <= self._last_ids[opener]:
                    raise ProtocolError(f"stream id {sid} reused or out of order")
                self._last_ids[opener] = sid
                stream = self._streams[sid] = _Stream(_HEADS[kind][0])
            elif sid <= self._last_ids[opener]:
                # The stream ended (or was reset) while this frame was in flight.
                return False
            else:
                raise ProtocolError(f"{kind.name} on stream {sid}, which was never opened")

        if isinstance(message, Reset):
            del self._streams[sid]
            return True
        if isinstance(message, WindowUpdate):
            if not outgoing:
                stream.send_window += message.increment
            return True
        if kind in _HEADS and _HEADS[kind][0] is not stream.kind:
            raise ProtocolError(f"{kind.name} on {stream.kind.value} stream {sid}")

        half = "sent" if outgoing else "received"
        current: Half = getattr(stream, half)
        new = _HALF_TRANSITIONS.get((current, kind))
        if new is None:
            raise ProtocolError(f"{kind.name} on stream {sid} whose {half} half is {current.value}")
        if isinstance(message, Data):
            size = len(message.data)
            if outgoing:
                if size > stream.send_window:
                    raise FlowControlError(
                        f"{size} bytes on stream {sid} exceed its window of {stream.send_window}"
                    )
                stream.send_window -= size
            else:
                if size > stream.recv_window:
                    raise ProtocolError(f"peer overran the window of stream {sid}")
                stream.recv_window -= size
        if isinstance(message, RequestHead | ResponseHead) and message.end_stream:
            new = Half.DONE
        setattr(stream, half, new)
        if stream.finished:
            del self._streams[sid]
        return True


def _other(role: Role) -> Role:
    return Role.CLIENT if role is Role.SIDECAR else Role.SIDECAR
