"""One developer session against one sidecar: connect, hand over, reconnect.

Errors::

    SessionError       the session cannot start; the message says why
    ├── Refused         the sidecar said no (token, filter, version): retrying won't help
    └── Unreachable     the sidecar could not be reached at all on the first try

Once a session has been open, a lost tunnel is retried with exponential backoff
(0.2 s doubling to 10 s) until `stop()` is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI, WebSocketException

from local_proxy.config import LocalSettings
from local_proxy.forward.dial import SocketFactory
from local_proxy.forward.forwarder import Forwarder
from sidecar.sessions.overlap import ENDED_BY, TAKEN_OVER
from sidecar.tunnel.driver import Tunnel
from sidecar.tunnel.protocol import (
    MAX_HELLO,
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    TUNNEL_PATH,
    Connection,
    HandshakeRefused,
    Hello,
    ProtocolError,
    Role,
    Stats,
    Welcome,
)

__all__ = ["LocalSession", "Refused", "SessionError", "Unreachable", "tunnel_url"]

BACKOFF_START = 0.2
BACKOFF_MAX = 10.0
GOODBYE_WAIT = 3.0
"""How long to wait for the sidecar to confirm it sends no more."""
TIMEOUT_SAY_EVERY = 10.0
"""Seconds between warnings that filter matches timed out (the count is in each)."""
DRAIN_MARGIN = 2.0
"""Past --timeout, a held request has been answered (504) or reset: beyond it nothing waits."""


class SessionError(Exception):
    pass


class Refused(SessionError):
    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code
        """The sidecar's word for why ("conflict", "unauthorized"...), if it said."""


class Unreachable(SessionError):
    pass


def tunnel_url(sidecar_url: str) -> str:
    parts = urlsplit(sidecar_url)
    path = parts.path if parts.path not in ("", "/") else TUNNEL_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


