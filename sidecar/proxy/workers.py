"""Several proxy processes behind one listening port (`offramp-sidecar --workers N`).

One Python process runs one event loop on one core; a pod given more cores
gets more throughput only from more processes. With `--workers N` the sidecar
runs N processes that all listen on each proxy port, bound with SO_REUSEPORT,
so the kernel spreads new connections over them:

- the primary (the process `offramp-sidecar` started) owns everything a session
  needs: the session server, the tunnels, the gateway and capture. It proxies
  its share of connections like any worker.
- N-1 workers (`python -m sidecar.proxy.workers`, children of the primary) run a bare
  mitmproxy with `ProtocolDetect` and `HandoffAddon`. The primary sends each
  worker the open sessions' specs on every change (JSON lines on its stdin,
  numbered; the worker answers `applied N` on its stdout), and welcomes a new
  session only once every worker has applied it. A worker compiles the
  filters and decides every request itself. What no
  session wants goes straight to the app. A request that a session may want is
  sent, with its caller's address, to the primary's handoff listener for that
  port on 127.0.0.1, where the primary decides again and steals or mirrors it.
  A session that closed in between finds the primary sending the request to the
  app, as for a request that arrives just after a session ends.

A worker counts its own filter timeouts (see `sidecar.sessions.filters`) per
session and, when they grew, writes them (`timeouts {"s1": 3}`) at most every
TIMEOUT_REPORT_EVERY seconds; the primary adds them to the session's count, so
the developer hears of every process's.

A worker ends when its stdin closes (the primary exited, however it died) or on
SIGTERM: it stops listening, lets its requests finish for up to the drain
timeout, and exits. On SIGTERM the primary stops its own proxy listeners,
waits for the workers (their handed-over requests still reach it), then
drains. A worker that dies while the primary runs is started again; one that
does not come up at start fails the sidecar's start.

mitmproxy has no option for SO_REUSEPORT; `reuse_port_listeners` replaces
`ReverseInstance.listen` (mitmproxy 12.2.3, `proxy/mode_servers.py`), which
binds one TCP socket per reverse-mode listener, in the processes that use it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mitmproxy import http
from mitmproxy.addons import proxyserver
from mitmproxy.proxy import mode_servers
from pydantic import BaseModel, ConfigDict

from sidecar.proxy import connections
from sidecar.proxy.connections import AppConnect
from sidecar.proxy.flows import (
    InFlight,
    add_forwarded_for,
    answer_preview_link,
    peer_of,
    refuse_malformed,
    request_view,
)
from sidecar.proxy.h2c import new_master
from sidecar.sessions.filters import (
    TIMEOUT_REPORT_EVERY,
    FilterError,
    Predicate,
    TimeoutCounter,
    compile_filter,
)
from sidecar.sessions.router import SessionIndex, decide, is_probe
from sidecar.sessions.spec import Mode, SessionSpec

__all__ = [
    "HANDOFF_HEADER",
    "Handoff",
    "HandoffAddon",
    "WorkerConfig",
    "WorkerPool",
    "close_client_connections",
    "reuse_port_listeners",
]

log = logging.getLogger("offramp.workers")

HANDOFF_HEADER = "x-offramp-handoff"
"""Set by a worker on a request it hands to the primary: `SECRET PEER`."""

_APPLIED = "applied"
_TIMEOUTS = "timeouts"
_START_TIMEOUT = 30.0
_RESTART_DELAY = 1.0


def reuse_port_listeners() -> None:
    """Make this process's reverse-mode listeners bind with SO_REUSEPORT."""

    async def listen(self: mode_servers.ReverseInstance, host: str, port: int) -> list[Any]:
        if self.mode.transport_protocol != "tcp":
            raise ValueError(f"{self.mode.full_spec}: only TCP listeners can be shared")
        return [await asyncio.start_server(self.handle_stream, host or None, port, reuse_port=True)]

    mode_servers.ReverseInstance.listen = listen  # type: ignore[method-assign,assignment]


