"""HTTP/1.1 through the real sidecar (subprocess), real websockets and the real local proxy."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from sidecar.sessions.spec import FilterClause, HttpFilterSpec, SessionSpec
from tests.support import HttpApp, SidecarProcess, header_spec, open_session, raw_exchange

pytestmark = pytest.mark.timeout(90)


async def served_by(client: httpx.AsyncClient, path: str = "/", **kw: object) -> str:
    response = await client.request(kw.pop("method", "GET"), path, **kw)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    return response.headers["x-served-by"]


async def test_passthrough_keeps_host_and_adds_forwarded_for(
    sidecar: SidecarProcess, app: HttpApp
) -> None:
    async with httpx.AsyncClient(base_url=sidecar.url) as client:
        r = await client.post("/a/b?x=1", content=b"hello", headers={"host": "shop.example:8080"})
    assert r.status_code == 200
    echo = r.json()
    assert echo["served_by"] == "app"
    assert echo["path"] == "/a/b?x=1"
    assert echo["bytes"] == 5
    headers = {k.lower(): v for k, v in echo["headers"]}
    assert headers["host"] == "shop.example:8080"
    assert headers["x-forwarded-for"] == "127.0.0.1"


async def test_forwarded_for_is_appended_to_what_the_caller_sent(
    sidecar: SidecarProcess, app: HttpApp
) -> None:
    request = (
        b"GET /xff HTTP/1.1\r\nHost: shop\r\nX-Forwarded-For: 10.0.0.1\r\n"
        b"x-forwarded-for: 10.0.0.2\r\nConnection: close\r\n\r\n"
    )
    answer = await asyncio.to_thread(raw_exchange, sidecar.listen_port, request)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    forwarded = [v for k, v in app.seen[0].headers if k.lower() == "x-forwarded-for"]
    assert forwarded == ["10.0.0.1, 10.0.0.2, 127.0.0.1"]


async def test_stolen_request_reaches_the_local_app_as_the_caller_wrote_it(
    sidecar: SidecarProcess, local: HttpApp
) -> None:
    # No re-quoted target, and no headers of the local proxy's HTTP client added.
    request = (
        b"GET /x/../a%2Fb/c%20d?q=%20x&r%7e HTTP/1.1\r\nHost: shop.example\r\n"
        b"X-Preview: alice\r\nConnection: close\r\n\r\n"
    )
    async with open_session(sidecar, local.port, header_spec("^x-preview: alice$")):
        answer = await asyncio.to_thread(raw_exchange, sidecar.listen_port, request)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    seen = local.seen[0]
    assert seen.path == "/x/../a%2Fb/c%20d?q=%20x&r%7e"
    names = sorted(name.lower() for name, _ in seen.headers)
    assert names == ["host", "x-forwarded-for", "x-preview"], seen.headers
    assert dict(seen.headers)["X-Preview"] == "alice"


@pytest.mark.parametrize(
    ("spec", "matching", "other"),
    [
        (
            header_spec("^x-preview: alice$"),
            {"headers": {"X-Preview": "alice"}},
            {"headers": {"x-preview": "alice2"}},
        ),
        (
            SessionSpec(http_filter=HttpFilterSpec(path_filter="^/api/v2/")),
            {"path": "/api/v2/items"},
            {"path": "/api/v1/items"},
        ),
        (
            SessionSpec(http_filter=HttpFilterSpec(path_filter=r"debug=1")),
            {"path": "/items?debug=1"},
            {"path": "/items?debug=0"},
        ),
        (
            SessionSpec(http_filter=HttpFilterSpec(method_filter="delete")),
            {"method": "DELETE"},
            {"method": "GET"},
        ),
        (
            SessionSpec(
                http_filter=HttpFilterSpec(
                    all_of=(FilterClause(header="^x-preview: alice$"), FilterClause(path="^/cart"))
                )
            ),
            {"path": "/cart", "headers": {"x-preview": "alice"}},
            {"path": "/orders", "headers": {"x-preview": "alice"}},
        ),
        (
            SessionSpec(
                http_filter=HttpFilterSpec(
                    any_of=(FilterClause(header="^x-debug:"), FilterClause(method="PATCH"))
                )
            ),
            {"method": "PATCH"},
            {"method": "PUT"},
        ),
    ],
    ids=["header", "path", "path-query", "method", "all_of", "any_of"],
)
async def test_steal_by_each_filter_kind(
    sidecar: SidecarProcess,
    local: HttpApp,
    spec: SessionSpec,
    matching: dict[str, object],
    other: dict[str, object],
) -> None:
    lines: list[str] = []
    async with (
        open_session(sidecar, local.port, spec, lines=lines),
        httpx.AsyncClient(base_url=sidecar.url) as client,
    ):
        assert await served_by(client, **dict(matching)) == "local"
        assert await served_by(client, **dict(other)) == "app"
    assert len(local.seen) == 1
    assert any(line.startswith("steal") and "-> 200" in line for line in lines), lines


async def test_no_filter_steals_everything_but_probes(
    sidecar: SidecarProcess, local: HttpApp
) -> None:
    async with (
        open_session(sidecar, local.port, SessionSpec()),
        httpx.AsyncClient(base_url=sidecar.url) as client,
    ):
        assert await served_by(client, "/anything") == "local"
        probe = {"user-agent": "kube-probe/1.31"}
        assert await served_by(client, "/healthz", headers=probe) == "app"


async def test_probe_taken_only_when_asked(sidecar: SidecarProcess, local: HttpApp) -> None:
    spec = header_spec("^user-agent: kube-probe/", take_probes=True)
    async with (
        open_session(sidecar, local.port, spec),
        httpx.AsyncClient(base_url=sidecar.url) as client,
    ):
        assert await served_by(client, headers={"user-agent": "kube-probe/1.31"}) == "local"


def _request(path: str, extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nhost: svc\r\n" + extra + b"\r\n"


def _read_response(sock: socket.socket, buf: bytearray) -> tuple[bytes, bytes]:
    while b"\r\n\r\n" not in buf:
        piece = sock.recv(65536)
        assert piece, "connection closed mid-response"
        buf += piece
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(rest) < length:
        piece = sock.recv(65536)
        assert piece
        rest += piece
    buf[:] = rest[length:]
    return head, rest[:length]


async def test_one_keepalive_connection_is_routed_per_request(
    sidecar: SidecarProcess, local: HttpApp, app: HttpApp
) -> None:
    async with open_session(sidecar, local.port, header_spec("^x-preview: alice$")):

        def alternate() -> list[str]:
            answers = []
            with socket.create_connection(("127.0.0.1", sidecar.listen_port), timeout=10) as s:
                buf = bytearray()
                for i in range(8):
                    extra = b"x-preview: alice\r\n" if i % 2 else b""
                    s.sendall(_request(f"/r{i}", extra))
                    _, body = _read_response(s, buf)
                    answers.append(json.loads(body)["served_by"])
            return answers

        answers = await asyncio.to_thread(alternate)
    assert answers == ["app", "local"] * 4
    assert [s.path for s in local.seen] == ["/r1", "/r3", "/r5", "/r7"]


@pytest.mark.parametrize("stolen", [True, False], ids=["stolen", "passed"])
async def test_chunked_and_expect_continue_bodies(
    sidecar: SidecarProcess, local: HttpApp, stolen: bool
) -> None:
    mark = b"x-preview: alice\r\n" if stolen else b""
    chunked = (
        b"POST /count HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n"
        b"connection: close\r\n" + mark + b"\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )

    def expect_continue() -> bytes:
        with socket.create_connection(("127.0.0.1", sidecar.listen_port), timeout=10) as s:
            s.sendall(
                b"POST /count HTTP/1.1\r\nhost: svc\r\ncontent-length: 11\r\n"
                b"expect: 100-continue\r\nconnection: close\r\n" + mark + b"\r\n"
            )
            interim = s.recv(65536)
            assert interim.startswith(b"HTTP/1.1 100"), interim
            s.sendall(b"hello world")
            out = b""
            while piece := s.recv(65536):
                out += piece
            return out

    async with open_session(sidecar, local.port, header_spec("^x-preview: alice$")):
        plain = await asyncio.to_thread(raw_exchange, sidecar.listen_port, chunked)
        continued = await asyncio.to_thread(expect_continue)
    for out in (plain, continued):
        assert out.startswith(b"HTTP/1.1 200"), out[:200]
        body = json.loads(out.split(b"\r\n\r\n", 1)[1])
        assert body["bytes"] == 11
        assert body["served_by"] == ("local" if stolen else "app")


async def test_malformed_request_does_not_take_the_proxy_down(
    sidecar: SidecarProcess, local: HttpApp
) -> None:
    async with open_session(sidecar, local.port, header_spec("^x-preview: alice$")):
        for garbage in (
            b"\x16\x03\x01garbage\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: a\r\ncontent-length: nope\r\n\r\n",
            b"GET / HTTP/1.1\r\n" + b"x: " + b"a" * 100_000 + b"\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: a\r\nx-preview: alice\r\n"
            b"transfer-encoding: chunked\r\n\r\nzz\r\n",
        ):
            await asyncio.to_thread(
                raw_exchange, sidecar.listen_port, garbage, 1.0, until_close=False
            )
        async with httpx.AsyncClient(base_url=sidecar.url) as client:
            assert await served_by(client, headers={"x-preview": "alice"}) == "local"
            assert await served_by(client) == "app"
    assert sidecar.proc.poll() is None


async def test_head_request_and_empty_bodies(sidecar: SidecarProcess, local: HttpApp) -> None:
    async with (
        open_session(sidecar, local.port, header_spec("^x-preview: alice$")),
        httpx.AsyncClient(base_url=sidecar.url) as client,
    ):
        r = await client.head("/bytes/1000", headers={"x-preview": "alice"})
        assert r.status_code == 200 and r.headers["content-length"] == "1000" and r.content == b""
        r = await client.post("/count", headers={"x-preview": "alice"}, content=b"")
        assert r.json() == {"bytes": 0, "sha256": r.json()["sha256"], "served_by": "local"}


async def test_one_session_carries_many_concurrent_requests(
    sidecar: SidecarProcess, local: HttpApp
) -> None:
    async with (
        open_session(sidecar, local.port, header_spec("^x-preview: alice$")),
        httpx.AsyncClient(base_url=sidecar.url, timeout=30) as client,
    ):
        answers = await asyncio.gather(
            *(client.get(f"/sleep/0.3?n={i}", headers={"x-preview": "alice"}) for i in range(30))
        )
    assert {a.headers["x-served-by"] for a in answers} == {"local"}
    assert sorted(a.json()["path"] for a in answers) == sorted(
        f"/sleep/0.3?n={i}" for i in range(30)
    )
