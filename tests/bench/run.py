"""What the sidecar costs, measured side by side in one run.

    .venv/bin/python -m tests.bench [--duration 5] [--out bench-results]

The sidecar runs as `offramp-sidecar engine` (the engine on its own, binding its
ports: the process requests pass through; tests/bench/footprint.py measures the
primary in front of it, which idle requests never reach). Every scenario sends
to the same small HTTP/1.1 app (an nginx server block that
answers `200 app`) with wrk, at 1 connection (latency) and at 16 (throughput),
all on 127.0.0.1. The "local process" of a stolen request is a second nginx
server block that answers `200 local`. Before each measurement one request
checks who answers it, so a row cannot silently measure the wrong path.

Rows:
  direct          wrk -> app
  bare mitmproxy  mitmproxy reverse mode, no addons of ours: the engine's floor
  idle sidecar    a sidecar runs with no session; wrk goes to the app's port, as
                  callers do under iptables capture with no session (its CPU is shown).
                  Its target is checked on alternating runs with and without the
                  sidecar (--rounds): rows measured minutes apart drift by more
                  than the 2% it asks for
  no session      through the sidecar's listener with no session (the path of
                  privilege-free mode, where a Service points at the sidecar)
  1 session       one session whose filter matches nothing: pass-through cost
  N sessions      N such sessions: the filter cost
  (CPU rounds)    bare mitmproxy, 1 session and N sessions again, taking turns for
                  --rounds rounds; the CPU targets are read from their medians.
                  Bare mitmproxy runs twice a round: the gap between its two
                  medians shows how much of a difference is the machine's noise
  stolen          every request matches and is answered by the local process
                  through the tunnel (the local proxy runs in this process)
  mirror          every request matches; the app answers, the local side gets a copy
  nginx, haproxy  the same header routing in a C proxy (requests that pass)
  gRPC direct, gRPC passed, gRPC stolen
                  unary calls to a grpcio server (h2c) with h2load: straight to it,
                  through the sidecar with one session that matches nothing, and
                  stolen to a second grpcio server; compared with gRPC direct
  per-req. conn, lazy / eager
                  through the sidecar with no session, each request on a new
                  connection (Connection: close), with the app connection opened
                  when the request needs it (--app-connect request, the default)
                  and when the caller connects (--app-connect accept)
  1 session, W workers
                  the 1-session row with `--workers W` (W proxy processes share
                  the listen port): how throughput scales with processes. CPU
                  and RSS are those of all W processes together

Python calls per request
                  bare mitmproxy, 1 session and N sessions again, each run under
                  cProfile with two loads of different length; the difference in
                  Python function calls over the difference in requests. Unlike
                  CPU time on a shared machine this count does not drift between
                  runs, so the CPU targets are also checked on it

Hostile callers (part "hostile", printed after the table)
  memory          the sidecar's peak RSS while 1,000 websockets sit on the control
                  port without a HELLO and 300 callers dribble a request head a
                  byte a second, for --hostile-hold seconds (header timeout half
                  of that)
  backtracking    p50 and p99 of plain requests (wrk, 1 connection) alone, beside
                  100 connections of requests that a session's backtracking
                  filter rejects at once, and beside 100 of crafted ones that make
                  it backtrack (the filter budget bounds what they cost)

Reported: requests/s, p50 and p99 latency, the proxy's CPU seconds per 1,000
requests and its peak RSS, with ratios to direct and to bare mitmproxy; then
the RSS of one sidecar across many requests, and the targets of the benchmark
issue, met or not. Writes results.json and results.png into --out.

Needs wrk, nginx, haproxy and h2load (Debian: apt-get install wrk nginx-light
haproxy nghttp2-client).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import pstats
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from local_proxy.config import LocalSettings
from local_proxy.session import LocalSession
from sidecar.sessions.spec import HttpFilterSpec, Mode, SessionSpec
from tests.support import free_port, free_ports

TOOLS = ("wrk", "nginx", "haproxy", "h2load")
APT_PACKAGES = "wrk nginx-light haproxy nghttp2-client"
REPO = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Headers a browser-ish client sends, so filters have something to scan.
COMMON_HEADERS = ("User-Agent: offramp-bench", "Accept: */*", "Accept-Encoding: gzip")
PREVIEW = "x-preview: bench"
BENCH_SESSION = SessionSpec(http_filter=HttpFilterSpec(header_filter=f"^{PREVIEW}$"))
PARTS = (
    "direct", "bare", "idle", "no_session", "one_session", "many_sessions", "cpu_rounds",
    "stolen", "mirror", "c_proxies", "grpc", "workers", "connections", "calls", "rss",
    "hostile",
)  # fmt: skip
BACKTRACKS = SessionSpec(http_filter=HttpFilterSpec(header_filter="^x-name: (a|aa)+$"))
CRAFTED = "X-Name: " + "a" * 40 + "!"
BENIGN = "X-Name: b"
GRPC_UNARY = "/offramp.test.Echo/Unary"
GRPC_MESSAGE = b"bench"


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


# --- processes -------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


@dataclass
class Proc:
    """A process we started, and the pids whose CPU and memory count as its own."""

    name: str
    popen: subprocess.Popen[bytes]
    with_children: bool = False

    def pids(self) -> list[int]:
        pid = self.popen.pid
        return [pid, *_children(pid)] if self.with_children else [pid]

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / CLK_TCK

    def memory_kib(self, key: str) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        return total

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _python(profile: Path | None) -> list[str]:
    """The start of `python -m MODULE`, under cProfile writing to `profile` if given."""
    if profile is None:
        return [sys.executable, "-m"]
    return [sys.executable, "-m", "cProfile", "-o", str(profile), "-m"]


def _wait_http(port: int, proc: Proc, timeout: float = 20, path: str = "/") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code < 500:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not answer on port {port} within {timeout} s")


class Bed:
    """Starts processes and config files in one temporary folder; stops them all."""

    def __init__(self, work: Path):
        self.work = work
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], *, with_children: bool = False) -> Proc:
        # `python -m tests.bench...` must find this checkout from the work folder.
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with (self.work / f"{name}.log").open("wb") as log:
            popen = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.work, env=env
            )
        proc = Proc(name, popen, with_children)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def nginx(self, name: str, servers: str, extra_http: str = "") -> Proc:
        prefix = self.work / name
        prefix.mkdir()
        temp = " ".join(
            f"{kind}_temp_path {prefix}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (prefix / "nginx.conf").write_text(
            f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    {temp}
    keepalive_requests 1000000;
    {extra_http}
    {servers}
}}
"""
        )
        return self.start(
            name,
            ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"],
            with_children=True,
        )