@dataclass(frozen=True, slots=True)
class Handoff:
    """The caller's address of a request a worker handed over, or None."""

    secret: str

    def take(self, request: http.Request) -> str | None:
        """Remove the handoff header; the peer it names if it carries our secret.
        A header with another secret (a caller's own) is removed and ignored."""
        values = request.headers.get_all(HANDOFF_HEADER)
        if not values:
            return None
        del request.headers[HANDOFF_HEADER]
        secret, _, peer = values[0].partition(" ")
        return peer if len(values) == 1 and secrets.compare_digest(secret, self.secret) else None


class WorkerConfig(BaseModel):
    """What the primary tells a worker when it starts it (its stdin's first line)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int
    app_host: str
    listen_host: str
    ports: tuple[tuple[int, int, int], ...]
    """(app port, the port to share, the primary's handoff port for it)."""
    secret: str
    probe_paths: frozenset[str]
    drain_timeout: float
    log_level: str
    header_timeout: float
    app_connect: AppConnect
    preview_prefix: str | None = None


# -- the primary's side ----------------------------------------------------------


@dataclass
class _Slot:
    """One worker: the process now running it and the sessions it has applied."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    applied: int = -1
    """The generation of the sessions list it last confirmed."""
    started: bool = False
    """It came up listening at least once."""
    task: asyncio.Task[None] | None = None


class WorkerPool:
    """The primary's N-1 worker processes: start them, keep them running, tell
    them the sessions (and hear that they applied them), stop them."""

    def __init__(
        self,
        count: int,
        config: WorkerConfig,
        on_timeouts: Callable[[int, dict[str, int]], None] | None = None,
    ):
        """`on_timeouts(worker index, {session id: count})` hears a worker's
        filter timeouts so far, each time they grow."""
        self.config = config
        self.on_timeouts = on_timeouts
        self._slots = [_Slot(i) for i in range(1, count)]
        self._sessions: list[dict[str, Any]] = []
        self._ids: list[str] = []
        self._generation = 0
        self._changed = asyncio.Condition()
        self._stopping = False
        self._failed: str | None = None
        self.restarts = 0

    async def start(self) -> None:
        """Start every worker; raise OSError if one does not come up listening."""
        for slot in self._slots:
            slot.task = asyncio.create_task(self._keep_running(slot))
        try:
            await asyncio.wait_for(self.synced(), _START_TIMEOUT)
        except TimeoutError:
            self._failed = f"proxy workers did not start within {_START_TIMEOUT:.0f} s"
        if self._failed is not None:
            await self.stop(0)
            raise OSError(f"{self._failed}; see the log above")

    async def _keep_running(self, slot: _Slot) -> None:
        while not self._stopping:
            code = await self._run_once(slot)
            if self._stopping:
                return
            if not slot.started:
                async with self._changed:  # it never came up: starting it again won't help
                    self._failed = f"proxy worker {slot.index} exited with {code} at start"
                    self._changed.notify_all()
                return
            log.warning("proxy worker %d exited with %s; starting it again", slot.index, code)
            self.restarts += 1
            await asyncio.sleep(_RESTART_DELAY)

    async def _run_once(self, slot: _Slot) -> int:
        config = self.config.model_copy(update={"index": slot.index})
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar.proxy.workers",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        slot.proc = proc
        proc.stdin.write(config.model_dump_json().encode() + b"\n")
        proc.stdin.write(self._sessions_line())
        if self._stopping:
            proc.stdin.close()
        # Each line: "applied GENERATION", the first once the worker listens;
        # or "timeouts {JSON}".
        while line := await proc.stdout.readline():
            word, _, number = line.decode().partition(" ")
            if word == _TIMEOUTS:
                self._heard_timeouts(slot, number)
            elif word == _APPLIED and number.strip().isdigit():
                async with self._changed:
                    slot.applied = int(number)
                    slot.started = True
                    self._changed.notify_all()
        code = await proc.wait()
        slot.applied = -1
        return code

    def _heard_timeouts(self, slot: _Slot, text: str) -> None:
        try:
            counts = json.loads(text)
        except ValueError:
            return
        if self.on_timeouts is not None and isinstance(counts, dict):
            self.on_timeouts(slot.index, {str(k): int(v) for k, v in counts.items()})

    def _sessions_line(self) -> bytes:
        message = {"generation": self._generation, "sessions": self._sessions, "ids": self._ids}
        return json.dumps(message).encode() + b"\n"

    def update(self, sessions: Sequence[tuple[str, SessionSpec]]) -> None:
        """The open sessions changed: (id, spec) oldest first, as the router sees them."""
        self._generation += 1
        self._ids = [sid for sid, _ in sessions]
        self._sessions = [spec.model_dump(mode="json") for _, spec in sessions]
        line = self._sessions_line()
        for slot in self._slots:
            stdin = slot.proc.stdin if slot.proc is not None else None
            if stdin is not None and not stdin.is_closing():
                stdin.write(line)

    async def synced(self) -> None:
        """Until every worker has applied the latest sessions. A worker being
        started again gets them when it starts; it is waited for too."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: (
                    self._failed is not None
                    or all(slot.applied >= self._generation for slot in self._slots)
                )
            )

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self._slots if s.proc is not None and s.proc.returncode is None]

    async def stop(self, drain: float) -> None:
        """Close the workers' stdin (they stop listening and drain); wait up to
        `drain` seconds and a margin, then kill what is left."""
        self._stopping = True
        for slot in self._slots:
            if slot.proc is not None and slot.proc.stdin is not None:
                slot.proc.stdin.close()
        tasks = [slot.task for slot in self._slots if slot.task is not None]
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=drain + 5)
        for slot in self._slots:
            if slot.task in late and slot.proc is not None and slot.proc.returncode is None:
                log.warning("proxy worker %d did not stop in time; killing it", slot.index)
                slot.proc.kill()
        if late:
            await asyncio.wait(late)


