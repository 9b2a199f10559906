"""`offramp-sidecar --workers N`: N real proxy processes share the listen port
(SO_REUSEPORT). Which process serves a connection is the kernel's choice; the
tests open enough connections that every process gets some, check with `ss`
which process owns each, and require the same answers from all of them."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from local_proxy.config import LocalSettings
from local_proxy.session import LocalSession
from tests.grpc_apps import EchoClient, GrpcApp, start_grpc_app
from tests.integration.test_grpc import four_kinds
from tests.support import (
    HttpApp,
    SidecarProcess,
    header_spec,
    open_session,
    start_sidecar,
    stop_cleanly,
)

WORKERS = 3
ME = {"x-who": "me"}


def owners(port: int) -> dict[int, int]:
    """pid -> how many accepted connections on `port` that process holds."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", "sport", "=", f":{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found: dict[int, int] = {}
    for pid in re.findall(r"pid=(\d+)", out):
        found[int(pid)] = found.get(int(pid), 0) + 1
    return found


def listeners(port: int) -> set[int]:
    out = subprocess.run(
        ["ss", "-tlnpH", "sport", "=", f":{port}"], capture_output=True, text=True, check=True
    ).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def worker_pids(sidecar: SidecarProcess) -> set[int]:
    """The workers: the primary holds the listening socket too (it bound it and
    handed it to the engine), but only the engine and its workers accept on it."""
    return listeners(sidecar.listen_port) - {sidecar.proc.pid, sidecar.wait_engine()}


@pytest.fixture
def workers(app: HttpApp, token_file: Path, tmp_path: Path) -> Iterator[SidecarProcess]:
    s = start_sidecar(app.port, token_file, tmp_path, f"--workers={WORKERS}")
    yield s
    stop_cleanly(s)


# The kernel picks a listener by hashing the connection's addresses, so n
# connections can all miss one of three processes ((2/3)^n of the time, times
# 3: about 1 run in 200 at n=16). Tests open connections until every process
# holds some, at least `n` and at most MOST_CONNECTIONS.
MOST_CONNECTIONS = 96


def connections(sidecar: SidecarProcess, n: int) -> list[http.client.HTTPConnection]:
    """At least `n` keep-alive connections, each connected and used once (so
    accepted), and enough that every process holds one."""
    conns: list[http.client.HTTPConnection] = []
    while len(conns) < n or len(owners(sidecar.listen_port)) < WORKERS:
        assert len(conns) < MOST_CONNECTIONS, owners(sidecar.listen_port)
        c = http.client.HTTPConnection("127.0.0.1", sidecar.listen_port, timeout=10)
        conns.append(c)
        assert get(c, "/hello")["served_by"] == "app"
    return conns


def get(c: http.client.HTTPConnection, path: str, headers: dict[str, str] | None = None) -> dict:
    c.request("GET", path, headers=headers or {})
    resp = c.getresponse()
    body = resp.read()
    assert resp.status == 200, body
    answer: dict = json.loads(body)
    return answer


def test_every_process_listens_and_serves(workers: SidecarProcess) -> None:
    engine = workers.wait_engine()
    assert len(worker_pids(workers)) == WORKERS - 1
    assert listeners(workers.listen_port) == {workers.proc.pid, engine} | worker_pids(workers)
    conns = connections(workers, 24)
    try:
        by_pid = owners(workers.listen_port)
        assert len(by_pid) == WORKERS, by_pid
        assert sum(by_pid.values()) == len(conns)
    finally:
        for c in conns:
            c.close()


