"""Outgoing traffic for one offramp command, put together: a session that only
carries outgoing streams (it takes no requests), the relay and DNS handler on
top of it, and either the namespace's sockets or a SOCKS/HTTP proxy to feed them.

The outgoing session opens before the local process starts, so the process's
first connections and lookups (a database at start-up) already go through the
pod; the stealing sessions open once it listens.

`LocalProcess` is the local process as `offramp steal -- CMD` runs it: in the
namespace (its helper's exit status is the process's), or as a plain child.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path as FilePath

from local_proxy.forward.dial import open_connection
from local_proxy.outgoing.connects import ConnectDecider
from local_proxy.outgoing.dns import DnsHandler
from local_proxy.outgoing.filter import NameBook, OutgoingFilter
from local_proxy.outgoing.netns import NAMESERVER, Namespace, original_destination
from local_proxy.outgoing.proxy import ProxyServer, proxy_environment
from local_proxy.outgoing.relay import OutgoingRelay
from local_proxy.outgoing.udp import UdpRelay
from local_proxy.session import LocalSession, SessionError
from sidecar.outgoing.resolver import ResolvConf
from sidecar.tunnel.driver import Tunnel
from sidecar.tunnel.protocol import MAX_DATA

__all__ = ["OPEN_WAIT", "LocalProcess", "Outgoing"]

log = logging.getLogger(__name__)

OPEN_WAIT = 30.0
"""How long the first outgoing session may take to open before the command fails."""
TUNNEL_WAIT = 10.0
"""How long a connection or query waits for a tunnel while the session reconnects."""
ACCEPT_BATCH = 64
"""Connections taken from a listener in one turn of the event loop, at most."""
ACCEPT_PAUSE = 0.5
"""Seconds a listener rests after accept() failed (out of descriptors, say)."""


class Outgoing:
    def __init__(
        self,
        outgoing: OutgoingFilter,
        session: LocalSession,
        namespace: Namespace | None,
        report: Callable[[str], None],
    ):
        self.filter = outgoing
        self.session = session
        self.namespace = namespace
        self.report = report
        self.names = NameBook()
        self.relay = OutgoingRelay(outgoing, self.names, self._tunnel, session.open_tunnel)
        self.dns = DnsHandler(
            outgoing, self.names, self._tunnel, ResolvConf.read(FilePath("/etc/resolv.conf"))
        )
        self.udp: UdpRelay | None = None
        if namespace is not None and namespace.ctnetlink is not None and outgoing.udp:
            self.udp = UdpRelay(outgoing, self.names, self._tunnel, namespace.ctnetlink)
        self.proxy: ProxyServer | None = None
        self._decider: ConnectDecider | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._dns_transports: list[asyncio.DatagramTransport] = []
        self._tcp_dns: set[asyncio.Task[None]] = set()
        self._resting: set[asyncio.TimerHandle] = set()

    async def _tunnel(self) -> Tunnel | None:
        return await self.session.current_tunnel(TUNNEL_WAIT)

    async def start(self, proxy_port: int | None = None) -> None:
        """Open the session; then serve the namespace, or (without one, or with
        `proxy_port`) a SOCKS/HTTP proxy. Raises SessionError."""
        runner = asyncio.create_task(self.session.run())
        self._tasks.append(runner)
        ready = asyncio.create_task(self.session.ready.wait())
        await asyncio.wait({runner, ready}, timeout=OPEN_WAIT, return_when="FIRST_COMPLETED")
        ready.cancel()
        if runner.done():
            runner.result()  # raises the session's error
            raise SessionError("the outgoing session ended before it opened")
        if not self.session.ready.is_set():
            raise SessionError(f"the outgoing session did not open within {OPEN_WAIT:g} s")
        if self.namespace is not None:
            loop = asyncio.get_running_loop()
            for listener in self.namespace.listeners:
                listener.setblocking(False)
                loop.add_reader(listener.fileno(), self._accept, listener)
            for sock in self.namespace.dns:
                await self._serve_dns(sock)
            if self.udp is not None:
                for sock in self.namespace.udp:
                    await self.udp.serve(sock)
            elif self.filter.udp and self.namespace.no_udp:
                why = self.namespace.no_udp
                self.report(f"offramp: note: UDP other than DNS is not carried ({why})")
        if self.namespace is None or proxy_port is not None:
            self.proxy = ProxyServer(self.relay, port=proxy_port or 0)
            await self.proxy.start()

    def resolv_conf(self) -> str | None:
        """The process's resolv.conf: the pod's search list and ndots, our nameserver.
        None with DNS off (the laptop's own file stays)."""
        welcome = self.session.welcome
        if not self.filter.dns or welcome is None:
            return None
        lines = [f"nameserver {NAMESERVER}"]
        if welcome.dns_search:
            lines.append("search " + " ".join(welcome.dns_search))
        lines.append(f"options ndots:{welcome.dns_ndots}")
        return "\n".join(lines) + "\n"

    def supervise(self, namespace: Namespace) -> None:
        """Once the process runs: hold its connect() calls until their way is open."""
        if not namespace.supervised:
            self.report(
                f"offramp: note: connections the pod cannot make are reset rather than "
                f"refused ({namespace.no_connects}: no seccomp user notification)"
            )
            return
        self._decider = ConnectDecider(namespace.decisions, self.relay.decide)
        self._decider.start()
        self.relay.forget = self._decider.forget

    def environment(self) -> dict[str, str]:
        """For a process without the namespace: the proxy variables."""
        assert self.proxy is not None
        return proxy_environment(self.proxy.host, self.proxy.port)

    def _accept(self, listener: socket.socket) -> None:
        """Take the connections waiting on `listener` (a bounded batch, so other work
        is not held up). Runs as the listener's reader callback, so a connection's
        CONNECT leaves in the same turn of the event loop as its accept."""
        try:
            self._accept_batch(listener)
        finally:
            if (tunnel := self.session.open_tunnel()) is not None:
                tunnel.flush()  # the CONNECTs go now, not at the writer's next turn

    def _accept_batch(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors, say: rest, or this would spin
                log.warning(
                    "an outgoing connection could not be accepted (again in %g s): %s",
                    ACCEPT_PAUSE, e,
                )  # fmt: skip
                self._rest(listener)
                return
            try:
                conn.setblocking(False)
                host, port = original_destination(conn)
                dns = (host, port) == (NAMESERVER, 53)  # the resolver retrying over TCP
                # What the process sent already goes out with the CONNECT, in one message.
                first = b""
                if not dns:
                    with contextlib.suppress(BlockingIOError):
                        first = conn.recv(MAX_DATA)
            except OSError as e:
                log.info("an outgoing connection could not be read: %s", e)
                conn.close()
                continue
            if dns:
                task = asyncio.create_task(self._dns_over_tcp(conn))
                self._tcp_dns.add(task)
                task.add_done_callback(self._tcp_dns.discard)
            else:
                self.relay.serve(conn, host, port, first)

    def _rest(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(listener.fileno())

        def wake() -> None:
            self._resting.discard(timer)
            if listener.fileno() >= 0:
                loop.add_reader(listener.fileno(), self._accept, listener)

        timer = loop.call_later(ACCEPT_PAUSE, wake)
        self._resting.add(timer)

    async def _dns_over_tcp(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except OSError as e:
            log.info("an outgoing connection could not be read: %s", e)
            conn.close()
            return
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                answer = await self.dns.answer(await reader.readexactly(size))
                if answer is None:
                    break
                writer.write(len(answer).to_bytes(2, "big") + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _serve_dns(self, sock: socket.socket) -> None:
        handler = self.dns
        tasks: set[asyncio.Task[None]] = set()

        class Server(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
                async def reply() -> None:
                    answer = await handler.answer(data)
                    if answer is not None:
                        self.transport.sendto(answer, addr)  # type: ignore[attr-defined]

                task = asyncio.create_task(reply())
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        sock.setblocking(False)
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(Server, sock=sock)
        self._dns_transports.append(transport)

    async def aclose(self) -> None:
        if self._decider is not None:
            self._decider.close()
        for timer in self._resting:
            timer.cancel()
        if self.namespace is not None:
            for listener in self.namespace.listeners:
                with contextlib.suppress(ValueError, OSError):
                    asyncio.get_running_loop().remove_reader(listener.fileno())
        self.session.stop()
        if self.proxy is not None:
            await self.proxy.aclose()
        for transport in self._dns_transports:
            transport.close()
        if self.udp is not None:
            await self.udp.aclose()
        await self.relay.aclose()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, SessionError):
                await task

    def summary(self) -> str:
        c, d = self.relay.counters, self.dns
        udp = ""
        if self.udp is not None and any(self.udp.flows.values()):
            u = self.udp.flows
            udp = (f"; UDP: {u['remote']} flow(s) through the pod, {u['local']} from here, "
                   f"{u['failed']} failed, {u['dropped']} datagram(s) dropped")  # fmt: skip
        return (
            f"outgoing: {c.remote} connection(s) through the pod, {c.local} from here, "
            f"{c.failed} failed; DNS: {d.remote} through the pod, {d.local} here, {d.failed} failed"
            + udp
        )


class LocalProcess:
    """The developer's process: a plain child, or the namespace helper's."""

    def __init__(self, child: asyncio.subprocess.Process | None, namespace: Namespace | None):
        self._child = child
        self._namespace = namespace
        self.returncode: int | None = None

    @classmethod
    async def start(
        cls, command: list[str], namespace: Namespace | None, resolv: str | None,
        env: dict[str, str] | None,
    ) -> LocalProcess:  # fmt: skip
        """`env`: CMD's whole environment (None: offramp's). Raises OSError (or
        NamespaceError) if it cannot start."""
        if namespace is not None:
            await asyncio.to_thread(namespace.run, command, resolv, env)
            return cls(None, namespace)
        child = await asyncio.create_subprocess_exec(*command, env=env)
        return cls(child, None)

    async def wait(self) -> int:
        if self._child is not None:
            self.returncode = await self._child.wait()
            return self.returncode
        assert self._namespace is not None
        pid = self._namespace.pid
        fd = os.pidfd_open(pid)
        try:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def exited() -> None:
                if not done.done():
                    done.set_result(None)

            asyncio.get_running_loop().add_reader(fd, exited)
            try:
                await done
            finally:
                asyncio.get_running_loop().remove_reader(fd)
        finally:
            os.close(fd)
        _, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 (it has exited: no wait)
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def terminate(self) -> None:
        if self._child is not None:
            with contextlib.suppress(ProcessLookupError):
                self._child.terminate()
        elif self._namespace is not None:
            self._namespace.signal(signal.SIGTERM)

    def kill(self) -> None:
        if self._child is not None:
            with contextlib.suppress(ProcessLookupError):
                self._child.kill()
        elif self._namespace is not None:
            self._namespace.signal(signal.SIGKILL)

    @property
    def connect(self) -> Callable[[str, int], Awaitable[tuple[asyncio.StreamReader,
                                                              asyncio.StreamWriter]]]:  # fmt: skip
        """Opens a connection to the process's own host and port (inside its namespace)."""
        factory = self._namespace.make_socket if self._namespace is not None else None
        return lambda host, port: open_connection(host, port, factory)