# -- the worker's side -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Known:
    """A session as a worker knows it: enough for the router to decide."""

    mode: Mode
    predicate: Predicate | None
    take_probes: bool


class HandoffAddon:
    """A worker's addon: the app serves what no session wants; the rest goes to
    the primary with the caller's address."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.handoff = {app: handoff for app, _, handoff in config.ports}
        self.by_port: dict[int, SessionIndex[_Known]] = {}
        self.in_flight = InFlight()
        self.timeouts: dict[str, TimeoutCounter] = {}
        """Each open session's filter timeouts in this process."""

    def apply(self, line: bytes) -> int:
        """A sessions line from the primary; returns its generation."""
        message = json.loads(line)
        specs = [SessionSpec.model_validate(s) for s in message["sessions"]]
        ids = message.get("ids") or [f"?{i}" for i in range(len(specs))]
        self.set_sessions(list(zip(ids, specs, strict=True)))
        return int(message["generation"])

    def set_sessions(self, sessions: list[tuple[str, SessionSpec]]) -> None:
        known = []
        self.timeouts = {sid: self.timeouts.get(sid) or TimeoutCounter() for sid, _ in sessions}
        for sid, spec in sessions:
            try:
                predicate = compile_filter(spec.http_filter, self.timeouts[sid])
            except FilterError as e:  # the primary compiled it; it cannot fail here
                log.error("a session's filter does not compile here: %s", e)
                continue
            known.append((spec, _Known(spec.mode, predicate, spec.take_probes)))
        self.by_port = {
            app: SessionIndex([k for spec, k in known if spec.covers_port(app)])
            for app in self.handoff
        }

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if refuse_malformed(flow) or answer_preview_link(flow, self.config.preview_prefix):
            return
        request = flow.request
        request.stream = True
        self.in_flight.add(flow)
        peer = peer_of(flow)
        add_forwarded_for(request, peer)
        sessions = self.by_port.get(request.data.port)
        if not sessions:
            return
        view = request_view(request)
        probe = is_probe(view.first("user-agent"), view.path, self.config.probe_paths)
        decision = decide(sessions.candidates(view), view, probe)
        if decision.steal is None and not decision.mirrors:
            return
        request.headers[HANDOFF_HEADER] = f"{self.config.secret} {peer}"
        request.data.port = self.handoff[request.port]
        request.data.host = "127.0.0.1"

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        assert flow.response is not None
        flow.response.stream = True


