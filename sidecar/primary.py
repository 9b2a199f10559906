"""The sidecar's primary process: small and always there, while the engine comes and goes.

Most injected sidecars serve no session most of the time. The primary imports
neither mitmproxy nor websockets nor pydantic (an import-linter contract holds
it to that), and for the life of the pod it:

- binds every socket the sidecar listens on: each app port's proxy port and the
  control port. They are never re-bound: a listening socket's accept queue
  lives as long as one process holds it, so a connection that arrives while the
  engine starts or goes waits in the queue instead of being refused;
- answers `GET /healthz` on its own port (kubelet's probes go there and never
  wake the engine); with `--engine always`, 503 until the engine is first ready;
- starts the engine (`offramp-sidecar engine`: mitmproxy, the gateway, the
  session server, capture; `sidecar.proxy.master`) as a child that adopts those
  sockets: on demand, when a connection waits on the control port; or, with
  `--engine always`, at once. The engine writes `ready` on a pipe once it
  listens, and `busy N` whenever its count of sessions and control connections
  changes;
- while no engine serves the proxy ports, passes their connections to the app
  byte for byte. With iptables capture nothing reaches them then (capture runs
  only while a session is open), unless an engine died while capturing; in
  privilege-free mode that is where the pod's traffic goes;
- when the engine says it is ready, stops accepting, and closes the connections
  it passes that are idle (the app answered last, and not in the last
  IDLE_AFTER_MS), so that keep-alive clients come back through the engine: the
  rule iptables capture applies to connections that go straight to the app;
- `--engine-linger` seconds after the engine last had neither sessions nor
  control connections, asks it to go (SIGUSR1). The engine goes only if it is
  still idle, says `retiring`, and drains as on SIGTERM; the primary takes the
  proxy ports back at once and watches the control port again once it has gone;
- when the engine dies, takes the proxy ports back, removes the capture chains
  it left, and answers 503 on the control port for a pause that doubles with
  each death (up to MAX_BACKOFF); then starts it again (`always`) or waits for
  the next session (`on-demand`);
- on SIGTERM, passes it on, waits for the engine's drain, closes its sockets
  and lets its own connections finish for up to the drain timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sidecar.basics import HANDOVER_ENV, Capture, Engine
from sidecar.capture import IDLE_AFTER_MS, IDLE_SWEEP_INTERVAL, IDLE_SWEEP_SECONDS, IptablesCapture

__all__ = ["PrimaryConfig", "engine_command", "run"]

log = logging.getLogger("offramp.sidecar")

MAX_BACKOFF = 30.0
"""Longest wait, in seconds, before an engine that keeps dying is started again."""
_READ = 64 * 1024
_APP_CONNECT_TIMEOUT = 10.0
_ACCEPT_BATCH = 64
_HEALTH_HEAD_TIMEOUT = 5.0
_KILL_AFTER = 15.0
"""Seconds past the drain timeout an engine may take to exit on SIGTERM."""


@dataclass(frozen=True)
class PrimaryConfig:
    app_ports: tuple[tuple[int, int], ...]
    """(app port, its proxy port; 0: any free port)"""
    app_host: str
    listen_host: str
    control_host: str
    control_port: int
    health_port: int
    capture: Capture
    iptables: str
    reuse_port: bool
    """Bind the proxy ports with SO_REUSEPORT, for the engine's --workers."""
    drain_timeout: float
    engine: Engine
    linger: float
    engine_command: tuple[str, ...]
    """The engine's command line; the handover goes in its environment."""
    engine_env: Mapping[str, str] = field(default_factory=dict)
    """Added to the engine's environment only (the app container's variables)."""


class State(enum.StrEnum):
    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    RETIRING = "retiring"
    FAILED = "failed"
    """It died; control connections get 503 until the next try."""
    STOPPING = "stopping"