class LocalSession:
    def __init__(
        self,
        settings: LocalSettings,
        report: Callable[[str], None] = print,
        dial: Callable[[], Awaitable[socket.socket]] | None = None,
        factory: SocketFactory | None = None,
    ):
        """`dial`, if given, opens the connection the websocket runs over (a
        Kubernetes port-forward); the URL then only names the sidecar. `factory`,
        if given, makes the sockets to the local process (it runs in a namespace)."""
        self.settings = settings
        self._dial = dial
        self.report = report
        self.forwarder = Forwarder(
            settings.to_host,
            settings.to_port,
            settings.timeout,
            settings.mirror_queue,
            report,
            factory,
        )
        self.welcome: Welcome | None = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._abandon = asyncio.Event()
        self._tunnel: Tunnel | None = None
        self._timeouts_said = -TIMEOUT_SAY_EVERY

    async def current_tunnel(self, wait: float = 10.0) -> Tunnel | None:
        """The open tunnel, waiting up to `wait` seconds for one; None if none opens."""
        if not self.ready.is_set():  # (every outgoing connection asks: no task when open)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ready.wait(), wait)
        return self.open_tunnel()

    def open_tunnel(self) -> Tunnel | None:
        """The tunnel if one is open now (no waiting), else None."""
        return self._tunnel if self._tunnel is not None and not self._tunnel.closed else None

    def stop(self) -> None:
        """End the session: the sidecar sends no more, and the requests held are
        finished (up to --timeout). Called again, abandon those requests."""
        if self._stop.is_set():
            self._abandon.set()
        self._stop.set()

    async def run(self) -> None:
        """Serve until `stop()`. Raises Refused, or Unreachable on a first failure."""
        backoff = BACKOFF_START
        first = True
        try:
            while not self._stop.is_set():
                try:
                    ws, conn, welcome = await self._connect()
                except Refused:
                    raise
                except SessionError as e:
                    if first:
                        raise Unreachable(str(e)) from e
                    self.report(f"offramp: {e}; retrying in {backoff:.1f} s")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                first = False
                backoff = BACKOFF_START
                self.welcome = welcome
                self._announce(welcome)
                reason = await self._serve(ws, conn)
                self.ready.clear()
                if (TAKEN_OVER in reason or ENDED_BY in reason) and not self._stop.is_set():
                    # Reconnecting would only take it back, or be refused: stop here.
                    raise Refused(reason, "taken_over" if TAKEN_OVER in reason else "ended")
                if not self._stop.is_set():
                    self.report(f"offramp: {reason}; reconnecting")
        finally:
            await self.forwarder.aclose()

    async def _connect(self) -> tuple[ClientConnection, Connection, Welcome]:
        url = tunnel_url(self.settings.sidecar_url)
        try:
            sock = await self._dial() if self._dial is not None else None
            ws = await connect(
                url, sock=sock, max_size=MAX_MESSAGE, compression=None, open_timeout=10
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as e:
            said = ""
            if isinstance(e, InvalidStatus) and e.response.body:
                # The sidecar says why in the body (e.g. its engine could not start).
                said = e.response.body.decode("utf-8", "replace").strip()[:300]
            raise SessionError(
                f"cannot reach the sidecar at {url}: {e}" + (f": {said}" if said else "")
            ) from e
        conn = Connection(Role.CLIENT)
        conn.send(
            Hello(PROTOCOL_VERSION, self.settings.token, self.settings.spec.model_dump(mode="json"))
        )
        hello = conn.data_to_send()
        if len(hello) > MAX_HELLO:
            await ws.close()
            raise Refused(
                f"the session spec is {len(hello)} bytes as sent, more than the sidecar "
                f"reads before it knows who is asking ({MAX_HELLO}): use fewer or shorter "
                "filters"
            )
        try:
            await ws.send(hello)
            answer = await asyncio.wait_for(ws.recv(), 10)
            if isinstance(answer, str):
                raise ProtocolError("the sidecar answered with text")
            conn.receive_data(answer)
        except HandshakeRefused as e:
            await ws.close()
            raise Refused(f"the sidecar refused the session: {e}", e.code) from e
        except (ProtocolError, TimeoutError, WebSocketException, OSError) as e:
            await ws.close()
            raise SessionError(f"the handshake with {url} failed: {e}") from e
        welcome = conn.next_event()
        if not isinstance(welcome, Welcome):
            await ws.close()
            raise SessionError(f"the sidecar sent {welcome!r} instead of WELCOME")
        if welcome.version != PROTOCOL_VERSION:
            await ws.close()
            raise Refused(
                f"the sidecar speaks tunnel protocol {welcome.version} (offramp "
                f"{welcome.sidecar_version}); this CLI speaks {PROTOCOL_VERSION}: use the same "
                "offramp version on both sides"
            )
        return ws, conn, welcome

    def _announce(self, welcome: Welcome) -> None:
        spec = self.settings.spec
        if not spec.incoming:
            granted = " and ".join(welcome.outgoing) or "nothing (the sidecar granted none)"
            self.report(f"offramp: session {welcome.session_id} open: outgoing {granted} "
                        "through the pod")  # fmt: skip
            return
        what = spec.http_filter.model_dump(exclude_none=True, exclude={"ports"}) or "every request"
        ports = ", ".join(map(str, welcome.app_ports))
        self.report(
            f"offramp: session {welcome.session_id} open ({spec.mode.value}, port {ports}, "
            f"filter: {what}) -> {self.settings.to_host}:{self.settings.to_port}"
        )

    async def _serve(self, ws: ClientConnection, conn: Connection) -> str:
        tunnel = Tunnel(conn, ws, on_request=self.forwarder.on_request, on_stats=self._on_stats)
        self._tunnel = tunnel
        self.ready.set()
        runner = asyncio.create_task(tunnel.run())
        stopper = asyncio.create_task(self._stop.wait())
        goodbye = asyncio.create_task(tunnel.goodbye_received.wait())
        try:
            await asyncio.wait({runner, stopper, goodbye}, return_when=asyncio.FIRST_COMPLETED)
            if runner.done():
                return runner.result()
            said = tunnel.goodbye_reason
            if not stopper.done() and (TAKEN_OVER in said or ENDED_BY in said):
                # Another developer took over (--force) or ended it: nothing new will
                # come; finish what is held, then close.
                reason = f"the session was {tunnel.goodbye_reason}"
                self.report(f"offramp: {reason}")
                await self._drain()
                await tunnel.close("taken over")
                await runner
                return reason
            # Stopping: ask the sidecar to send no more; once it confirms, nothing
            # else can arrive, so finish what we hold and close.
            tunnel.say_goodbye("the developer ended the session")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GOODBYE_WAIT):
                    await _either(tunnel.goodbye_received, self._abandon)
            await self._drain()
            await tunnel.close("the developer ended the session")
            await runner
            return "session ended"
        finally:
            stopper.cancel()
            goodbye.cancel()
            self._tunnel = None

    async def _drain(self) -> None:
        """Wait for the requests held, until they end, --timeout runs out, or a second
        stop(); say what is left and that its callers are cut off."""
        pending = {t for t in self.forwarder.tasks if not t.done()}
        if not pending:
            return
        limit = self.settings.timeout + DRAIN_MARGIN if self.settings.timeout else None
        if not self._abandon.is_set():
            self.report(
                f"offramp: finishing {len(pending)} held request(s) "
                + (f"(up to {self.settings.timeout:g} s, --timeout)" if limit else "(no limit)")
                + "; Ctrl-C again abandons them"
            )
            abandon = asyncio.create_task(self._abandon.wait())
            try:
                deadline = None if limit is None else asyncio.get_running_loop().time() + limit
                while pending and not self._abandon.is_set():
                    left = (
                        None if deadline is None else deadline - asyncio.get_running_loop().time()
                    )
                    if left is not None and left <= 0:
                        break
                    await asyncio.wait(
                        {*pending, abandon}, timeout=left, return_when="FIRST_COMPLETED"
                    )
                    pending = {t for t in pending if not t.done()}
            finally:
                abandon.cancel()
        if pending:
            self.forwarder.ending = True
            self.report(
                f"offramp: abandoning {len(pending)} held request(s): their callers get a 502 "
                "saying the session ended (your process may already have run them)"
            )

    def _on_stats(self, stats: Stats) -> None:
        c = self.forwarder.counters
        if stats.mirror_dropped > c.mirror_dropped_sidecar:
            c.mirror_dropped_sidecar = stats.mirror_dropped
            self.report(
                f"offramp: the sidecar has dropped {stats.mirror_dropped} mirror copies "
                "(the tunnel or the local process is not keeping up)"
            )
        if stats.match_timeouts > c.match_timeouts:
            c.match_timeouts = stats.match_timeouts
            now = time.monotonic()
            if now - self._timeouts_said >= TIMEOUT_SAY_EVERY:
                self._timeouts_said = now
                self.report(
                    f"offramp: warning: {stats.match_timeouts} request(s) so far went to the app "
                    "because matching your filter took too long (a pattern that backtracks, "
                    "or a flood of requests); see README, Filters"
                )


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    """Until `a` or `b` is set."""
    waits = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