# --- the local side's sessions, in a loop of their own ----------------------


class SessionHost:
    """Runs real `LocalSession`s (the local proxy's code) on an event loop in a
    thread, so they keep serving while the main thread waits for wrk."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sessions: list[tuple[LocalSession, asyncio.Task[None]]] = []
        self.reports = 0

    def _call[T](self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _report(self, line: str) -> None:
        self.reports += 1

    def open(self, control_url: str, token: str, to_port: int, specs: list[SessionSpec]) -> None:
        async def open_all() -> None:
            for spec in specs:
                settings = LocalSettings(
                    sidecar_url=control_url, token=token, to_port=to_port, spec=spec
                )
                session = LocalSession(settings, report=self._report)
                task = asyncio.create_task(session.run())
                ready = asyncio.create_task(session.ready.wait())
                await asyncio.wait({task, ready}, timeout=10, return_when="FIRST_COMPLETED")
                if task.done():
                    task.result()  # raises why the session ended
                if not ready.done():
                    ready.cancel()
                    raise RuntimeError("a session did not open within 10 s")
                self.sessions.append((session, task))

        self._call(open_all())

    def close_all(self) -> None:
        async def close() -> None:
            for session, _ in self.sessions:
                session.stop()
            await asyncio.wait_for(asyncio.gather(*(t for _, t in self.sessions)), 30)
            self.sessions.clear()

        self._call(close())

    def shutdown(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# --- wrk ---------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(m[1]) * _UNITS[m[2]]


def parse_wrk(out: str) -> WrkResult:
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (total and p50 and p99):
        raise ValueError(f"could not read wrk's output:\n{out}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx[1]) if non2xx else 0
    seconds = _ms(total[2] + total[3]) / 1000
    return WrkResult(
        requests=int(total[1]),
        seconds=seconds,
        rps=int(total[1]) / seconds,
        p50_ms=_ms(p50[1]),
        p99_ms=_ms(p99[1]),
        errors=errors,
    )


def parse_h2load(out: str, log: str) -> WrkResult:
    """h2load's summary, and p50/p99 from its per-request log (start time in
    microseconds, HTTP status, microseconds until the response ended)."""
    finished = re.search(r"finished in ([\d.]+)(us|ms|s|m), ([\d.]+) req/s", out)
    counts = re.search(
        r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed,"
        r" (\d+) errored, (\d+) timeout",
        out,
    )
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not (finished and counts and codes):
        raise ValueError(f"could not read h2load's output:\n{out}")
    latencies = sorted(
        int(fields[2]) / 1000
        for line in log.splitlines()
        if len(fields := line.split("\t")) >= 3 and fields[2].isdigit()
    )
    if not latencies:
        raise ValueError("h2load logged no request")

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))]

    succeeded = int(counts[2])
    return WrkResult(
        requests=succeeded,
        seconds=_ms(finished[1] + finished[2]) / 1000,
        rps=float(finished[3]),
        p50_ms=pct(0.50),
        p99_ms=pct(0.99),
        errors=int(counts[3]) + int(counts[4]) + int(counts[5]) + int(codes[3]) + int(codes[4]),
    )


def h2load(
    port: int, connections: int, duration: int, headers: tuple[str, ...], work: Path
) -> WrkResult:
    """gRPC unary calls over h2c, one stream at a time per connection. The
    request is one gRPC message: a 5-byte prefix (not compressed, length) and
    its bytes."""
    body = work / "grpc-request"
    body.write_bytes(b"\x00" + len(GRPC_MESSAGE).to_bytes(4, "big") + GRPC_MESSAGE)
    log = work / f"h2load-{port}-{connections}.log"
    argv = [
        "h2load",
        f"-c{connections}",
        f"-t{min(connections, 2)}",
        "-m1",
        f"-D{max(duration, 1)}",
        "-d",
        str(body),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--log-file",
        str(log),
    ]
    for h in headers:
        argv += ["-H", h]
    argv.append(f"http://127.0.0.1:{port}{GRPC_UNARY}")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True)
    return parse_h2load(done.stdout, log.read_text())


def wrk(port: int, connections: int, duration: int, headers: tuple[str, ...]) -> WrkResult:
    """`duration` in whole seconds: wrk takes no fractions."""
    argv = [
        "wrk",
        f"-t{min(connections, 2)}",
        f"-c{connections}",
        f"-d{max(duration, 1)}s",
        "--timeout=10s",
        "--latency",
    ]
    for h in headers:
        argv += ["-H", h]
    argv.append(f"http://127.0.0.1:{port}/")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True)
    return parse_wrk(done.stdout)


# --- scenarios ---------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    connections: int
    requests: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    cpu_s_per_1k: float | None = None
    """The proxy's CPU seconds per 1,000 requests (None where no proxy is on the path)."""
    peak_rss_mib: float | None = None
    note: str = ""
    baseline: str = "direct"
    """The row (at the same connections) that "vs direct" compares with."""