async def test_each_process_steals_what_matches_and_passes_the_rest(
    workers: SidecarProcess, app: HttpApp, local: HttpApp
) -> None:
    async with open_session(workers, local.port, header_spec("^x-who: me$")):
        conns = await asyncio.to_thread(connections, workers, 24)
        try:
            assert len(owners(workers.listen_port)) == WORKERS
            for i, c in enumerate(conns):
                mine = await asyncio.to_thread(get, c, f"/mine/{i}", ME)
                other = await asyncio.to_thread(get, c, f"/other/{i}", {"x-who": "you"})
                assert (mine["served_by"], other["served_by"]) == ("local", "app"), i
        finally:
            for c in conns:
                c.close()
    # One X-Forwarded-For entry each: a worker's handoff does not add the primary's.
    stolen = [dict((k.lower(), v) for k, v in s.headers) for s in local.seen]
    assert len(stolen) == len(conns)
    assert {h.get("x-forwarded-for") for h in stolen} == {"127.0.0.1"}
    assert all("x-offramp-handoff" not in h for h in stolen)
    passed = [dict((k.lower(), v) for k, v in s.headers) for s in app.seen]
    assert {h.get("x-forwarded-for") for h in passed} == {"127.0.0.1"}


async def test_filter_timeouts_in_every_process_reach_the_developer(
    workers: SidecarProcess, app: HttpApp, local: HttpApp
) -> None:
    lines: list[str] = []
    crafted = {"x-who": "a" * 40 + "!"}
    async with open_session(workers, local.port, header_spec("^x-who: (a|aa)+$"), lines=lines):
        conns = await asyncio.to_thread(connections, workers, 24)
        try:
            for i, c in enumerate(conns):  # fail open: the app serves each
                assert (await asyncio.to_thread(get, c, f"/{i}", crafted))["served_by"] == "app"
        finally:
            for c in conns:
                c.close()
        deadline = time.monotonic() + 10
        while True:
            status = await asyncio.to_thread(
                httpx.get,
                f"http://127.0.0.1:{workers.control_port}/v1/status",
                headers={"Authorization": f"Bearer {workers.token}"},
            )
            (session,) = status.json()["sessions"]
            told = any("matching your filter took too long" in line for line in lines)
            if session["match_timeouts"] == len(conns) and told:
                break
            assert session["match_timeouts"] <= len(conns)
            assert time.monotonic() < deadline, (session, len(conns), lines)
            await asyncio.sleep(0.2)


async def test_a_session_opens_once_every_process_knows_it(
    workers: SidecarProcess, local: HttpApp
) -> None:
    """The session is welcomed only after every worker has its filter, so the
    first requests after it opens, to any process, are stolen. A worker held
    stopped (SIGSTOP) holds the welcome back until it runs again."""
    held = min(worker_pids(workers))
    os.kill(held, signal.SIGSTOP)
    try:
        session = LocalSession(
            LocalSettings(
                sidecar_url=workers.control_url,
                token=workers.token,
                to_port=local.port,
                spec=header_spec("^x-who: me$"),
            ),
            report=lambda line: None,
        )
        runner = asyncio.create_task(session.run())
        await asyncio.sleep(1.5)
        assert not session.ready.is_set() and not runner.done()
    finally:
        os.kill(held, signal.SIGCONT)
    try:
        await asyncio.wait_for(session.ready.wait(), 10)
        async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0)) as client:
            answers = await asyncio.gather(
                *(client.get(f"{workers.url}/first/{i}", headers=ME) for i in range(24))
            )
        assert [r.json()["served_by"] for r in answers] == ["local"] * 24
    finally:
        session.stop()
        await asyncio.wait_for(runner, 15)


def test_every_process_refuses_cr_and_nul(workers: SidecarProcess, app: HttpApp) -> None:
    """The 400 of tests/integration/test_hostile_input.py, from whichever process
    the kernel picks: fresh connections until every one has answered some."""
    answered_by: set[int] = set()
    for i in range(MOST_CONNECTIONS):
        bad = b"\x00" if i % 2 else b"\r"
        data = b"GET /bad HTTP/1.1\r\nHost: shop\r\nX-Odd: a" + bad + b"b\r\n\r\n"
        with socket.create_connection(("127.0.0.1", workers.listen_port), timeout=10) as s:
            answered_by |= set(owners(workers.listen_port))
            s.sendall(data)
            assert s.recv(65536).startswith(b"HTTP/1.1 400"), i
        if len(answered_by) == WORKERS and i >= 12:
            break
    assert len(answered_by) == WORKERS
    assert app.seen == []


