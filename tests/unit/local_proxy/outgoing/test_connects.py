"""What the connect() supervisor reads from a held call, and what its helper and
offramp tell each other about it, for IPv4 and IPv6 alike."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from local_proxy.outgoing.connects import Call, _destination, ask, forget, parse_message


def sockaddr_in(address: str, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(address)


def sockaddr_in6(address: str, port: int) -> bytes:
    packed = socket.inet_pton(socket.AF_INET6, address)
    return struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0) + packed + bytes(4)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (sockaddr_in("10.96.0.10", 443), ("10.96.0.10", 443)),
        (sockaddr_in6("fd00:10::5", 8080), ("fd00:10::5", 8080)),
        # A v4-mapped address on an IPv6 socket leaves as IPv4.
        (sockaddr_in6("::ffff:10.1.2.3", 80), ("10.1.2.3", 80)),
        # Loopback is the namespace's own: never held.
        (sockaddr_in("127.0.0.1", 80), None),
        (sockaddr_in6("::1", 80), None),
        (sockaddr_in6("::ffff:127.0.0.1", 80), None),
        (struct.pack("=H", socket.AF_UNIX) + bytes(14), None),
        (sockaddr_in6("fd00::1", 80)[:20], None),  # cut short
    ],
)
def test_the_destination_of_a_held_call(raw: bytes, expected: tuple[str, int] | None) -> None:
    assert _destination(raw) == expected


@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).filter(
        lambda a: a.version == 4 or a.ipv4_mapped is None
    ),
    st.integers(0, 65535),
    st.integers(0, 2**64 - 1),
)
def test_asks_and_forgets_carry_either_family(address: object, port: int, notif_id: int) -> None:
    host = str(address)
    assert parse_message(ask(Call(notif_id, host, port))) == Call(notif_id, host, port)
    assert parse_message(forget(host, port)) == (host, port)