@dataclass
class Results:
    machine: dict[str, str]
    settings: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    rss: dict[str, Any] = field(default_factory=dict)
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    """key -> label and Python function calls per request (cProfile)."""
    idle_ab: dict[str, list[float]] = field(default_factory=dict)
    """req/s at 16 connections to the app, runs "without" and "with" an idle sidecar."""
    cpu_rounds: dict[str, dict[str, Any]] = field(default_factory=dict)
    """key -> label and CPU s/1k at 16 connections of each round (bare, 1 and N sessions)."""
    targets: list[dict[str, Any]] = field(default_factory=list)
    hostile: dict[str, Any] = field(default_factory=dict)
    """Peak RSS under idle unauthenticated websockets and slow callers; latency of
    plain requests beside benign and crafted (backtracking) ones."""
    not_measured: list[dict[str, str]] = field(default_factory=list)


def _grpc_answer(port: int, headers: tuple[str, ...]) -> str:
    """Who answers a unary call (the benchmark's gRPC servers say their name)."""
    import grpc

    metadata = tuple(tuple(h.lower().split(": ", 1)) for h in headers)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = channel.unary_unary(GRPC_UNARY)(GRPC_MESSAGE, metadata=metadata, timeout=10)
    name, _, echoed = bytes(answer).partition(b":")
    return name.decode() if echoed == GRPC_MESSAGE else repr(answer)


