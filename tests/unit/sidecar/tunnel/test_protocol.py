"""The sans-I/O tunnel protocol: round trips, state rules, flow control, malformed frames."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.tunnel.protocol import (
    INITIAL_WINDOW,
    MAX_DATA,
    MAX_DATAGRAM,
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    Connect,
    Connected,
    Connection,
    Data,
    Datagrams,
    DnsAnswer,
    DnsQuery,
    End,
    FlowControlError,
    FrameType,
    Goodbye,
    HandshakeRefused,
    Hello,
    Message,
    ProtocolError,
    Refused,
    RequestHead,
    Reset,
    ResetCode,
    ResponseHead,
    Role,
    Stats,
    Welcome,
    WindowUpdate,
    decode_frame,
    encode,
    frame_datagram,
)

pytestmark = pytest.mark.timeout(10)

HEADERS = ((b"Host", b"svc"), (b"x-bin", bytes(range(128, 256))))

MESSAGES: list[Message] = [
    Hello(PROTOCOL_VERSION, "tok", {"mode": "steal"}),
    Welcome(PROTOCOL_VERSION, "s1", "0.1.0", (80,), ("tcp", "dns"), ("default.svc",), 5),
    Connect(2, "payment-service.default", 8080),
    Connect(6, "statsd.monitoring", 8125, "udp"),
    Connected(2, "10.96.0.7:8080"),
    DnsQuery(4, bytes(12) + b"\x00"),
    DnsAnswer(4, bytes(20)),
    Welcome(PROTOCOL_VERSION, "s1", "0.1.0", (8080, 9090)),
    Refused("unauthorized", "no"),
    RequestHead(1, "POST", "/a?b=1", HEADERS, 8080, "10.0.0.1:5555", True, True),
    ResponseHead(3, 204, HEADERS, "No Content", True),
    Data(5, b"\x00" * MAX_DATA),
    End(7),
    End(7, ((b"grpc-status", b"0"),)),
    Reset(9, ResetCode.TIMEOUT, "slow"),
    WindowUpdate(11, 1234),
    Stats(42),
    Stats(42, 7),
    Goodbye("bye"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: Message) -> None:
    decoded = decode_frame(encode(message))
    assert decoded is not None
    assert decoded[0] == message


def test_frames_split_anywhere_reassemble() -> None:
    sidecar, client = pair()
    sidecar.send(RequestHead(1, "GET", "/", HEADERS, 80))
    sidecar.send(Data(1, b"abc" * 1000))
    sidecar.send(End(1))
    wire = sidecar.data_to_send()
    for i in range(0, len(wire), 7):
        client.receive_data(wire[i : i + 7])
    events = drain(client)
    assert [type(e) for e in events] == [RequestHead, Data, End]
    assert isinstance(events[1], Data) and events[1].data == b"abc" * 1000


def pair() -> tuple[Connection, Connection]:
    sidecar, client = Connection(Role.SIDECAR), Connection(Role.CLIENT)
    client.send(Hello(PROTOCOL_VERSION, "t", {}))
    sidecar.receive_data(client.data_to_send())
    assert isinstance(sidecar.next_event(), Hello)
    sidecar.send(Welcome(PROTOCOL_VERSION, "s1", "x", (80,)))
    client.receive_data(sidecar.data_to_send())
    assert isinstance(client.next_event(), Welcome)
    return sidecar, client


def drain(conn: Connection) -> list[Message]:
    out = []
    while (e := conn.next_event()) is not None:
        out.append(e)
    return out


def test_full_exchange_closes_the_stream_on_both_sides() -> None:
    sidecar, client = pair()
    sidecar.send(RequestHead(sidecar.next_stream_id(), "GET", "/", (), 80, end_stream=True))
    client.receive_data(sidecar.data_to_send())
    (head,) = drain(client)
    assert isinstance(head, RequestHead) and head.stream_id == 1
    client.send(ResponseHead(1, 200, ()))
    client.send(Data(1, b"ok"))
    client.send(End(1))
    assert not client.is_active(1)
    sidecar.receive_data(client.data_to_send())
    assert [type(e) for e in drain(sidecar)] == [ResponseHead, Data, End]
    assert not sidecar.is_active(1)
    assert sidecar.next_stream_id() == 3  # the sidecar opens odd ids


def test_refused_handshake_raises_with_code() -> None:
    sidecar, client = Connection(Role.SIDECAR), Connection(Role.CLIENT)
    client.send(Hello(PROTOCOL_VERSION, "bad", {}))
    sidecar.receive_data(client.data_to_send())
    sidecar.send(Refused("unauthorized", "the token does not match"))
    with pytest.raises(HandshakeRefused) as e:
        client.receive_data(sidecar.data_to_send())
    assert e.value.code == "unauthorized"


def test_hello_of_any_version_parses_so_the_answer_can_be_clear() -> None:
    frame = struct.pack("!IBI", 5 + 14, 0x01, 0) + b'{"version": 7}'
    decoded = decode_frame(frame)
    assert decoded is not None and decoded[0] == Hello(7, "", {})


def test_flow_control_blocks_sender_until_window_update() -> None:
    sidecar, client = pair()
    sidecar.send(RequestHead(1, "POST", "/", (), 80))
    sent = 0
    while sidecar.send_window(1):
        n = min(MAX_DATA, sidecar.send_window(1))
        sidecar.send(Data(1, b"x" * n))
        sent += n
    assert sent == INITIAL_WINDOW
    with pytest.raises(FlowControlError):
        sidecar.send(Data(1, b"x"))
    client.receive_data(sidecar.data_to_send())
    drain(client)
    assert not client.acknowledge(1, INITIAL_WINDOW // 8)
    assert client.data_to_send() == b""  # batched: not yet a quarter window
    assert client.acknowledge(1, INITIAL_WINDOW // 8)  # a WINDOW_UPDATE is queued
    sidecar.receive_data(client.data_to_send())
    assert [type(e) for e in drain(sidecar)] == [WindowUpdate]
    assert sidecar.send_window(1) == INITIAL_WINDOW // 4


def test_peer_overrunning_the_window_is_a_protocol_error() -> None:
    _, client = pair()
    wire = encode(RequestHead(1, "POST", "/", (), 80))
    wire += b"".join(
        encode(Data(1, b"x" * MAX_DATA)) for _ in range(INITIAL_WINDOW // MAX_DATA + 1)
    )
    with pytest.raises(ProtocolError, match="overran the window"):
        client.receive_data(wire)


def test_late_frames_for_a_reset_stream_are_dropped_not_errors() -> None:
    sidecar, client = pair()
    sidecar.send(RequestHead(1, "GET", "/", (), 80))
    client.receive_data(sidecar.data_to_send())
    drain(client)
    client.send(Reset(1, ResetCode.UNREACHABLE, "no local app"))
    sidecar.send(Data(1, b"late"))  # crossed the RESET on the wire
    client.receive_data(sidecar.data_to_send())
    assert drain(client) == []
    assert client.send(Data(1, b"x")) is False


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (struct.pack("!IBI", 4, 0x12, 1), "frame length"),
        (struct.pack("!IBI", 5 + 2, 0x7F, 1) + b"{}", "unknown frame type"),
        (struct.pack("!IBI", 5 + 2, 0x01, 3) + b"{}", "HELLO on stream 3"),
        (struct.pack("!IBI", 5, 0x12, 0), "DATA on stream 0"),
        (struct.pack("!IBI", 5 + 3, 0x01, 0) + b"{x}", "not JSON"),
        (struct.pack("!IBI", 5 + 2, 0x01, 0) + b"[]", "not a JSON object"),
        (struct.pack("!IBI", 0x7FFFFFFF, 0x12, 1), "frame length"),
        (struct.pack("!IBI", 5 + 3, 0x15, 1) + b"abc", "4 bytes"),
        (encode(WindowUpdate(1, 1))[:9] + (0).to_bytes(4, "big"), "out of range"),
    ],
)
def test_malformed_frames_are_protocol_errors(wire: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        decode_frame(wire)


@pytest.mark.parametrize(
    ("frames", "error"),
    [
        ([RequestHead(1, "GET", "/", (), 80)], "before the handshake"),
    ],
)
def test_nothing_before_the_handshake(frames: list[Message], error: str) -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(ProtocolError, match=error):
        client.receive_data(b"".join(encode(f) for f in frames))


def test_rule_violations_after_handshake() -> None:
    sidecar, client = pair()
    with pytest.raises(ProtocolError, match="only the sidecar sends REQUEST_HEAD"):
        sidecar.receive_data(encode(RequestHead(1, "GET", "/", (), 80)))
    _, client = pair()
    with pytest.raises(ProtocolError, match="never opened"):
        client.receive_data(encode(Data(5, b"x")))
    _, client = pair()
    client.receive_data(encode(RequestHead(3, "GET", "/", (), 80)))
    with pytest.raises(ProtocolError, match="reused or out of order"):
        client.receive_data(encode(RequestHead(1, "GET", "/", (), 80)))
    _, client = pair()
    with pytest.raises(ProtocolError, match="the sidecar opens odd stream ids"):
        client.receive_data(encode(RequestHead(2, "GET", "/", (), 80)))
    _, client = pair()
    client.receive_data(encode(RequestHead(1, "GET", "/", (), 80)) + encode(End(1)))
    with pytest.raises(ProtocolError, match="half is done"):
        client.receive_data(encode(Data(1, b"x")))
    _, client = pair()
    with pytest.raises(ProtocolError, match="after the handshake"):
        client.receive_data(encode(Welcome(1, "s", "v", (80,))))


def test_message_validation_at_construction() -> None:
    with pytest.raises(ValueError):
        Data(1, b"x" * (MAX_DATA + 1))
    with pytest.raises(ValueError):
        ResponseHead(1, 42, ())
    with pytest.raises(ValueError):
        RequestHead(0, "GET", "/", (), 80)
    with pytest.raises(ValueError):
        WindowUpdate(1, 0)


def test_after_goodbye_no_new_streams_but_open_ones_finish() -> None:
    sidecar, client = pair()
    sidecar.send(RequestHead(1, "GET", "/", (), 80, end_stream=True))
    client.receive_data(sidecar.data_to_send())
    drain(client)
    client.send(Goodbye("done"))
    sidecar.receive_data(client.data_to_send())
    assert drain(sidecar) == [Goodbye("done")]
    assert not sidecar.accepting_streams
    with pytest.raises(ProtocolError, match="no stream after GOODBYE"):
        sidecar.send(RequestHead(3, "GET", "/", (), 80))
    client.send(ResponseHead(1, 200, (), end_stream=True))  # the open stream finishes
    sidecar.receive_data(client.data_to_send())
    assert [type(e) for e in drain(sidecar)] == [ResponseHead]


def test_a_head_that_crossed_the_clients_goodbye_is_served() -> None:
    sidecar, client = pair()
    client.send(Goodbye("leaving"))
    sidecar.send(RequestHead(1, "GET", "/", (), 80))  # sent before it saw the GOODBYE
    client.receive_data(sidecar.data_to_send())
    assert [type(e) for e in drain(client)] == [RequestHead]


def test_a_head_after_the_sidecars_goodbye_is_an_error() -> None:
    _, client = pair()
    with pytest.raises(ProtocolError, match="after the sidecar's GOODBYE"):
        client.receive_data(encode(Goodbye("bye")) + encode(RequestHead(1, "GET", "/", (), 80)))


def test_messages_hold_whole_frames_up_to_the_limit() -> None:
    """A receiver may refuse websocket messages over MAX_MESSAGE: many streams'
    DATA never makes one larger, and no frame is split between two."""
    sidecar, client = pair()
    ids = []
    for _ in range(40):
        sid = sidecar.next_stream_id()
        sidecar.send(RequestHead(sid, "POST", "/", (), 80))
        ids.append(sid)
    for sid in ids:
        for _ in range(INITIAL_WINDOW // MAX_DATA):
            sidecar.send(Data(sid, b"x" * MAX_DATA))
    messages = []
    while message := sidecar.data_to_send():
        messages.append(message)
    assert len(messages) > 1
    assert all(len(m) <= MAX_MESSAGE for m in messages)
    for message in messages:
        client.receive_data(message)
        assert not client._inbuf  # each message ends on a frame boundary
    events = drain(client)
    assert sum(len(e.data) for e in events if isinstance(e, Data)) == 40 * INITIAL_WINDOW


def test_stats_from_a_sidecar_that_counts_no_filter_timeouts_reads_as_zero() -> None:
    payload = b'{"mirror_dropped": 3}'
    frame = (len(payload) + 5).to_bytes(4, "big") + bytes([FrameType.STATS]) + bytes(4) + payload
    decoded = decode_frame(frame)
    assert decoded is not None and decoded[0] == Stats(3, 0)


def test_a_connect_stream_carries_bytes_and_half_closes_both_ways() -> None:
    """The client opens even ids; the sidecar answers CONNECTED, then each side
    sends DATA and END on its own half, independently."""
    sidecar, client = pair()
    sid = client.next_stream_id()
    assert sid == 2
    client.send(Connect(sid, "payment-service", 8080))
    client.send(Data(sid, b"ping"))
    client.send(End(sid))  # the client half-closes before the answer comes
    sidecar.receive_data(client.data_to_send())
    assert drain(sidecar) == [Connect(2, "payment-service", 8080), Data(2, b"ping"), End(2)]
    sidecar.send(Connected(sid, "10.96.0.7:8080"))
    sidecar.send(Data(sid, b"pong"))
    sidecar.send(End(sid))
    assert not sidecar.is_active(sid)
    client.receive_data(sidecar.data_to_send())
    assert [type(e) for e in drain(client)] == [Connected, Data, End]
    assert not client.is_active(sid)
    assert client.next_stream_id() == 4


def test_a_dns_stream_is_one_query_and_one_answer() -> None:
    sidecar, client = pair()
    query = bytes(12) + b"\x07example\x00\x00\x01\x00\x01"
    client.send(DnsQuery(2, query))
    sidecar.receive_data(client.data_to_send())
    assert drain(sidecar) == [DnsQuery(2, query)]
    sidecar.send(DnsAnswer(2, query))
    assert not sidecar.is_active(2)
    client.receive_data(sidecar.data_to_send())
    assert drain(client) == [DnsAnswer(2, query)]
    assert not client.is_active(2)


@pytest.mark.parametrize(
    ("frames", "error"),
    [
        ([Connect(1, "h", 1)], "the client opens even stream ids"),
        ([Connect(2, "h", 1), ResponseHead(2, 200, ())], "RESPONSE_HEAD on connect stream 2"),
        ([DnsQuery(2, bytes(12)), Data(2, b"x")], "half is done"),
    ],
)
def test_outgoing_stream_rules(frames: list[Message], error: str) -> None:
    sidecar, _ = pair()
    with pytest.raises(ProtocolError, match=error):
        sidecar.receive_data(b"".join(encode(f) for f in frames))


def test_the_wrong_answer_kind_is_an_error() -> None:
    sidecar, client = pair()
    client.send(Connect(2, "h", 1))
    sidecar.receive_data(client.data_to_send())
    drain(sidecar)
    with pytest.raises(ProtocolError, match="DNS_ANSWER on connect stream 2"):
        sidecar.send(DnsAnswer(2, bytes(12)))


def test_outgoing_messages_validate_when_built() -> None:
    with pytest.raises(ValueError):
        Connect(2, "", 80)
    with pytest.raises(ValueError):
        Connect(2, "h", 70000)
    with pytest.raises(ValueError):
        Connect(2, "h", 80, "sctp")
    with pytest.raises(ValueError):
        DnsQuery(2, b"short")


def test_a_tcp_connect_says_no_protocol_so_older_sidecars_read_it_as_before() -> None:
    assert b"protocol" not in Connect(2, "h", 80).payload()
    assert Connect.parse(2, b'{"host": "h", "port": 80}') == Connect(2, "h", 80, "tcp")


@given(
    st.lists(st.binary(max_size=MAX_DATAGRAM), max_size=5).filter(
        lambda d: sum(map(len, d)) < 200_000
    ),
    st.lists(st.integers(1, 70_000), max_size=10),
)
def test_datagrams_come_out_as_they_went_in_however_the_bytes_are_cut(
    datagrams: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(map(frame_datagram, datagrams))
    pieces, at = [], 0
    for cut in cuts:
        pieces.append(stream[at : at + cut])
        at += cut
    pieces.append(stream[at:])
    reassembler = Datagrams()
    assert [d for piece in pieces for d in reassembler.feed(piece)] == datagrams


def test_a_datagram_larger_than_its_length_prefix_is_refused() -> None:
    with pytest.raises(ValueError):
        frame_datagram(bytes(MAX_DATAGRAM + 1))


def test_no_connect_after_goodbye() -> None:
    _, client = pair()
    client.send(Goodbye("leaving"))
    with pytest.raises(ProtocolError, match="no stream after GOODBYE"):
        client.send(Connect(client.next_stream_id(), "h", 80))
