"""The session server before a caller has shown the token: what it reads, how
many it waits for, and how it treats an address that keeps guessing. Against
the real sidecar (a subprocess) over real websockets on 127.0.0.1; the guessing
callers come from 127.0.0.2, so that a real session from 127.0.0.1 shows that
others are not slowed down."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from sidecar.tunnel.protocol import PROTOCOL_VERSION, Connection, HandshakeRefused, Hello, Role
from tests.support import HttpApp, SidecarProcess, open_session, raw_exchange

pytestmark = pytest.mark.timeout(90)

GUESSER = "127.0.0.2"
GUESSER_ROUTE = "127.0.0.1"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextlib.asynccontextmanager
async def websocket(
    sidecar: SidecarProcess, source: str = GUESSER
) -> AsyncIterator[ClientConnection]:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", sidecar.control_port))
    async with connect(f"{sidecar.control_url}/v1/tunnel", sock=sock, max_size=None) as ws:
        yield ws


def hello(token: str) -> bytes:
    conn = Connection(Role.CLIENT)
    conn.send(Hello(PROTOCOL_VERSION, token, {}))
    return conn.data_to_send()


async def closed_with(ws: ClientConnection) -> tuple[int | None, str | None]:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 15)
    return ws.close_code, ws.close_reason


def oversized_first_message(port: int, size: int) -> tuple[int, bytes]:
    """Open a websocket by hand and start one binary message of `size` bytes (a
    real client would not send on once the server has closed). Returns how many
    bytes of it went out and what the server sent after its 101."""
    with socket.create_connection((GUESSER_ROUTE, port), timeout=15) as s:
        s.sendall(
            b"GET /v1/tunnel HTTP/1.1\r\nHost: sidecar\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 101"), answer
        # FIN + binary; masked, 64-bit length; a zero mask leaves the payload as is.
        s.sendall(b"\x82\xff" + size.to_bytes(8, "big") + b"\0\0\0\0")
        sent = 0
        chunk = b"\0" * (1 << 20)
        with contextlib.suppress(OSError):
            while sent < size:
                sent += s.send(chunk)
        rest = answer.split(b"\r\n\r\n", 1)[1]
        with contextlib.suppress(OSError):
            while piece := s.recv(65536):
                rest += piece
        return sent, rest


async def test_a_first_message_over_the_hello_limit_is_not_read(sidecar: SidecarProcess) -> None:
    before = rss_kib(sidecar.proc.pid)
    peak = before
    size = 64 << 20
    sending = asyncio.gather(
        *(asyncio.to_thread(oversized_first_message, sidecar.control_port, size) for _ in range(4))
    )
    while not sending.done():
        peak = max(peak, rss_kib(sidecar.proc.pid))
        await asyncio.sleep(0.01)
    for _, rest in await sending:
        # Closed with 1009 (message too big); what came after was read and dropped.
        assert rest.startswith(b"\x88") and rest[2:4] == (1009).to_bytes(2, "big"), rest
    # Before, the sidecar read each first message whole.
    assert peak - before < 24 * 1024, (before, peak)


async def test_an_address_holds_only_a_few_handshakes_and_others_still_get_in(
    sidecar: SidecarProcess, local: HttpApp
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(8):  # MAX_HANDSHAKES_PER_ADDRESS, each waiting to send HELLO
            await stack.enter_async_context(websocket(sidecar))
        ninth = await stack.enter_async_context(websocket(sidecar))
        started = time.monotonic()
        assert (await closed_with(ninth))[0] == 1013  # try again later
        assert time.monotonic() - started < 2
        started = time.monotonic()
        async with open_session(sidecar, local.port):  # from 127.0.0.1
            assert time.monotonic() - started < 3


async def test_wrong_tokens_are_slowed_down_and_logged_in_aggregate(
    sidecar: SidecarProcess, local: HttpApp
) -> None:
    reasons = []
    for i in range(40):
        async with websocket(sidecar) as ws:
            await ws.send(hello(f"guess-{i}"))
            reasons.append((await closed_with(ws))[1])
    # Ten tries at once, then about one a second: the rest are refused unread.
    assert reasons[:10] == ["unauthorized"] * 10
    assert reasons.count("rate_limited") >= 25, reasons
    # Even the right token waits, from that address.
    async with websocket(sidecar) as ws:
        await ws.send(hello(sidecar.token))
        assert (await closed_with(ws))[1] == "rate_limited"
    started = time.monotonic()
    async with open_session(sidecar, local.port):  # 127.0.0.1 is not slowed down
        assert time.monotonic() - started < 3
    lines = [line for line in sidecar.log().splitlines() if GUESSER in line]
    assert 1 <= len(lines) <= 3, lines


@pytest.mark.parametrize(
    ("http_filter", "code", "says"),
    [
        ({"any_of": [{"header": f"^x-{i}: (a|b)+$"} for i in range(1000)]}, "bad_spec",
         "http_filter.any_of lists 1000 items; at most 32"),
        ({"header_filter": "^x: " + "a" * 5000}, "bad_spec",
         "http_filter.header_filter is 5004 characters long; a pattern may have at most 1024"),
        ({"all_of": [{"path": "^/"}, {"header": "((a{100}){100}){100}"}]}, "bad_filter",
         "http_filter.all_of[1].header: this pattern is too costly to compile"),
    ],
    ids=["1000 clauses", "long pattern", "costly pattern"],
)  # fmt: skip
async def test_a_spec_too_large_or_too_costly_is_refused_and_the_proxy_keeps_serving(
    sidecar: SidecarProcess, http_filter: dict[str, object], code: str, says: str
) -> None:
    conn = Connection(Role.CLIENT)
    conn.send(Hello(PROTOCOL_VERSION, sidecar.token, {"http_filter": http_filter}))
    served: list[float] = []

    async def keep_asking() -> None:  # the app's traffic while the spec is looked at
        while True:
            start = time.perf_counter()
            answer = await asyncio.to_thread(
                raw_exchange, sidecar.listen_port, b"GET / HTTP/1.1\r\nHost: a\r\n"
                b"Connection: close\r\n\r\n",
            )  # fmt: skip
            assert answer.startswith(b"HTTP/1.1 200")
            served.append(time.perf_counter() - start)

    asking = asyncio.create_task(keep_asking())
    try:
        async with websocket(sidecar, source="127.0.0.1") as ws:
            await ws.send(conn.data_to_send())
            with pytest.raises(HandshakeRefused) as refused:
                conn.receive_data(await asyncio.wait_for(ws.recv(), 15))
            assert (await closed_with(ws))[1] == code
        await asyncio.sleep(0.1)
    finally:
        asking.cancel()
    assert refused.value.code == code
    assert says in str(refused.value)
    assert served and max(served) < 1.0, served


@pytest.mark.parametrize("path", ["/v1/tunnel", "/healthz", "/v1/status", "/v1/env"])
def test_a_request_that_is_not_get_gets_405_not_a_closed_connection(
    sidecar: SidecarProcess, path: str
) -> None:
    answer = raw_exchange(
        sidecar.control_port,
        f"POST {path} HTTP/1.1\r\nHost: sidecar\r\nContent-Length: 0\r\n\r\n".encode(),
        10,
    )
    head = answer.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 405"), answer
    assert b"\r\nallow: get" in head
