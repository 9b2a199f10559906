"""Run the sidecar: an embedded mitmproxy Master, the gateway and the session server.

The Master is bare: only the `core` and `proxyserver` addons and `ProtocolDetect`,
which carries our addon's hooks (each addon in the chain costs calls on every
event). mitmproxy's `DumpMaster` loads some thirty addons and costs about twice
the CPU per request.

mitmproxy internals this relies on (pinned in pyproject.toml; check them
before moving the pin):
- the protocol of each connection is decided by `sidecar.proxy.h2c.ProtocolDetect`,
  a subclass of mitmproxy's NextLayer addon (its module says what it relies on);
- reverse mode resolves a request's destination from `request.data.host/port`
  *after* the `requestheaders` hook, so the addon can send one request of a
  keep-alive connection to the gateway and the next to the app;
- `Proxyserver.servers.update([])` closes the listening sockets but leaves the
  open connections to finish (used for a graceful SIGTERM);
- `Proxyserver.connections` holds each open client's handler, whose
  `transports[client].handler` task serves that connection. Cancelling that
  inner task ends the connection the way a client disconnect does. (Cancelling
  the outer task instead, as `Master.shutdown` does, makes Python 3.12.1's
  asyncio log a spurious "Exception in callback ... CancelledError".)

Shutdown (SIGTERM or SIGINT): stop listening, let in-flight requests finish for
up to `drain_timeout` seconds, end the sessions, exit 0.

Started by the primary (`sidecar.primary`), this process is its engine: it adopts
the primary's listening sockets (`Handover`, named in HANDOVER_ENV) instead of
binding its own, writes `ready` on the status pipe once it listens and `busy N`
when its count of sessions and control connections changes, and on SIGUSR1, if
that count is still 0, writes `retiring` and shuts down as on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mitmproxy.addons import proxyserver
from mitmproxy.master import Master
from mitmproxy.proxy import mode_servers
from mitmproxy.proxy.mode_specs import ProxyMode

from sidecar.basics import HANDOVER_ENV, Capture
from sidecar.capture import IptablesCapture, NoCapture
from sidecar.outgoing.policy import OutgoingPolicy
from sidecar.outgoing.resolver import ResolvConf
from sidecar.outgoing.rules import IpAddress, parse_rules
from sidecar.proxy import connections
from sidecar.proxy.addon import OfframpAddon
from sidecar.proxy.gateway import Gateway
from sidecar.proxy.h2c import new_master
from sidecar.proxy.workers import (
    Handoff,
    WorkerConfig,
    WorkerPool,
    close_client_connections,
    reuse_port_listeners,
)
from sidecar.sessions.control import ControlServer
from sidecar.sessions.registry import Session, SessionRegistry
from sidecar.settings import SidecarSettings

__all__ = ["Handover", "Sidecar", "run"]

log = logging.getLogger("offramp.sidecar")


def outgoing_policy(settings: SidecarSettings) -> OutgoingPolicy:
    """The guards for sessions' outgoing traffic: the sidecar's own ports (on
    loopback and the pod's addresses) and the admin's allow-list."""
    ports = {p.listen for p in settings.app_ports if p.listen} | {settings.control_port}
    own: set[IpAddress] = set()
    with contextlib.suppress(OSError):
        for *_, sockaddr in socket.getaddrinfo(socket.gethostname(), None):
            own.add(ipaddress.ip_address(sockaddr[0]))
    allow = parse_rules(settings.outgoing_allow) if settings.outgoing_allow is not None else None
    return OutgoingPolicy(frozenset(ports - {0}), frozenset(own), allow)


@dataclass(frozen=True)
class Handover:
    """The primary's listening sockets this engine serves, and its status pipe."""

    listen: dict[int, socket.socket]
    """app port -> its proxy port's listening socket"""
    control: socket.socket
    status: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Handover | None:
        raw = environ.get(HANDOVER_ENV)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            listen = {int(app): socket.socket(fileno=int(fd)) for app, fd in data["listen"].items()}
            return cls(listen, socket.socket(fileno=int(data["control"])), int(data["status"]))
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise ValueError(f"${HANDOVER_ENV} does not name usable sockets: {e}") from None

    def listen_port(self, app: int) -> int:
        sock = self.listen.get(app)
        if sock is None:
            raise ValueError(f"the primary handed over no proxy socket for app port {app}")
        return int(sock.getsockname()[1])

    @property
    def control_port(self) -> int:
        return int(self.control.getsockname()[1])

    def tell(self, line: str) -> None:
        """A line to the primary; lost silently if the primary has gone."""
        with contextlib.suppress(OSError):
            os.write(self.status, line.encode() + b"\n")


def adopt_listeners(sockets: Mapping[int, socket.socket]) -> None:
    """Make reverse-mode listeners on these ports (listen port -> socket) serve the
    given sockets instead of binding new ones; others bind as before."""
    bind = mode_servers.ReverseInstance.listen

    async def listen(self: mode_servers.ReverseInstance, host: str, port: int) -> list[Any]:
        sock = sockets.get(port)
        if sock is None:
            return await bind(self, host, port)
        return [await asyncio.start_server(self.handle_stream, sock=sock)]

    mode_servers.ReverseInstance.listen = listen  # type: ignore[method-assign,assignment]


class Sidecar:
    """All the parts of a running sidecar, started and stopped together."""

    def __init__(
        self,
        settings: SidecarSettings,
        environment: Mapping[str, str] | None = None,
        handover: Handover | None = None,
    ):
        self.settings = settings
        self.handover = handover
        self.registry = SessionRegistry(tuple(p.app for p in settings.app_ports))
        self.gateway = Gateway()
        self.control = ControlServer(
            self.registry,
            settings.token,
            settings.token_file,
            settings.control_host,
            settings.control_port,
            outgoing_policy(settings),
            ResolvConf.read(settings.resolv_conf),
            environment,
            settings.session_idle_timeout,
        )
        # With workers, requests they hand over carry this secret (sidecar.proxy.workers).
        self.handoff = Handoff(secrets.token_hex(16)) if settings.workers > 1 else None
        self.addon = OfframpAddon(
            self.registry, self.gateway, settings.probe_paths, self.handoff,
            settings.preview_prefix,
        )  # fmt: skip
        self.workers: WorkerPool | None = None
        self._proxyserver = proxyserver.Proxyserver()
        self.master: Master | None = None
        self._master_task: asyncio.Task[None] | None = None
        self.capture: IptablesCapture | NoCapture = NoCapture()

    async def start(self) -> None:
        s = self.settings
        await self.gateway.start()
        # ProtocolDetect stands in for mitmproxy's NextLayer (raw TCP, HTTP/1.1 or
        # h2c) and carries our addon's hooks: as many addons as bare mitmproxy.
        self.master = new_master(self._proxyserver, self.addon)
        if self.handoff is not None:
            reuse_port_listeners()
        if self.handover is not None:
            adopt_listeners({sock.getsockname()[1]: sock for sock in self.handover.listen.values()})
        # When the app connection opens, and how long a request head may take.
        connections.install(s.header_timeout)
        self.master.options.update(
            mode=self._modes(),
            keep_host_header=True,
            connection_strategy=connections.connection_strategy(s.app_connect),
        )
        self._master_task = asyncio.create_task(self.master.run())
        await self._wait_listening()
        if s.capture is Capture.IPTABLES:
            capture = IptablesCapture(self.listen_ports(), s.iptables, s.close_existing)
            stale = await asyncio.to_thread(capture.clean_stale)
            if stale:
                log.warning("removed iptables chains left by an earlier run: %s", ", ".join(stale))
            self.capture = capture
        self.registry.add_listener(self._on_port_change)
        if self.handoff is not None:
            await self._start_workers()
        await self.control.start(self.handover.control if self.handover is not None else None)

    def _modes(self, shared: bool = True) -> list[str]:
        """The listeners: each app port's proxy port (`shared` with the workers), and
        with workers, a handoff listener on 127.0.0.1 per app port."""
        s = self.settings
        modes = []
        if shared:
            modes += [
                f"reverse:http://{s.app_host}:{p.app}@{s.listen_host}:{p.listen}"
                for p in s.app_ports
            ]
        if self.handoff is not None:
            # The trailing "/" (which mitmproxy allows) tells them apart from a
            # proxy port that also listens on 127.0.0.1 at a free port.
            modes += [f"reverse:http://{s.app_host}:{p.app}/@127.0.0.1:0" for p in s.app_ports]
        return modes

    async def _start_workers(self) -> None:
        s = self.settings
        assert self.handoff is not None
        shared = self.listen_ports()
        handoff = self.listen_ports(handoff=True)
        config = WorkerConfig(
            index=0,
            app_host=s.app_host,
            listen_host=s.listen_host,
            ports=tuple((app, shared[app], handoff[app]) for app in shared),
            secret=self.handoff.secret,
            probe_paths=s.probe_paths,
            drain_timeout=s.drain_timeout,
            header_timeout=s.header_timeout,
            app_connect=s.app_connect,
            preview_prefix=s.preview_prefix,
            log_level=logging.getLevelName(logging.getLogger().level).lower(),
        )
        workers = WorkerPool(s.workers, config, self._worker_timeouts)
        await workers.start()
        self.workers = workers
        self.registry.watch(lambda sessions: workers.update([(x.id, x.spec) for x in sessions]))

        async def announce(sessions: list[Session]) -> None:
            workers.update([(x.id, x.spec) for x in sessions])
            await workers.synced()

        self.control.announce = announce

    def _worker_timeouts(self, worker: int, counts: dict[str, int]) -> None:
        for session in self.registry.sessions:
            if session.id in counts:
                session.timeouts.elsewhere[worker] = counts[session.id]

    def _on_port_change(self, port: int, sessions: int) -> None:
        if sessions:
            self.capture.start(port)
        else:
            self.capture.stop(port)

    async def _wait_listening(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            servers = list(self._proxyserver.servers)
            if servers and all(srv.listen_addrs for srv in servers):
                return
            if self._master_task is not None and self._master_task.done():
                break
            await asyncio.sleep(0.02)
        wanted = ", ".join(str(p.listen) for p in self.settings.app_ports)
        raise OSError(
            f"the proxy could not listen on {self.settings.listen_host} port(s) {wanted} "
            "(is a port in use?)"
        )

    def listen_ports(self, handoff: bool = False) -> dict[int, int]:
        """app port -> the port its listener (or its handoff listener) actually got."""
        found = {}
        for srv in self._proxyserver.servers:
            data = str(srv.mode.data)
            if data.endswith("/") != handoff:
                continue
            target = int(data.rstrip("/").rsplit(":", 1)[1])
            for addr in srv.listen_addrs:
                found[target] = int(addr[1])
        return found

    async def stop(self) -> None:
        """Stop capturing and listening, drain in-flight requests, end sessions."""
        self.control.stop_accepting()
        self.capture.stop_all()
        if self.workers is not None:
            # The workers drain first: their stolen requests need the handoff listeners.
            await self._proxyserver.servers.update(
                [ProxyMode.parse(m) for m in self._modes(shared=False)]
            )
            await self.workers.stop(self.settings.drain_timeout)
        await self._proxyserver.servers.update([])
        if still_open := await self.addon.in_flight.drain(self.settings.drain_timeout):
            log.warning("%d requests still open after the drain timeout", still_open)
        await self.control.end_sessions("the sidecar is shutting down")
        await self.gateway.stop()
        await close_client_connections(self._proxyserver)
        if self.master is not None:
            self.master.shutdown()
        if self._master_task is not None:
            await self._master_task
        # Last: until now, connections redirected earlier may still have been open.
        self.capture.release_conntrack()


async def run(
    settings: SidecarSettings,
    environment: Mapping[str, str] | None = None,
    handover: Handover | None = None,
) -> int:
    """Run the sidecar until SIGTERM (or, as the primary's engine, until SIGUSR1
    finds it idle); `environment` is the app container's, for sessions."""
    sidecar = Sidecar(settings, environment, handover)
    await sidecar.start()
    ports = ", ".join(f"{lp} -> app {app}" for app, lp in sidecar.listen_ports().items())
    log.info(
        "offramp %s: proxy on %s (%s); capture: %s; sessions on %s:%d",
        "engine" if handover is not None else "sidecar",
        settings.listen_host,
        ports,
        settings.capture.value,
        settings.control_host,
        sidecar.control.port,
    )
    if settings.token is None:
        log.warning(
            "no token file at %s yet: sessions are refused until it exists", settings.token_file
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if handover is not None:
        control = sidecar.control

        def busy() -> None:
            handover.tell(f"busy {control.connections + len(sidecar.registry.sessions)}")

        def retire_if_idle() -> None:
            if control.idle and not stop.is_set():
                handover.tell("retiring")
                log.info("no session for a while: the engine goes")
                stop.set()

        control.on_busy = busy
        sidecar.registry.watch(lambda _: busy())
        loop.add_signal_handler(signal.SIGUSR1, retire_if_idle)
        handover.tell("ready")
        busy()
    await stop.wait()
    log.info(
        "shutting down: no new connections; finishing %d requests",
        sidecar.addon.in_flight.count(),
    )
    await sidecar.stop()
    log.info("stopped")
    return 0