def _wait_grpc(port: int, proc: Proc, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on port {port} within {timeout} s")


def _answer(port: int, headers: tuple[str, ...]) -> str:
    hdrs = dict(h.split(": ", 1) for h in headers)
    return httpx.get(f"http://127.0.0.1:{port}/", headers=hdrs, timeout=10).text.strip()


class Bench:
    def __init__(self, bed: Bed, args: argparse.Namespace, log: Callable[[str], None]):
        self.bed = bed
        self.args = args
        self.log = log
        self.app_port, self.local_port = free_ports(2)
        self.token_file = bed.work / "token"
        self.token_file.write_text(secrets.token_hex(32) + "\n")
        self.host = SessionHost()
        self.rows: list[Row] = []
        self.rss: dict[str, Any] = {}
        self.calls: dict[str, dict[str, Any]] = {}
        self.idle_ab: dict[str, list[float]] = {}
        self.cpu_rounds: dict[str, dict[str, Any]] = {}
        self.hostile: dict[str, Any] = {}

    def start_apps(self) -> None:
        servers = "\n".join(
            f'server {{ listen 127.0.0.1:{port}; location / {{ return 200 "{name}\\n"; }} }}'
            for name, port in (("app", self.app_port), ("local", self.local_port))
        )
        app = self.bed.nginx("apps", servers)
        _wait_http(self.app_port, app)
        _wait_http(self.local_port, app)

    def measure(
        self,
        key: str,
        label: str,
        port: int,
        proxy: Proc | None,
        *,
        headers: tuple[str, ...] = COMMON_HEADERS,
        expect: str = "app",
        note: str = "",
        grpc: bool = False,
    ) -> None:
        got = _grpc_answer(port, headers) if grpc else _answer(port, headers)
        if got != expect:
            raise RuntimeError(f"{label}: expected the {expect} to answer, got {got!r}")

        def load(connections: int, seconds: int) -> WrkResult:
            if grpc:
                return h2load(port, connections, seconds, headers, self.bed.work)
            return wrk(port, connections, seconds, headers)

        for connections in (1, 16):
            if self.args.warmup:
                load(connections, self.args.warmup)
            before = proxy.cpu_seconds() if proxy else 0.0
            r = load(connections, self.args.duration)
            cpu = proxy.cpu_seconds() - before if proxy else None
            row = Row(
                key=key,
                label=label,
                connections=connections,
                requests=r.requests,
                rps=r.rps,
                p50_ms=r.p50_ms,
                p99_ms=r.p99_ms,
                errors=r.errors,
                cpu_s_per_1k=(cpu / r.requests * 1000) if cpu is not None and r.requests else None,
                peak_rss_mib=proxy.memory_kib("VmHWM") / 1024 if proxy else None,
                note=note,
                baseline="grpc_direct" if grpc else "direct",
            )
            self.rows.append(row)
            self.log(
                f"  {label:<22} c={connections:<3} {r.rps:9.0f} req/s  p50 {r.p50_ms:7.3f} ms"
                f"  p99 {r.p99_ms:7.3f} ms  errors {r.errors}"
            )

    def sidecar(
        self,
        app_port: int | None = None,
        workers: int = 1,
        profile: Path | None = None,
        extra: tuple[str, ...] = (),
    ) -> tuple[Proc, int, str]:
        listen, control = free_ports(2, avoid=(self.app_port, self.local_port))
        proc = self.bed.start(
            f"sidecar-{listen}",
            [
                *_python(profile),
                "sidecar",
                "engine",  # the proxy engine on its own: what a request passes through
                f"--app-port={app_port or self.app_port}",
                f"--listen-port={listen}",
                "--listen-host=127.0.0.1",
                f"--control-port={control}",
                "--control-host=127.0.0.1",
                f"--token-file={self.token_file}",
                "--capture=none",
                "--log-level=warning",
                f"--workers={workers}",
                *extra,
            ],
            with_children=workers > 1,
        )
        # The session server starts last: once /healthz answers, all of it is up.
        _wait_http(control, proc, path="/healthz")
        return proc, listen, f"ws://127.0.0.1:{control}"

    def with_sessions(
        self,
        specs: list[SessionSpec],
        app_port: int | None = None,
        to_port: int | None = None,
        workers: int = 1,
        profile: Path | None = None,
    ) -> tuple[Proc, int]:
        proc, listen, control_url = self.sidecar(app_port, workers, profile)
        if specs:
            token = self.token_file.read_text().strip()
            self.host.open(control_url, token, to_port or self.local_port, specs)
        return proc, listen

    def end_sidecar(self, proc: Proc) -> None:
        self.host.close_all()
        self.bed.stop(proc)

    def run_all(self) -> None:
        self.start_apps()
        for key in self.args.only:
            getattr(self, f"_run_{key}")()

    def _nothing(self, n: int) -> list[SessionSpec]:
        """n team-preview sessions whose keys the benchmark's requests never carry."""
        return [
            SessionSpec(http_filter=HttpFilterSpec(header_filter=f"^x-preview: dev{i}$"))
            for i in range(n)
        ]

    def _run_direct(self) -> None:
        self.measure("direct", "direct", self.app_port, None)

    def _bare(self, profile: Path | None = None) -> tuple[Proc, int]:
        port = free_port()
        argv = [*_python(profile), "tests.bench.bare_mitmproxy", str(self.app_port), str(port)]
        bare = self.bed.start(f"bare-mitmproxy-{port}", argv)
        _wait_http(port, bare)
        return bare, port

    def _run_calls(self) -> None:
        n = self.args.sessions
        variants: list[tuple[str, str, list[SessionSpec] | None]] = [
            ("bare", "bare mitmproxy", None),
            ("one_session", "1 session", self._nothing(1)),
            ("many_sessions", f"{n} sessions", self._nothing(n)),
        ]
        for key, label, specs in variants:
            counted = []
            for seconds in (1, 1 + self.args.duration):
                profile = self.bed.work / f"calls-{key}-{seconds}.prof"
                if specs is None:
                    proc, port = self._bare(profile)
                else:
                    proc, port = self.with_sessions(specs, profile=profile)
                requests = wrk(port, 16, seconds, COMMON_HEADERS).requests
                if specs is None:
                    self.bed.stop(proc)
                else:
                    self.end_sidecar(proc)
                counted.append((requests, pstats.Stats(str(profile)).total_calls))
            (r1, c1), (r2, c2) = counted
            if r2 <= r1:
                raise RuntimeError(f"calls: {label}: the longer load made no more requests")
            per_request = (c2 - c1) / (r2 - r1)
            self.calls[key] = {"label": label, "per_request": per_request}
            self.log(f"  {label:<22} {per_request:9.0f} Python calls per request")

    def _run_bare(self) -> None:
        bare, port = self._bare()
        self.measure("bare", "bare mitmproxy", port, bare)
        self.bed.stop(bare)

    def _run_idle(self) -> None:
        proc, _ = self.with_sessions([])
        self.measure("idle", "idle sidecar", self.app_port, proc, note="not on the path")
        self.end_sidecar(proc)
        # The rows above are measured minutes apart, and on a shared machine that alone
        # moves req/s by several percent. The only difference an idle sidecar makes is
        # that its process exists, so compare that directly: runs with and without it,
        # alternating (ABBA) so that neither side is always the later one.
        without: list[float] = []
        beside: list[float] = []
        for i in range(self.args.rounds):
            for running in (False, True) if i % 2 == 0 else (True, False):
                proc = self.with_sessions([])[0] if running else None
                if self.args.warmup:
                    wrk(self.app_port, 16, self.args.warmup, COMMON_HEADERS)
                rps = wrk(self.app_port, 16, self.args.duration, COMMON_HEADERS).rps
                (beside if running else without).append(rps)
                if proc:
                    self.end_sidecar(proc)
        self.idle_ab = {"without": without, "with": beside}
        self.log(
            f"  idle A/B, c=16: without the sidecar {statistics.median(without):.0f} req/s,"
            f" with it idle {statistics.median(beside):.0f} req/s"
            f" (medians of {len(without)} alternating runs each)"
        )

    def _run_no_session(self) -> None:
        proc, listen = self.with_sessions([])
        self.measure("no_session", "no session", listen, proc)
        self.end_sidecar(proc)

    def _run_one_session(self) -> None:
        proc, listen = self.with_sessions(self._nothing(1))
        self.measure("one_session", "1 session", listen, proc)
        self.end_sidecar(proc)

    def _run_many_sessions(self) -> None:
        proc, listen = self.with_sessions(self._nothing(self.args.sessions))
        self.measure("many_sessions", f"{self.args.sessions} sessions", listen, proc)
        self.end_sidecar(proc)

    def _run_cpu_rounds(self) -> None:
        """The CPU targets compare bare mitmproxy, 1 session and N sessions. Their rows
        are minutes apart, and on a shared machine CPU time per request drifts by
        10-20% in that time; here the three take turns, rotating their order each
        round, and the targets read the medians. Bare mitmproxy runs twice a round,
        as two variants: how far apart those come out is the noise floor."""
        n = self.args.sessions
        variants: list[tuple[str, str, list[SessionSpec] | None]] = [
            ("bare", "bare mitmproxy", None),
            ("one_session", "1 session", self._nothing(1)),
            ("many_sessions", f"{n} sessions", self._nothing(n)),
            ("bare_again", "bare mitmproxy again", None),
        ]
        samples: dict[str, list[float]] = {key: [] for key, _, _ in variants}
        for i in range(self.args.rounds):
            shift = i % len(variants)
            for key, label, specs in variants[shift:] + variants[:shift]:
                proc, port = self._bare() if specs is None else self.with_sessions(specs)
                if (got := _answer(port, COMMON_HEADERS)) != "app":
                    raise RuntimeError(f"CPU rounds: {label}: expected the app, got {got!r}")
                if self.args.warmup:
                    wrk(port, 16, self.args.warmup, COMMON_HEADERS)
                before = proc.cpu_seconds()
                r = wrk(port, 16, self.args.duration, COMMON_HEADERS)
                samples[key].append((proc.cpu_seconds() - before) / r.requests * 1000)
                if specs is None:
                    self.bed.stop(proc)
                else:
                    self.end_sidecar(proc)
        self.cpu_rounds = {
            key: {"label": label, "cpu_s_per_1k": samples[key]} for key, label, _ in variants
        }
        medians = ", ".join(
            f"{label} {statistics.median(samples[key]):.3f}" for key, label, _ in variants
        )
        self.log(f"  CPU s/1k at c=16, medians of {self.args.rounds} rounds: {medians}")

    def _run_workers(self) -> None:
        for n in self.args.workers:
            proc, listen = self.with_sessions(self._nothing(1), workers=n)
            self.measure(f"workers_{n}", f"1 session, {n} workers", listen, proc)
            self.end_sidecar(proc)

    def _run_connections(self) -> None:
        for key, label, connect in (
            ("conn_request", "per-req. conn, lazy", "request"),
            ("conn_accept", "per-req. conn, eager", "accept"),
        ):
            proc, listen, _ = self.sidecar(extra=(f"--app-connect={connect}",))
            headers = (*COMMON_HEADERS, "Connection: close")
            self.measure(key, label, listen, proc, headers=headers)
            self.bed.stop(proc)

    def _run_hostile(self) -> None:
        hold = self.args.hostile_hold
        proc, listen, control_url = self.sidecar(extra=(f"--header-timeout={hold / 2:g}",))
        control = int(control_url.rsplit(":", 1)[1])
        idle = proc.memory_kib("VmRSS")
        crowd = asyncio.run(_hostile_crowd(listen, control, hold, 1000, 300))
        peak = proc.memory_kib("VmHWM")
        self.bed.stop(proc)
        memory = {
            "idle_rss_mib": idle / 1024, "peak_rss_mib": peak / 1024, "hold_s": hold,
            "header_timeout_s": hold / 2, **crowd,
        }  # fmt: skip
        self.log(
            f"  hostile: RSS {idle / 1024:.0f} MiB idle, peak {peak / 1024:.0f} MiB with "
            f"{crowd['websockets']} websockets without HELLO ({crowd['websockets_closed']} "
            f"closed by the sidecar) and {crowd['slow']} slow callers "
            f"({crowd['slow_408']} answered 408) for {hold:g} s"
        )

        proc, listen = self.with_sessions([BACKTRACKS])
        if _answer(listen, (CRAFTED,)) != "app":
            raise RuntimeError("hostile: a crafted request was not served by the app")
        latency: dict[str, dict[str, float]] = {}
        for name, beside in (("alone", None), ("benign", BENIGN), ("crafted", CRAFTED)):
            flood = None
            if beside is not None:
                argv = ["wrk", "-t1", "-c100", f"-d{self.args.duration + 2}s", "--timeout=10s",
                        "-H", beside, f"http://127.0.0.1:{listen}/"]  # fmt: skip
                flood = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
                time.sleep(0.5)
            r = wrk(listen, 1, self.args.duration, COMMON_HEADERS)
            if flood is not None:
                flood.wait(self.args.duration + 30)
            latency[name] = {"p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "rps": r.rps}
        self.end_sidecar(proc)
        ratio = latency["crafted"]["p99_ms"] / latency["benign"]["p99_ms"]
        self.log(
            "  backtracking: plain requests p50/p99 "
            + ", ".join(f"{k} {v['p50_ms']:.2f}/{v['p99_ms']:.2f} ms" for k, v in latency.items())
            + f"; p99 beside crafted / beside benign {ratio:.2f}x"
        )
        self.hostile = {"memory": memory, "backtracking": latency, "p99_ratio": ratio}

    def _run_stolen(self) -> None:
        proc, listen = self.with_sessions([BENCH_SESSION])
        headers = (*COMMON_HEADERS, PREVIEW)
        self.measure("stolen", "stolen", listen, proc, headers=headers, expect="local")
        self.end_sidecar(proc)

    def _run_mirror(self) -> None:
        proc, listen = self.with_sessions([BENCH_SESSION.model_copy(update={"mode": Mode.MIRROR})])
        copies_before = self.host.reports
        self.measure("mirror", "mirror", listen, proc, headers=(*COMMON_HEADERS, PREVIEW))
        copies = self.host.reports - copies_before
        self.end_sidecar(proc)
        if not copies:
            raise RuntimeError("mirror: no copy reached the local side; the row measured nothing")
        for row in self.rows[-2:]:
            row.note = f"{copies} copies reached the local side in both runs"

    def _run_c_proxies(self) -> None:
        route_port = free_port()
        nginx = self.bed.nginx(
            "nginx-router",
            f"""
server {{
    listen 127.0.0.1:{route_port};
    location / {{
        proxy_pass http://$offramp_pool;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
    }}
}}""",
            extra_http=f"""
upstream app {{ server 127.0.0.1:{self.app_port}; keepalive 64; }}
upstream local {{ server 127.0.0.1:{self.local_port}; keepalive 64; }}
map $http_x_preview $offramp_pool {{ default app; "bench" local; }}""",
        )
        _wait_http(route_port, nginx)
        if _answer(route_port, (PREVIEW,)) != "local":
            raise RuntimeError("the nginx router does not route x-preview: bench to local")
        self.measure("nginx", "nginx (header route)", route_port, nginx)
        self.bed.stop(nginx)

        route_port = free_port()
        cfg = self.bed.work / "haproxy.cfg"
        cfg.write_text(
            f"""
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend route
    bind 127.0.0.1:{route_port}
    acl preview req.hdr(x-preview) -m str bench
    use_backend local if preview
    default_backend app
backend app
    server app 127.0.0.1:{self.app_port}
backend local
    server local 127.0.0.1:{self.local_port}
"""
        )
        haproxy = self.bed.start("haproxy", ["haproxy", "-db", "-f", str(cfg)])
        _wait_http(route_port, haproxy)
        if _answer(route_port, (PREVIEW,)) != "local":
            raise RuntimeError("the haproxy router does not route x-preview: bench to local")
        self.measure("haproxy", "haproxy (header route)", route_port, haproxy)
        self.bed.stop(haproxy)

    def _run_grpc(self) -> None:
        app_port, local_port = free_ports(2, avoid=(self.app_port, self.local_port))
        servers = []
        for name, port in (("app", app_port), ("local", local_port)):
            argv = [sys.executable, "-m", "tests.bench.grpc_server", name, str(port)]
            servers.append(self.bed.start(f"grpc-{name}", argv))
            _wait_grpc(port, servers[-1])
        self.measure("grpc_direct", "gRPC direct", app_port, None, grpc=True)
        proc, listen = self.with_sessions(self._nothing(1), app_port, local_port)
        self.measure("grpc_passed", "gRPC passed (1 sess.)", listen, proc, grpc=True)
        self.end_sidecar(proc)
        proc, listen = self.with_sessions([BENCH_SESSION], app_port, local_port)
        self.measure(
            "grpc_stolen", "gRPC stolen", listen, proc, headers=(PREVIEW,), expect="local",
            grpc=True,
        )  # fmt: skip
        self.end_sidecar(proc)
        for server in servers:
            self.bed.stop(server)

    def _run_rss(self) -> None:
        """One sidecar, one non-matching session, RSS sampled between rounds of load."""
        spec = SessionSpec(http_filter=HttpFilterSpec(header_filter="^x-preview: nobody$"))
        proc, listen = self.with_sessions([spec])
        samples: list[tuple[int, int]] = []
        total = 0
        deadline = time.monotonic() + self.args.rss_max_seconds
        while total < self.args.rss_requests and time.monotonic() < deadline:
            total += wrk(listen, 16, self.args.duration, COMMON_HEADERS).requests
            samples.append((total, proc.memory_kib("VmRSS")))
        self.end_sidecar(proc)
        # The first round is the warm-up: caches, pools and the allocator settle.
        base = samples[0][1]
        growth = (samples[-1][1] - base) / base * 100
        self.log(
            f"  RSS after {samples[0][0]} requests: {base / 1024:.1f} MiB; after {total}:"
            f" {samples[-1][1] / 1024:.1f} MiB ({growth:+.1f}%)"
        )
        self.rss = {"samples": samples, "requests": total, "growth_percent": growth}


async def _hostile_crowd(
    listen: int, control: int, hold: float, websockets: int, slow: int
) -> dict[str, int]:
    """Open `websockets` upgrades on the control port that never send a HELLO and
    `slow` connections that send a request head a byte a second, for `hold`
    seconds; count how many of each the sidecar closed (and answered 408)."""
    upgrade = (
        b"GET /v1/tunnel HTTP/1.1\r\nHost: sidecar\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    end = time.monotonic() + hold

    async def idle_websocket() -> bool:
        """True once the sidecar closed it or began its closing handshake."""
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", control)
            try:
                writer.write(upgrade)
                got = b""
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, end - time.monotonic())):
                        while piece := await reader.read(4096):
                            got += piece
                            after_head = got.partition(b"\r\n\r\n")[2]
                            if after_head.startswith(b"\x88") or not got.startswith(
                                b"HTTP/1.1 101"
                            ):
                                return True
                        return True
            finally:
                writer.close()
        return False

    async def slow_caller() -> bool:
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", listen)
            try:
                writer.write(b"GET /slow HTTP/1.1\r\nHost: app\r\n")
                while time.monotonic() < end and not reader.at_eof():
                    with contextlib.suppress(TimeoutError):
                        if answer := await asyncio.wait_for(reader.read(4096), 1.0):
                            return answer.startswith(b"HTTP/1.1 408 ")
                    with contextlib.suppress(OSError):
                        writer.write(b"x")
            finally:
                writer.close()
        return False

    closed = asyncio.gather(*(idle_websocket() for _ in range(websockets)))
    answered = asyncio.gather(*(slow_caller() for _ in range(slow)))
    return {
        "websockets": websockets,
        "websockets_closed": sum(await closed),
        "slow": slow,
        "slow_408": sum(await answered),
    }


# --- report ------------------------------------------------------------------


def _row(rows: list[Row], key: str, connections: int) -> Row | None:
    return next((r for r in rows if r.key == key and r.connections == connections), None)


def targets(
    rows: list[Row],
    rss: dict[str, Any],
    calls: dict[str, dict[str, Any]] | None = None,
    idle_ab: dict[str, list[float]] | None = None,
    cpu_rounds: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, unit: str) -> None:
        if value is not None:
            out.append({"target": name, "value": value, "limit": limit, "unit": unit,
                        "met": value <= limit})  # fmt: skip

    def ratio_pct(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else (a / b - 1) * 100

    direct, idle = _row(rows, "direct", 16), _row(rows, "idle", 16)
    if idle_ab and idle_ab.get("without") and idle_ab.get("with"):
        without, beside = (statistics.median(idle_ab[k]) for k in ("without", "with"))
        add(f"idle sidecar: req/s below no sidecar (medians of {len(idle_ab['with'])}"
            " alternating runs)", (1 - beside / without) * 100, 2, "%")  # fmt: skip
    elif direct and idle:
        add("idle sidecar: req/s below direct", (1 - idle.rps / direct.rps) * 100, 2, "%")
    # CPU per request at 16 connections: from the interleaved rounds where they ran,
    # else from the rows.
    cpu: dict[str, float | None] = {}
    labels: dict[str, str] = {}
    how = ""
    if cpu_rounds:
        rounds = len(next(iter(cpu_rounds.values()))["cpu_s_per_1k"])
        how = f" (medians of {rounds} rounds)"
        for key, c in cpu_rounds.items():
            cpu[key], labels[key] = statistics.median(c["cpu_s_per_1k"]), c["label"]
    else:
        for key in ("bare", "one_session", "many_sessions"):
            if row := _row(rows, key, 16):
                cpu[key], labels[key] = row.cpu_s_per_1k, row.label
    if "one_session" in cpu and "bare" in cpu:
        add(f"1 session: CPU per request above bare mitmproxy{how}",
            ratio_pct(cpu["one_session"], cpu["bare"]), 10, "%")  # fmt: skip
    if "many_sessions" in cpu and "one_session" in cpu:
        add(f"{labels['many_sessions']}: CPU per request above 1 session{how}",
            ratio_pct(cpu["many_sessions"], cpu["one_session"]), 10, "%")  # fmt: skip
    calls = calls or {}
    per = {key: c["per_request"] for key, c in calls.items()}
    if "one_session" in per and "bare" in per:
        add("1 session: Python calls per request above bare mitmproxy",
            ratio_pct(per["one_session"], per["bare"]), 10, "%")  # fmt: skip
    if "many_sessions" in per and "one_session" in per:
        add(f"{calls['many_sessions']['label']}: Python calls per request above 1 session",
            ratio_pct(per["many_sessions"], per["one_session"]), 10, "%")  # fmt: skip
    one1, stolen1 = _row(rows, "one_session", 1), _row(rows, "stolen", 1)
    if one1 and stolen1:
        add("stolen: p50 above passed, 1 connection", stolen1.p50_ms - one1.p50_ms, 1, "ms")
    if rss:
        add(f"RSS growth across {rss['requests']} requests", rss["growth_percent"], 5, "%")
    return out


def scaling_rows(rows: list[Row]) -> list[tuple[int, Row]]:
    """(workers, row) of the scaling rows at 16 connections, fewest workers first."""
    found = [(int(r.key.removeprefix("workers_")), r) for r in rows
             if r.key.startswith("workers_") and r.connections == 16]  # fmt: skip
    return sorted(found, key=lambda item: item[0])


def table(results: Results) -> str:
    rows = results.rows
    lines = [
        f"{'scenario':<22} {'conns':>5} {'req/s':>9} {'vs direct':>9} {'p50 ms':>8}"
        f" {'p99 ms':>8} {'CPU s/1k':>9} {'vs bare':>8} {'peak RSS':>9} {'errors':>6}"
    ]
    for r in rows:
        direct = _row(rows, r.baseline, r.connections)
        # gRPC rows have no bare-mitmproxy row to compare with: it speaks no h2c.
        bare = _row(rows, "bare", r.connections) if r.baseline == "direct" else None
        vs_direct = f"{r.rps / direct.rps:.2f}x" if direct and direct.rps else "-"
        cpu = f"{r.cpu_s_per_1k:.3f}" if r.cpu_s_per_1k is not None else "-"
        vs_bare = (
            f"{r.cpu_s_per_1k / bare.cpu_s_per_1k:.2f}x"
            if bare and bare.cpu_s_per_1k and r.cpu_s_per_1k is not None
            else "-"
        )
        rss = f"{r.peak_rss_mib:.0f} MiB" if r.peak_rss_mib is not None else "-"
        lines.append(
            f"{r.label:<22} {r.connections:>5} {r.rps:>9.0f} {vs_direct:>9} {r.p50_ms:>8.3f}"
            f" {r.p99_ms:>8.3f} {cpu:>9} {vs_bare:>8} {rss:>9} {r.errors:>6}"
        )
    if scaling := scaling_rows(rows):
        base = scaling[0][1].rps
        steps = ", ".join(f"{n}: {r.rps:.0f} req/s ({r.rps / base:.2f}x)" for n, r in scaling)
        lines.append(f"workers, 16 connections: {steps}")
    if ab := results.idle_ab:
        without, beside = (statistics.median(ab[k]) for k in ("without", "with"))
        lines.append(
            f"idle sidecar A/B, 16 connections to the app: without it {without:.0f} req/s,"
            f" with it running {beside:.0f} req/s (medians of {len(ab['with'])} alternating runs)"
        )
    if rounds := results.cpu_rounds:
        n = len(next(iter(rounds.values()))["cpu_s_per_1k"])
        medians = ", ".join(
            f"{c['label']} {statistics.median(c['cpu_s_per_1k']):.3f}" for c in rounds.values()
        )
        lines.append(f"CPU s/1k at 16 connections, medians of {n} interleaved rounds: {medians}")
        if "bare" in rounds and "bare_again" in rounds:
            a, b = (statistics.median(rounds[k]["cpu_s_per_1k"]) for k in ("bare", "bare_again"))
            lines.append(
                f"noise floor: the same bare mitmproxy, measured twice a round, {b / a - 1:+.1%}"
            )
    if results.calls:
        counts = ", ".join(f"{c['label']} {c['per_request']:.0f}" for c in results.calls.values())
        lines.append(f"Python calls per request (cProfile): {counts}")
    if hostile := results.hostile:
        m, lat = hostile["memory"], hostile["backtracking"]
        lines.append(
            f"hostile callers: sidecar RSS {m['idle_rss_mib']:.0f} MiB idle, peak "
            f"{m['peak_rss_mib']:.0f} MiB with {m['websockets']} websockets without HELLO and "
            f"{m['slow']} slow-header callers held {m['hold_s']:g} s"
        )
        lines.append(
            "plain requests, p50/p99 ms: "
            + ", ".join(f"{k} {v['p50_ms']:.2f}/{v['p99_ms']:.2f}" for k, v in lat.items())
            + f"; p99 beside 100 crafted / beside 100 benign: {hostile['p99_ratio']:.2f}x"
        )
    for item in results.not_measured:
        lines.append(f"{item['label']:<22} not measured: {item['why']}")
    if results.targets:
        lines.append("")
        lines.append("targets:")
        for t in results.targets:
            mark = "met" if t["met"] else "NOT met"
            lines.append(
                f"  {t['target']}: {t['value']:+.2f} {t['unit']} (limit {t['limit']} {t['unit']}):"
                f" {mark}"
            )
    return "\n".join(lines)


def chart(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.label for r in results.rows))
    scaling = scaling_rows(results.rows)
    panels = 3 if scaling else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5))
    ax_rps, ax_cpu = axes[0], axes[1]
    width = 0.4
    for i, conns in enumerate((1, 16)):
        values = [next((r.rps for r in results.rows if r.label == label and
                        r.connections == conns), 0.0) for label in labels]  # fmt: skip
        ax_rps.barh([y + i * width for y in range(len(labels))], values, width,
                    label=f"{conns} connection{'s' if conns > 1 else ''}")  # fmt: skip
    ax_rps.set_yticks([y + width / 2 for y in range(len(labels))], labels)
    ax_rps.invert_yaxis()
    if labels:
        ax_rps.set_xscale("log")
    ax_rps.set_xlabel("requests/s, log scale (higher is better)")
    ax_rps.legend()
    cpu_rows = [r for r in results.rows if r.connections == 16 and r.cpu_s_per_1k is not None]
    ax_cpu.barh([r.label for r in cpu_rows], [r.cpu_s_per_1k or 0.0 for r in cpu_rows])
    ax_cpu.invert_yaxis()
    ax_cpu.set_xlabel("proxy CPU s per 1,000 requests at 16 connections\n(lower is better)")
    if scaling:
        ax = axes[2]
        counts = [n for n, _ in scaling]
        ax.plot(counts, [r.rps for _, r in scaling], "o-", label="1 session, W workers")
        first = scaling[0][1].rps / scaling[0][0]
        ax.plot(counts, [first * n for n in counts], ":", color="gray", label="linear")
        bare = _row(results.rows, "bare", 16)
        if bare:
            ax.axhline(bare.rps, linestyle="--", color="gray", linewidth=0.8)
            ax.annotate("bare mitmproxy (1 process)", (counts[0], bare.rps * 1.03), fontsize=8)
        ax.set_ylim(0, max(first * counts[-1], *(r.rps for _, r in scaling)) * 1.1)
        ax.set_xticks(counts)
        ax.set_xlabel(f"sidecar processes (--workers); the machine has {os.cpu_count()} cores")
        ax.set_ylabel("requests/s at 16 connections")
        ax.legend()
    fig.suptitle(f"offramp sidecar cost, {results.machine['cpu']} ({results.machine['cores']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _version(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (done.stdout + done.stderr).strip().splitlines()
        return text[0] if text else ""
    return ""


def machine() -> dict[str, str]:
    import mitmproxy.version

    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": f"{os.cpu_count()} cores",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "nginx": _version(["nginx", "-v"]),
        "haproxy": _version(["haproxy", "-v"]),
        "wrk": _version(["wrk", "-v"]),
        "h2load": _version(["h2load", "--version"]),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=int, default=5, help="seconds per measurement (whole)")
    p.add_argument("--warmup", type=int, default=1, help="seconds of load before each (0: none)")
    p.add_argument("--sessions", type=int, default=100, help="sessions in the N-sessions row")
    p.add_argument("--rss-requests", type=int, default=100_000, help="requests for the RSS check")
    p.add_argument(
        "--rss-max-seconds", type=float, default=300.0, help="time bound of the RSS check"
    )
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the results")
    p.add_argument(
        "--hostile-hold",
        type=float,
        default=10.0,
        help="seconds the hostile part holds its idle websockets and slow callers",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a quick run that only shows the benchmark works (numbers mean nothing)",
    )
    p.add_argument(
        "--only",
        type=lambda text: [part.strip() for part in text.split(",")],
        default=list(PARTS),
        help=f"comma-separated parts to run, of: {', '.join(PARTS)} (default: all)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds of the interleaved runs the idle and CPU targets are read from (default 5)",
    )
    p.add_argument(
        "--workers",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 2, 4],
        help="sidecar process counts for the scaling rows, comma-separated (default 1,2,4)",
    )
    args = p.parse_args(argv)
    if unknown := set(args.only) - set(PARTS):
        p.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if args.tiny:
        args.duration, args.warmup, args.sessions = 1, 0, 5
        args.rss_requests, args.rss_max_seconds = 1000, 20.0
        args.workers = [1, 2]
        args.rounds = 1
        args.hostile_hold = 3.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if missing := missing_tools():
        print(f"the benchmark needs {', '.join(missing)} (apt-get install {APT_PACKAGES})")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(
        machine=machine(),
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    )
    print(f"machine: {results.machine['cpu']}, {results.machine['cores']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="offramp-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx workers may run as another user
        bed = Bed(work)
        bench = Bench(bed, args, lambda line: print(line, flush=True))
        try:
            bench.run_all()
        finally:
            with contextlib.suppress(Exception):
                bench.host.close_all()
            bench.host.shutdown()
            bed.close()
    results.rows = bench.rows
    results.rss = bench.rss
    results.calls = bench.calls
    results.idle_ab = bench.idle_ab
    results.cpu_rounds = bench.cpu_rounds
    results.hostile = bench.hostile
    results.targets = targets(
        results.rows, results.rss, results.calls, results.idle_ab, results.cpu_rounds
    )
    text = table(results)
    print()
    print(text)
    (args.out / "results.json").write_text(
        json.dumps({**asdict(results), "table": text}, indent=2) + "\n"
    )
    chart(results, args.out / "results.png")
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'results.png'}")
    return 0