async def test_a_callers_handoff_header_is_dropped(
    workers: SidecarProcess, app: HttpApp, local: HttpApp
) -> None:
    """Only a worker knows the secret; a caller's own header changes nothing."""
    forged = {"x-who": "you", "x-offramp-handoff": "guess 10.1.2.3:4"}
    async with (
        open_session(workers, local.port, header_spec("^x-who: me$")),
        httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0)) as client,
    ):
        for i in range(12):
            r = await client.get(f"{workers.url}/forged/{i}", headers=forged)
            assert r.json()["served_by"] == "app"
    for seen in app.seen:
        headers = {k.lower(): v for k, v in seen.headers}
        assert headers.get("x-forwarded-for") == "127.0.0.1"
        # Dropped where a worker would hand it on, i.e. in the primary; a worker
        # passes a request that no session wants straight to the app.
        assert headers.get("x-offramp-handoff") in (None, forged["x-offramp-handoff"])


async def test_a_killed_worker_is_started_again_and_knows_the_sessions(
    workers: SidecarProcess, local: HttpApp
) -> None:
    async with open_session(workers, local.port, header_spec("^x-who: me$")):
        victim = min(worker_pids(workers))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while len(worker_pids(workers) - {victim}) < WORKERS - 1:
            assert time.monotonic() < deadline, workers.log()
            await asyncio.sleep(0.1)
        assert f"exited with {-signal.SIGKILL}; starting it again" in workers.log()
        conns = await asyncio.to_thread(connections, workers, 24)
        try:
            assert len(owners(workers.listen_port)) == WORKERS
            for c in conns:
                assert (await asyncio.to_thread(get, c, "/mine", ME))["served_by"] == "local"
        finally:
            for c in conns:
                c.close()


def test_sigterm_ends_every_worker(app: HttpApp, token_file: Path, tmp_path: Path) -> None:
    s = start_sidecar(app.port, token_file, tmp_path, f"--workers={WORKERS}")
    pids = worker_pids(s)
    assert len(pids) == WORKERS - 1
    stop_cleanly(s)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_worker_count_out_of_range_is_refused(token_file: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "--app-port=8080",
            f"--token-file={token_file}",
            "--workers=0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "argument --workers: '0': write a number of processes from 1 to 64" in done.stderr


# -- gRPC (h2c): a stolen stream is handed over on an HTTP/2 connection ------------


@pytest.fixture
async def grpc_pair() -> AsyncIterator[tuple[GrpcApp, GrpcApp]]:
    app, local = await start_grpc_app("app"), await start_grpc_app("local")
    yield app, local
    await app.stop()
    await local.stop()


async def test_grpc_through_every_process(
    grpc_pair: tuple[GrpcApp, GrpcApp], token_file: Path, tmp_path: Path
) -> None:
    app, local = grpc_pair
    s = await asyncio.to_thread(
        start_sidecar, app.port, token_file, tmp_path, f"--workers={WORKERS}"
    )
    clients: list[EchoClient] = []
    try:
        async with open_session(s, local.port, header_spec("^x-who: me$")):
            while len(clients) < 16 or len(owners(s.listen_port)) < WORKERS:
                assert len(clients) < MOST_CONNECTIONS, owners(s.listen_port)
                c = EchoClient(s.listen_port, own_connection=True)
                clients.append(c)
                await four_kinds(c, "local", (("x-who", "me"),))
                await four_kinds(c, "app", (("x-who", "you"),))
    finally:
        for c in clients:
            await c.close()
        await asyncio.to_thread(stop_cleanly, s)