async def _read_sessions(addon: HandoffAddon, stdin: asyncio.StreamReader, out: int) -> None:
    """Apply each sessions line, and confirm it, until the primary closes the pipe."""
    while line := await stdin.readline():
        generation = addon.apply(line)
        os.write(out, f"{_APPLIED} {generation}\n".encode())


async def _report_timeouts(addon: HandoffAddon, out: int) -> None:
    said: dict[str, int] = {}
    while True:
        await asyncio.sleep(TIMEOUT_REPORT_EVERY)
        counts = {sid: c.count for sid, c in addon.timeouts.items() if c.count}
        if any(n > said.get(sid, 0) for sid, n in counts.items()):
            os.write(out, f"{_TIMEOUTS} {json.dumps(counts)}\n".encode())
            said = counts


async def _serve(stdin: asyncio.StreamReader, out: int) -> int:
    config = WorkerConfig.model_validate_json(await stdin.readline())
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker {config.index} %(name)s: %(message)s",
    )
    for name in ("mitmproxy", "hpack"):
        logging.getLogger(name).setLevel(logging.WARNING)
    reuse_port_listeners()
    connections.install(config.header_timeout)
    addon = HandoffAddon(config)
    first = await stdin.readline()
    generation = addon.apply(first)
    server = proxyserver.Proxyserver()
    master = new_master(server, addon)  # ProtocolDetect carries addon's hooks
    master.options.update(
        mode=[
            f"reverse:http://{config.app_host}:{app}@{config.listen_host}:{listen}"
            for app, listen, _ in config.ports
        ],
        keep_host_header=True,
        connection_strategy=connections.connection_strategy(config.app_connect),
    )
    running = asyncio.create_task(master.run())
    deadline = time.monotonic() + 10
    while not (server.servers and all(s.listen_addrs for s in server.servers)):
        if running.done() or time.monotonic() > deadline:
            log.error("proxy worker %d could not listen", config.index)
            return 1
        await asyncio.sleep(0.02)
    os.write(out, f"{_APPLIED} {generation}\n".encode())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reading = asyncio.create_task(_read_sessions(addon, stdin, out))
    reading.add_done_callback(lambda _: stop.set())
    reporting = asyncio.create_task(_report_timeouts(addon, out))
    await stop.wait()
    reading.cancel()
    reporting.cancel()
    await server.servers.update([])
    await addon.in_flight.drain(config.drain_timeout)
    await close_client_connections(server)
    master.shutdown()
    await running
    return 0


async def close_client_connections(server: proxyserver.Proxyserver) -> None:
    """End the connections still open (idle keep-alives, or requests past the
    drain timeout), as a disconnect would. See `sidecar.proxy.master` for why the inner
    task is the one cancelled."""
    for handler in list(server.connections.values()):
        io = handler.transports.get(handler.client)
        if io is not None and io.handler is not None:
            io.handler.cancel("the sidecar is shutting down")
    deadline = time.monotonic() + 2
    # mitmproxy signals no "last connection gone"; its table is what there is.
    while server.connections and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


def main() -> int:
    # Our stdout is for the primary: "applied N" lines. Everything else we (or a
    # library) might print goes to stderr, with our logs.
    out = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    async def run() -> int:
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader(limit=16 * 1024 * 1024)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        return await _serve(stdin, out)

    return asyncio.run(run())


if __name__ == "__main__":
    raise SystemExit(main())