class _Pipe:
    """One connection passed to the app byte for byte."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.last_client = 0.0
        self.last_app = 0.0

    def idle(self, now: float) -> bool:
        """The app answered last, long enough ago that the client has read it."""
        return self.last_app > self.last_client and now - self.last_app >= IDLE_AFTER_MS / 1000

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


class Primary:
    def __init__(self, config: PrimaryConfig):
        self.config = config
        self.state = State.IDLE
        self.engine: asyncio.subprocess.Process | None = None
        self.busy = 0
        self._listeners: dict[int, socket.socket] = {}
        """app port -> its proxy port's listening socket"""
        self._control: socket.socket | None = None
        self._health: asyncio.Server | None = None
        self._accepting: set[int] = set()
        """app ports whose proxy port the primary accepts on"""
        self._pipes: set[_Pipe] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._watching = False
        self._linger: asyncio.TimerHandle | None = None
        self._backoff = 0.0
        self._stop = asyncio.Event()
        self._ever_ready = False

    # -- start and stop ------------------------------------------------------------

    def bind(self) -> None:
        c = self.config
        for app, listen in c.app_ports:
            self._listeners[app] = _listening(c.listen_host, listen, c.reuse_port)
        self._control = _listening(c.control_host, c.control_port, False)

    def listen_ports(self) -> dict[int, int]:
        return {app: sock.getsockname()[1] for app, sock in self._listeners.items()}

    @property
    def control_port(self) -> int:
        assert self._control is not None
        return int(self._control.getsockname()[1])

    async def run(self) -> int:
        c = self.config
        if c.capture is Capture.IPTABLES:
            # Also the check that capture can work here, as the engine makes it.
            stale = await asyncio.to_thread(self._capture().clean_stale)
            if stale:
                log.warning("removed iptables chains left by an earlier run: %s", ", ".join(stale))
        self.bind()
        self._health = await asyncio.start_server(self._serve_health, c.control_host, c.health_port)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        ports = ", ".join(f"{lp} -> app {app}" for app, lp in self.listen_ports().items())
        log.info(
            "offramp sidecar: proxy on %s (%s); capture: %s; sessions on %s:%d; health on %d; "
            "engine: %s",
            c.listen_host, ports, c.capture.value, c.control_host, self.control_port,
            c.health_port, c.engine.value,
        )  # fmt: skip
        if c.engine is Engine.ALWAYS:
            self._spawn(self._engine_life())
        else:
            self._take_proxy_ports()
            self._watch_control()
        await self._stop.wait()
        await self._shut_down()
        return 0

    async def _shut_down(self) -> None:
        self.state = State.STOPPING
        self._cancel_linger()
        self._unwatch_control()
        engine = self.engine
        if engine is not None and engine.returncode is None:
            log.info("shutting down: the engine drains first")
            with contextlib.suppress(ProcessLookupError):
                engine.send_signal(signal.SIGTERM)
        self._release_proxy_ports()
        # Closing our copies: once the engine has closed its own, callers are refused.
        for sock in [*self._listeners.values(), self._control]:
            if sock is not None:
                sock.close()
        if engine is not None:
            try:
                await asyncio.wait_for(engine.wait(), self.config.drain_timeout + _KILL_AFTER)
            except TimeoutError:
                log.error("the engine did not exit on SIGTERM; killing it")
                with contextlib.suppress(ProcessLookupError):
                    engine.kill()
                await engine.wait()
        if self._pipes:
            log.info("finishing %d connections passed to the app", len(self._pipes))
            await self._drain_pipes(self.config.drain_timeout)
        if self._health is not None:
            self._health.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        log.info("stopped")

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _capture(self) -> IptablesCapture:
        return IptablesCapture(self.listen_ports(), self.config.iptables)

    # -- the engine ----------------------------------------------------------------

    def _watch_control(self) -> None:
        if not self._watching and self._control is not None and self.state is not State.STOPPING:
            asyncio.get_running_loop().add_reader(self._control.fileno(), self._control_waiting)
            self._watching = True

    def _unwatch_control(self) -> None:
        if self._watching and self._control is not None:
            asyncio.get_running_loop().remove_reader(self._control.fileno())
            self._watching = False

    def _control_waiting(self) -> None:
        """A connection waits on the control port and no engine accepts it."""
        if self.state is State.FAILED:
            self._refuse_waiting()
            return
        self._unwatch_control()
        if self.state is State.IDLE:
            self._spawn(self._engine_life())

    def _refuse_waiting(self) -> None:
        assert self._control is not None
        while True:
            try:
                conn, _ = self._control.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("control port: %s", e)  # out of file descriptors, say
                self._unwatch_control()
                asyncio.get_running_loop().call_later(0.5, self._watch_control)
                return
            self._spawn(_answer_503(conn, self._backoff))

    async def _engine_life(self) -> None:
        """Start the engine and follow it until it exits; then go idle, or (when it
        died) pause and start it again as the mode says."""
        while True:
            started = time.monotonic()
            ready = await self._run_engine()
            code = self.engine.returncode if self.engine is not None else None
            retired = self.state is State.RETIRING and code == 0
            self.engine = None
            if self.state is State.STOPPING:
                return
            # From here until the next engine is ready, the primary passes traffic on.
            self._take_proxy_ports()
            if retired:
                self.state = State.IDLE
                self._backoff = 0.0
                self._watch_control()
                return
            # It died: traffic must not stay redirected to a port nobody proxies.
            if self.config.capture is Capture.IPTABLES:
                try:
                    if stale := await asyncio.to_thread(self._capture().clean_stale):
                        log.warning("removed the capture the engine left: %s", ", ".join(stale))
                except Exception as e:
                    log.error("could not remove the capture the engine left: %s", e)
            if ready and time.monotonic() - started > 2 * MAX_BACKOFF:
                self._backoff = 0.0
            self._backoff = min(MAX_BACKOFF, self._backoff * 2 or 1.0)
            self.state = State.FAILED
            self._watch_control()
            await asyncio.sleep(self._backoff)
            if self.state is State.STOPPING:
                return
            self.state = State.IDLE
            self._unwatch_control()
            if self.config.engine is Engine.ON_DEMAND:
                self._watch_control()
                return

    async def _run_engine(self) -> bool:
        """One engine, from start to exit; True if it became ready."""
        c = self.config
        assert self._control is not None
        self.state = State.STARTING
        started = time.monotonic()
        read_end, write_end = os.pipe()
        listen = {str(app): sock.fileno() for app, sock in self._listeners.items()}
        handover = {"listen": listen, "control": self._control.fileno(), "status": write_end}
        env = {**os.environ, **c.engine_env, HANDOVER_ENV: json.dumps(handover)}
        fds = [*listen.values(), self._control.fileno(), write_end]
        try:
            engine = await asyncio.create_subprocess_exec(
                *c.engine_command, pass_fds=fds, env=env, stdin=asyncio.subprocess.DEVNULL
            )
        except OSError as e:
            log.error("cannot start the proxy engine: %s", e)
            os.close(read_end)
            self.engine = None
            return False
        finally:
            os.close(write_end)
        self.engine = engine
        log.info("proxy engine starting (pid %d)", engine.pid)
        ready = False
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            reader = asyncio.StreamReader()
            loop = asyncio.get_running_loop()
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), pipe
            )
            try:
                while line := await reader.readline():
                    word, _, rest = line.decode(errors="replace").strip().partition(" ")
                    if word == "ready" and not ready:
                        ready = self._ever_ready = True
                        if self.state is State.STARTING:
                            self.state = State.RUNNING
                        self._release_proxy_ports()
                        log.info(
                            "proxy engine ready in %.2f s (pid %d)",
                            time.monotonic() - started, engine.pid,
                        )  # fmt: skip
                    elif word == "busy" and rest.isdigit():
                        self._heard_busy(int(rest))
                    elif word == "retiring" and self.state is not State.STOPPING:
                        self.state = State.RETIRING
                        self._take_proxy_ports()
            finally:
                transport.close()
        code = await engine.wait()
        self._cancel_linger()
        if self.state is State.RETIRING and code == 0:
            log.info("proxy engine gone after %.0f s without a session", c.linger)
        elif self.state is not State.STOPPING:
            log.error(
                "the proxy engine exited with %s%s; its sessions have ended and traffic "
                "goes to the app until it starts again",
                _exit(code), "" if ready else " before it was ready",
            )  # fmt: skip
        return ready

    def _heard_busy(self, count: int) -> None:
        self.busy = count
        self._cancel_linger()
        if count == 0 and self.config.engine is Engine.ON_DEMAND and self.state is State.RUNNING:
            loop = asyncio.get_running_loop()
            self._linger = loop.call_later(self.config.linger, self._ask_to_retire)

    def _cancel_linger(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def _ask_to_retire(self) -> None:
        self._linger = None
        if self.engine is not None and self.engine.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.engine.send_signal(signal.SIGUSR1)

    # -- passing connections to the app ----------------------------------------------

    def _take_proxy_ports(self) -> None:
        loop = asyncio.get_running_loop()
        for app, sock in self._listeners.items():
            if app not in self._accepting and self.state is not State.STOPPING:
                loop.add_reader(sock.fileno(), self._accept, sock, app)
                self._accepting.add(app)

    def _release_proxy_ports(self) -> None:
        """Stop accepting (what waits in the queue is the engine's now), and close
        the idle connections passed on so far."""
        loop = asyncio.get_running_loop()
        for app in self._accepting:
            loop.remove_reader(self._listeners[app].fileno())
        self._accepting.clear()
        if self._pipes:
            self._spawn(self._close_idle_pipes(IDLE_SWEEP_SECONDS))

    def _accept(self, sock: socket.socket, app: int) -> None:
        """The proxy port is readable: accept what waits (the engine, when it runs
        too, may have taken it first)."""
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # Out of file descriptors, say: pause rather than spin on it.
                log.warning("proxy port for app %d: %s", app, e)
                self._release_proxy_ports()
                asyncio.get_running_loop().call_later(0.5, self._take_proxy_ports)
                return
            conn.setblocking(False)
            self._spawn(self._pass(conn, app))

    async def _pass(self, conn: socket.socket, app: int) -> None:
        pipe = _Pipe()
        self._pipes.add(pipe)
        try:
            client_r, client_w = await asyncio.open_connection(sock=conn)
            pipe.writers.append(client_w)
            try:
                app_r, app_w = await asyncio.wait_for(
                    asyncio.open_connection(self.config.app_host, app), _APP_CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError) as e:
                log.debug("app port %d: %s", app, e)
                client_w.transport.abort()  # the caller sees a reset, as from the app itself
                return
            pipe.writers.append(app_w)
            await asyncio.gather(
                _copy(client_r, app_w, pipe, "last_client"),
                _copy(app_r, client_w, pipe, "last_app"),
            )
        except (ConnectionError, OSError) as e:
            log.debug("connection to app %d ended: %s", app, e)
            for writer in pipe.writers:
                writer.transport.abort()
        finally:
            self._pipes.discard(pipe)
            pipe.close()

    async def _close_idle_pipes(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._pipes and time.monotonic() < deadline:
            now = time.monotonic()
            for pipe in [p for p in self._pipes if p.idle(now)]:
                pipe.close()
                self._pipes.discard(pipe)
            await asyncio.sleep(IDLE_SWEEP_INTERVAL)

    async def _drain_pipes(self, seconds: float) -> None:
        await self._close_idle_pipes(seconds)
        for pipe in list(self._pipes):
            for writer in pipe.writers:
                writer.transport.abort()

    # -- health ----------------------------------------------------------------------

    async def _serve_health(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEALTH_HEAD_TIMEOUT)
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            if path != b"/healthz":
                status, text = "404 Not Found", "offramp sidecar: health is at /healthz\n"
            elif method != b"GET":
                status, text = "405 Method Not Allowed", "offramp sidecar: /healthz answers GET\n"
            elif self.state is State.STOPPING:
                status, text = "503 Service Unavailable", "shutting down\n"
            elif self.config.engine is Engine.ALWAYS and not self._ever_ready:
                # Nothing serves the proxy ports yet (later, the primary does
                # whenever the engine does not).
                status, text = "503 Service Unavailable", f"engine: {self._describe()}\n"
            else:
                status, text = "200 OK", f"ok\nengine: {self._describe()}\n"
            body = text.encode()
            allow = "allow: GET\r\n" if status.startswith("405") else ""
            writer.write(
                f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n{allow}\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()

    def _describe(self) -> str:
        if self.engine is not None and self.state in (State.RUNNING, State.STARTING):
            return f"{self.state.value}, pid {self.engine.pid}, busy {self.busy}"
        return self.state.value


async def _copy(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pipe: _Pipe, stamp: str
) -> None:
    while data := await reader.read(_READ):
        setattr(pipe, stamp, time.monotonic())
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()


async def _answer_503(conn: socket.socket, retry: float) -> None:
    body = (
        b"offramp sidecar: the proxy engine exited; the sidecar's log says why "
        b"(kubectl logs POD -c offramp-sidecar). It starts again in a moment: retry.\n"
    )
    try:
        _, writer = await asyncio.open_connection(sock=conn)
        writer.write(
            f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nretry-after: {max(1, round(retry))}\r\n"
            "connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()
    except OSError:
        conn.close()


def _listening(host: str, port: int, reuse_port: bool) -> socket.socket:
    try:
        sock = socket.create_server(
            (host, port),
            family=socket.AF_INET6 if ":" in host else socket.AF_INET,
            backlog=1024,
            reuse_port=reuse_port,
        )
    except OSError as e:
        raise OSError(f"cannot listen on {host} port {port}: {e.strerror or e}") from e
    sock.setblocking(False)
    return sock


def _exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def engine_command(argv: Sequence[str]) -> tuple[str, ...]:
    """The command that runs the engine with the primary's own flags."""
    return (sys.executable, "-m", "sidecar", "engine", *argv)


async def run(config: PrimaryConfig) -> int:
    return await Primary(config).run()
