"""Pod-level capture: the real sidecar's iptables rules inside network namespaces.

The app sees the caller's address when traffic reaches it directly and 127.0.0.1
when it came through the sidecar: that is how these tests tell capture apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.netns import PodBed, pod_bed
from tests.support import HttpApp, start_app

pytestmark = pytest.mark.timeout(120)

BIN = Path(sys.executable).parent
CONTROL = 15081
ALICE = {"x-preview": "alice"}


@pytest.fixture(params=["iptables-nft", "iptables-legacy"])
def iptables(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def bed() -> Iterator[PodBed]:
    with pod_bed() as b:
        yield b


class Pod:
    def __init__(self, bed: PodBed, tmp: Path, token_file: Path, iptables: str):
        self.bed, self.tmp, self.token_file, self.iptables = bed, tmp, token_file, iptables
        self.procs: list[subprocess.Popen[bytes]] = []
        self.apps: list[HttpApp] = []

    def app(self, port: int) -> HttpApp:
        app = self.bed.pod.call(start_app, f"app{port}", "0.0.0.0", port)
        self.apps.append(app)
        return app

    def sidecar(self, *app_ports: str, extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        with (self.tmp / f"sidecar{len(self.procs)}.log").open("wb") as log:
            proc = self._spawn(log, app_ports, extra)
        self.procs.append(proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert proc.poll() is None, self.log(proc)
            with contextlib.suppress(httpx.HTTPError):
                r = self.bed.pod.call(httpx.get, f"http://127.0.0.1:{CONTROL}/healthz")
                if r.status_code == 200:
                    return proc
            time.sleep(0.05)
        raise AssertionError("sidecar not healthy:\n" + self.log(proc))

    def _spawn(
        self, log: object, app_ports: tuple[str, ...], extra: tuple[str, ...]
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.bed.pod.cmd(
                sys.executable, "-m", "sidecar",
                *(f"--app-port={p}" for p in app_ports),
                f"--control-port={CONTROL}", f"--token-file={self.token_file}",
                "--capture=iptables", f"--iptables={self.iptables}", *extra,
            ),
            stdout=log, stderr=subprocess.STDOUT,  # type: ignore[arg-type]
        )  # fmt: skip

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.tmp / f"sidecar{self.procs.index(proc)}.log").read_text(errors="replace")

    @contextlib.contextmanager
    def session(self, local_port: int, *args: str) -> Iterator[subprocess.Popen[str]]:
        """`offramp steal` as a user types it, on the caller's side."""
        proc = subprocess.Popen(
            self.bed.caller.cmd(
                str(BIN / "offramp"), "steal", "--sidecar-url", f"ws://{self.bed.pod_ip}:{CONTROL}",
                "--token-file", str(self.token_file), "--to", str(local_port), *args,
            ),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "open" in line, line + (proc.stderr.read() if proc.stderr else "")
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
            assert proc.returncode == 0, out + err

    def get(self, port: int, path: str = "/", headers: dict[str, str] | None = None) -> dict:
        def go() -> dict:
            r = httpx.get(f"http://{self.bed.pod_ip}:{port}{path}", headers=headers, timeout=10)
            return {"status": r.status_code, **r.json()}

        return self.bed.caller.call(go)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
        for app in self.apps:
            app.server.shutdown()
            app.server.server_close()


@pytest.fixture
def pod(bed: PodBed, tmp_path: Path, token_file: Path, iptables: str) -> Iterator[Pod]:
    if iptables == "iptables-legacy":
        try:
            bed.pod.sh("iptables-legacy", "-t", "nat", "-S")
        except RuntimeError as e:
            pytest.skip(f"iptables-legacy does not work on this kernel: {e}")
    p = Pod(bed, tmp_path, token_file, iptables)
    yield p
    p.close()


@pytest.fixture
def laptop(bed: PodBed) -> Iterator[HttpApp]:
    """The developer's local process, next to the `offramp steal` CLI."""
    app = bed.caller.call(start_app, "local", "127.0.0.1", 0)
    yield app
    app.server.shutdown()
    app.server.server_close()


def test_capture_only_while_a_session_is_open(pod: Pod, laptop: HttpApp) -> None:
    pod.app(8080)
    sidecar = pod.sidecar("8080")
    caller = pod.bed.caller_ip
    assert pod.get(8080)["peer"] == caller  # no session: the sidecar is not on the path
    assert "OFFRAMP" not in pod.bed.pod.nat_rules(pod.iptables)
    with pod.session(laptop.port, "--header", "^x-preview: alice$"):
        assert "-N OFFRAMP-8080" in pod.bed.pod.nat_rules(pod.iptables)
        passed = pod.get(8080)
        assert (passed["served_by"], passed["peer"]) == ("app8080", "127.0.0.1")
        headers = {k.lower(): v for k, v in passed["headers"]}
        assert headers["x-forwarded-for"] == caller
        assert pod.get(8080, headers=ALICE)["served_by"] == "local"
    _wait_chain_gone(pod, 8080)
    assert pod.get(8080)["peer"] == caller
    # No connection through the sidecar is left: connection tracking is let go too.
    _wait_chain_gone(pod, "CONNTRACK")
    sidecar.send_signal(signal.SIGTERM)
    assert sidecar.wait(20) == 0
    assert "OFFRAMP" not in pod.bed.pod.nat_rules(pod.iptables)


def _wait_chain_gone(pod: Pod, chain: int | str) -> None:
    """Wait (up to 5 s) until the chain OFFRAMP-<chain> is gone."""
    for _ in range(50):
        if f"OFFRAMP-{chain}" not in pod.bed.pod.nat_rules(pod.iptables):
            return
        time.sleep(0.1)
    raise AssertionError(f"OFFRAMP-{chain} is still there:\n{pod.bed.pod.nat_rules(pod.iptables)}")


@pytest.mark.parametrize("ending", ["session ends", "sidecar gets SIGTERM"])
def test_answer_in_flight_when_capture_stops_reaches_the_caller(
    pod: Pod, laptop: HttpApp, ending: str
) -> None:
    """A connection redirected to the sidecar keeps its address translation after
    the redirect rule is gone: the answer still comes from the port it called."""
    app = pod.app(8080)
    sidecar = pod.sidecar("8080")
    answers: list[tuple[int, str] | str] = []

    def call() -> None:
        try:
            answer = pod.get(8080, "/sleep/2")
            answers.append((answer["status"], answer["peer"]))
        except httpx.HTTPError as e:
            answers.append(repr(e))

    with pod.session(laptop.port, "--header", "^x-preview: alice$"):
        slow = threading.Thread(target=call)
        slow.start()
        with app.arrived:
            assert app.arrived.wait_for(lambda: any(s.path == "/sleep/2" for s in app.seen), 10)
        if ending == "sidecar gets SIGTERM":
            sidecar.send_signal(signal.SIGTERM)
            _wait_chain_gone(pod, 8080)
    _wait_chain_gone(pod, 8080)
    assert slow.is_alive(), "the answer came before capture stopped: the test proves nothing"
    # Connection tracking, which carries the redirected connection's address
    # translation, stays while that connection is open...
    assert "-N OFFRAMP-CONNTRACK" in pod.bed.pod.nat_rules(pod.iptables)
    slow.join(15)
    assert answers == [(200, "127.0.0.1")]  # it went through the sidecar, and came back
    # ...and goes once it has closed (or the sidecar has exited).
    _wait_chain_gone(pod, "CONNTRACK")
    if ending == "sidecar gets SIGTERM":
        assert sidecar.wait(20) == 0


def _request(path: str, headers: bytes = b"") -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: svc\r\n".encode() + headers + b"\r\n"


def _response(s: socket.socket) -> dict:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = s.recv(65536)
        if not piece:
            raise ConnectionResetError("closed")
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    while len(body) < length:
        body += s.recv(65536)
    return dict(json.loads(body[:length]))


def test_keepalive_connection_from_before_the_session_is_stolen_after(
    pod: Pod, laptop: HttpApp
) -> None:
    pod.app(8080)
    pod.sidecar("8080")

    def before() -> socket.socket:
        s = socket.create_connection((pod.bed.pod_ip, 8080), timeout=10)
        s.sendall(_request("/first", b"x-preview: alice\r\n"))
        assert _response(s)["served_by"] == "app8080"
        return s

    conn = pod.bed.caller.call(before)
    with pod.session(laptop.port, "--header", "^x-preview: alice$"):

        def after() -> str:
            # The sidecar closes the idle connection; like any HTTP client, reconnect.
            conn.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                assert conn.recv(1) == b""
            conn.close()
            with socket.create_connection((pod.bed.pod_ip, 8080), timeout=10) as s:
                s.sendall(_request("/second", b"x-preview: alice\r\n"))
                return str(_response(s)["served_by"])

        assert pod.bed.caller.call(after) == "local"


def test_with_keep_existing_connections_an_open_connection_stays_with_the_app(
    pod: Pod, laptop: HttpApp
) -> None:
    """Only a connection's first packet is redirected: a connection that was open
    (and untracked) before capture keeps reaching the app, undisturbed, while
    new connections are captured."""
    pod.app(8080)
    pod.sidecar("8080", extra=("--keep-existing-connections",))

    def ask(s: socket.socket, path: str) -> tuple[str, str]:
        s.sendall(_request(path, b"x-preview: alice\r\n"))
        answer = _response(s)
        return answer["served_by"], answer["peer"]

    conn = pod.bed.caller.call(socket.create_connection, (pod.bed.pod_ip, 8080), 10)
    try:
        assert pod.bed.caller.call(ask, conn, "/first") == ("app8080", pod.bed.caller_ip)
        with pod.session(laptop.port, "--header", "^x-preview: alice$"):
            time.sleep(1)  # longer than it takes to find an idle connection
            assert pod.bed.caller.call(ask, conn, "/second") == ("app8080", pod.bed.caller_ip)
            assert pod.get(8080, headers=ALICE)["served_by"] == "local"
    finally:
        conn.close()


def test_two_ports_are_captured_independently(pod: Pod, laptop: HttpApp) -> None:
    pod.app(8080)
    pod.app(8081)
    pod.sidecar("8080", "8081")
    with pod.session(laptop.port, "--port", "8080"):
        rules = pod.bed.pod.nat_rules(pod.iptables)
        assert "-N OFFRAMP-8080" in rules and "OFFRAMP-8081" not in rules
        assert pod.get(8080)["served_by"] == "local"
        assert pod.get(8081)["peer"] == pod.bed.caller_ip
        with pod.session(laptop.port, "--port", "8081", "--header", "^x-b: 1$"):
            assert pod.get(8081)["peer"] == "127.0.0.1"
            assert pod.get(8081, headers={"x-b": "1"})["served_by"] == "local"
        for _ in range(50):
            if "OFFRAMP-8081" not in pod.bed.pod.nat_rules(pod.iptables):
                break
            time.sleep(0.1)
        assert "OFFRAMP-8081" not in pod.bed.pod.nat_rules(pod.iptables)
        assert pod.get(8080)["served_by"] == "local"


def test_probes_are_never_stolen(pod: Pod, laptop: HttpApp) -> None:
    pod.app(8080)
    pod.sidecar("8080", extra=("--probe-path=/ready",))
    with pod.session(laptop.port):  # no filter: everything but probes
        assert pod.get(8080, "/work")["served_by"] == "local"
        assert pod.get(8080, "/ready")["served_by"] == "app8080"
        assert (
            pod.get(8080, "/x", headers={"user-agent": "kube-probe/1.31"})["served_by"] == "app8080"
        )


def test_killed_sidecar_leaves_chains_that_the_next_start_removes(
    pod: Pod, laptop: HttpApp
) -> None:
    pod.app(8080)
    first = pod.sidecar("8080")
    with pod.session(laptop.port):
        assert "-N OFFRAMP-8080" in pod.bed.pod.nat_rules(pod.iptables)
        # The container is killed: every process in it at once, the engine first
        # (killed after the primary, it would drain on its parent-death signal).
        (engine,) = children(first.pid)
        os.kill(engine, signal.SIGKILL)
        first.kill()
        first.wait(10)
    assert "-N OFFRAMP-8080" in pod.bed.pod.nat_rules(pod.iptables)
    second = pod.sidecar("8080")
    assert "OFFRAMP" not in pod.bed.pod.nat_rules(pod.iptables)
    assert (
        "removed iptables chains left by an earlier run: OFFRAMP-8080, OFFRAMP-CONNTRACK"
        in pod.log(second)
    )
    assert pod.get(8080)["peer"] == pod.bed.caller_ip


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_an_engine_that_dies_leaves_no_capture_behind_and_comes_back(
    pod: Pod, laptop: HttpApp
) -> None:
    """The engine alone dies (a bug, the OOM killer): the primary removes its
    chains, so callers reach the app, and the next session starts a new engine."""
    pod.app(8080)
    primary = pod.sidecar("8080", extra=("--engine-linger=1",))
    with pod.session(laptop.port, "--header", "^x-preview: alice$"):
        assert "-N OFFRAMP-8080" in pod.bed.pod.nat_rules(pod.iptables)
        (engine,) = children(primary.pid)
        os.kill(engine, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while "OFFRAMP-8080" in pod.bed.pod.nat_rules(pod.iptables):
            assert time.monotonic() < deadline, pod.log(primary)
            time.sleep(0.1)
        assert pod.get(8080, "/x", ALICE)["peer"] == pod.bed.caller_ip
    assert "removed the capture the engine left: OFFRAMP-8080" in pod.log(primary)
    time.sleep(1.2)  # the pause after a death
    with pod.session(laptop.port, "--header", "^x-preview: alice$"):
        assert pod.get(8080, "/y", ALICE)["served_by"] == "local"
        (second,) = children(primary.pid)
        assert second != engine
    # The linger passes: the engine goes, and so do its rules.
    deadline = time.monotonic() + 15
    while children(primary.pid):
        assert time.monotonic() < deadline, pod.log(primary)
        time.sleep(0.1)
    assert "OFFRAMP" not in pod.bed.pod.nat_rules(pod.iptables)
    assert pod.get(8080)["peer"] == pod.bed.caller_ip
    assert "Traceback" not in pod.log(primary)


class _Greeter(socketserver.BaseRequestHandler):
    """A server-speaks-first protocol (like SMTP), then an echo."""

    def handle(self) -> None:
        peer = self.client_address[0].encode()
        self.request.sendall(b"220 hello " + peer + b"\r\n")
        while data := self.request.recv(4096):
            self.request.sendall(data)


def test_non_http_on_a_captured_port_passes_through_promptly(pod: Pod, laptop: HttpApp) -> None:
    def serve() -> socketserver.ThreadingTCPServer:
        server = socketserver.ThreadingTCPServer(("0.0.0.0", 2525), _Greeter)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    server = pod.bed.pod.call(serve)
    try:
        pod.sidecar("2525")
        with pod.session(laptop.port):

            def talk() -> tuple[float, bytes, bytes]:
                started = time.monotonic()
                with socket.create_connection((pod.bed.pod_ip, 2525), timeout=10) as s:
                    greeting = s.recv(4096)
                    waited = time.monotonic() - started
                    s.sendall(b"\x00\x01binary\xff")
                    return waited, greeting, s.recv(4096)

            waited, greeting, echo = pod.bed.caller.call(talk)
            # Through the sidecar (the server sees 127.0.0.1), once the caller has
            # been silent for SERVER_FIRST_WAIT (0.2 s; sidecar.proxy.connections).
            assert greeting == b"220 hello 127.0.0.1\r\n"
            assert echo == b"\x00\x01binary\xff"
            # Without the raw-TCP decision a server-first protocol waits forever for
            # the client; the bound only separates "soon" from "stuck", since
            # speed is for the benchmarks.
            assert waited < 1.0, f"the greeting took {waited * 1000:.0f} ms"

            def client_first() -> bytes:
                with socket.create_connection((pod.bed.pod_ip, 2525), timeout=10) as s:
                    s.sendall(b"\x16\x03\x01 not http")
                    got = b""  # greeting and echo may come in one read or two
                    while not got.endswith(b"\x16\x03\x01 not http"):
                        piece = s.recv(4096)
                        assert piece, f"closed after {got!r}"
                        got += piece
                    return got

            assert pod.bed.caller.call(client_first).startswith(b"220 hello 127.0.0.1\r\n")
    finally:
        server.shutdown()
        server.server_close()


def test_no_request_fails_across_session_open_and_close(pod: Pod, laptop: HttpApp) -> None:
    pod.app(8080)
    pod.sidecar("8080")
    stop = threading.Event()
    results: list[str] = []

    def stream() -> None:
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=10) as client:
            while not stop.is_set() and len(results) < 5000 and time.monotonic() < deadline:
                try:
                    r = client.get(
                        f"http://{pod.bed.pod_ip}:8080/n{len(results)}",
                        headers={"connection": "close", **ALICE},
                    )
                    results.append(
                        r.json()["served_by"] if r.status_code == 200 else f"{r.status_code}"
                    )
                except httpx.HTTPError as e:
                    results.append(f"error: {e!r}")

    runner = threading.Thread(target=lambda: pod.bed.caller.call(stream))
    runner.start()
    try:
        for _ in range(3):
            time.sleep(0.5)
            with pod.session(laptop.port, "--header", "^x-preview: alice$"):
                time.sleep(0.7)
        time.sleep(0.5)
    finally:
        stop.set()
        runner.join(30)
    failures = [r for r in results if r not in ("app8080", "local")]
    assert len(results) > 50
    assert failures == [], failures[:5]
    assert "local" in results and "app8080" in results
