"""Requests a careless or hostile caller writes, through the real sidecar and the
real local proxy: each one is either delivered byte for byte (to the app or to the
local process, whichever the filters choose) or refused with 400 before anyone
sees it; none is left without an answer."""

from __future__ import annotations

import asyncio

import pytest

from tests.support import HttpApp, SidecarProcess, header_spec, open_session, raw_exchange

pytestmark = pytest.mark.timeout(60)

ALICE = header_spec("^x-preview: alice$")


def request(target: bytes, *headers: bytes, body: bytes = b"", steal: bool = True) -> bytes:
    lines = [b"POST " + target + b" HTTP/1.1", b"Host: shop"]
    if steal:
        lines.append(b"X-Preview: alice")
    lines += [*headers, b"Content-Length: %d" % len(body), b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def exchange(sidecar: SidecarProcess, data: bytes) -> bytes:
    # Bounded: an unanswered request fails here instead of hanging the suite.
    return await asyncio.to_thread(raw_exchange, sidecar.listen_port, data, 15)


def header(app: HttpApp, name: str) -> str:
    values = [v for k, v in app.seen[-1].headers if k.lower() == name]
    assert len(values) == 1, app.seen[-1].headers
    return values[0]


class RawRecorder:
    """A local process that keeps each request's bytes as they arrived (the
    standard library's server would split a header at \\x0b or \\x0c, as
    str.splitlines does) and answers 200."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> RawRecorder:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n")
             if line.lower().startswith(b"content-length:")),
            0,
        )  # fmt: skip
        self.heads.append(head)
        self.bodies.append(await reader.readexactly(length))
        writer.write(b"HTTP/1.1 200 OK\r\nx-served-by: local\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()


@pytest.mark.parametrize("ctl", [b"\x01", b"\x08", b"\x0b", b"\x0c", b"\x1f", b"\x7f"])
async def test_a_control_character_in_a_header_reaches_the_local_process_as_sent(
    sidecar: SidecarProcess, app: HttpApp, ctl: bytes
) -> None:
    odd = b"X-Odd: a" + ctl + b"b"
    async with RawRecorder() as local, open_session(sidecar, local.port, ALICE):
        answer = await exchange(sidecar, request(b"/ctl", odd, body=b"hi"))
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert b"x-served-by: local" in answer.lower()
    [head] = local.heads
    assert head.startswith(b"POST /ctl HTTP/1.1\r\n"), head
    assert odd + b"\r\n" in head, head
    assert local.bodies == [b"hi"]
    assert app.seen == []


async def test_raw_bytes_in_the_target_and_headers_arrive_unchanged_on_both_paths(
    sidecar: SidecarProcess, app: HttpApp, local: HttpApp
) -> None:
    target = b"/caf\xe9/%C3%A9?q=\xff"
    latin1 = b"X-Name: Jos\xe9"
    async with open_session(sidecar, local.port, ALICE):
        stolen = await exchange(sidecar, request(target, latin1, body=b"abc"))
        passed = await exchange(sidecar, request(target, latin1, body=b"abc", steal=False))
    assert stolen.startswith(b"HTTP/1.1 200"), stolen
    assert passed.startswith(b"HTTP/1.1 200"), passed
    # The test apps read the request line and headers as latin-1: one char per byte.
    for seen_by in (local, app):
        assert len(seen_by.seen) == 1
        assert seen_by.seen[0].path == target.decode("latin-1")
        assert header(seen_by, "x-name") == "Jos\xe9"
        assert seen_by.seen[0].body_bytes == 3


async def test_a_chunked_body_with_an_odd_header_arrives_whole(
    sidecar: SidecarProcess, local: HttpApp
) -> None:
    data = (
        b"POST /chunked HTTP/1.1\r\nHost: shop\r\nX-Preview: alice\r\nX-Odd: \x01\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    async with open_session(sidecar, local.port, ALICE):
        answer = await exchange(sidecar, data)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert local.seen[0].body_bytes == 11


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(request(b"/cr", b"X-Odd: a\rb"), id="bare CR in a value"),
        pytest.param(request(b"/nul", b"X-Odd: a\x00b"), id="NUL in a value"),
        pytest.param(request(b"/nul", b"X-Odd\x00: ab"), id="NUL in a name"),
        pytest.param(request(b"/a\x00b"), id="NUL in the target"),
        pytest.param(request(b"/cr", b"X-Odd: a\rb", steal=False), id="bare CR, no match"),
        pytest.param(request(b"/nul", b"X-Odd: a\x00b", steal=False), id="NUL, no match"),
    ],
)
async def test_cr_and_nul_are_refused_before_anyone_sees_the_request(
    sidecar: SidecarProcess, app: HttpApp, local: HttpApp, bad: bytes
) -> None:
    async with open_session(sidecar, local.port, ALICE):
        answer = await exchange(sidecar, bad)
        after = await exchange(sidecar, request(b"/after"))
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert app.seen == []
    assert [s.path for s in local.seen] == ["/after"]
    assert after.startswith(b"HTTP/1.1 200"), after


async def test_a_failure_nobody_foresaw_still_answers_the_caller(
    sidecar: SidecarProcess, local: HttpApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever raises in the local proxy, the stream ends with a reset whose
    reason the caller reads in offramp's 502, and the next request is served."""
    from local_proxy.forward import forwarder

    async def broken(*args: object) -> str:
        raise RuntimeError("a bug the tests put here")

    monkeypatch.setattr(forwarder, "forward_verbatim", broken)
    lines: list[str] = []
    async with open_session(sidecar, local.port, ALICE, lines=lines):
        answer = await exchange(sidecar, request(b"/odd", b"X-Odd: \x01"))
        after = await exchange(sidecar, request(b"/after"))
    assert answer.startswith(b"HTTP/1.1 502"), answer
    assert b"a bug the tests put here" in answer, answer
    assert b"mitmproxy" not in answer.split(b"\r\n\r\n", 1)[1], answer
    assert after.startswith(b"HTTP/1.1 200"), after
    assert any("502 (the local proxy failed" in line for line in lines), lines
