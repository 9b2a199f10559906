"""The session server on the control port.

`GET /healthz` answers 200 while the sidecar serves; other methods get 405
there, at /v1/status, /v1/env and at /v1/tunnel. `GET /v1/status` gives the
version and the open sessions to a caller with the token (Authorization:
Bearer); `GET /v1/env` gives such a caller the app container's environment
(`sidecar.appenv`; never logged). `/v1/tunnel` is a websocket:
the client's first message is HELLO; the token is compared in constant time, the
spec validated and its filters compiled; the answer is WELCOME (and the session
is live until the websocket closes) or REFUSED with a message a person can act on.

Before a caller has shown the token it costs little: its first message may be at
most MAX_HELLO bytes (later ones MAX_MESSAGE), at most MAX_HANDSHAKES callers
(MAX_HANDSHAKES_PER_ADDRESS from one address) may be between connecting and
their HELLO at once, each for HANDSHAKE_TIMEOUT seconds, and an address whose
handshakes keep failing is slowed down (`guard.HandshakeGuard`).

After the token, a spec's patterns are compiled first in a child process with
bounded memory and time (`compile_check`), then here off the event loop. While a
session is open, matches of its filter that ran out of budget (those requests
went to the app, see `filters`) are logged and reported to its client at most
every TIMEOUT_REPORT_EVERY seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from sidecar import __version__
from sidecar.capture import CaptureError
from sidecar.outgoing.dialer import OutgoingService
from sidecar.outgoing.policy import OutgoingPolicy
from sidecar.outgoing.resolver import ResolvConf
from sidecar.outgoing.rules import parse_rules
from sidecar.sessions.compile_check import check_cost
from sidecar.sessions.filters import (
    TIMEOUT_REPORT_EVERY,
    FilterError,
    TimeoutCounter,
    compile_filter,
    patterns_of,
)
from sidecar.sessions.guard import HandshakeGuard
from sidecar.sessions.overlap import ENDED_BY, TAKEN_OVER, Overlap, Verdict, overlap
from sidecar.sessions.registry import Session, SessionRegistry
from sidecar.sessions.spec import SessionSpec
from sidecar.settings import IDLE_TIMEOUT, TokenError, describe_validation_error, read_token
from sidecar.tunnel.driver import Tunnel
from sidecar.tunnel.protocol import (
    MAX_HELLO,
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    TUNNEL_PATH,
    Connection,
    Hello,
    ProtocolError,
    Refused,
    Role,
    Stats,
    Welcome,
)

__all__ = ["HANDSHAKE_TIMEOUT", "ControlServer"]

log = logging.getLogger(__name__)

STATUS_PATH = "/v1/status"
ENV_PATH = "/v1/env"
SESSIONS_PATH = "/v1/sessions"
WORKER_SYNC_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 10.0

TAKEOVER_GRACE = 10.0
"""Seconds a session taken over with --force may finish the requests it holds."""
MAX_HANDSHAKES = 64
"""Callers between connecting and their HELLO at once; more are turned away."""
MAX_HANDSHAKES_PER_ADDRESS = 8
"""The same from one address, so that one caller cannot hold all of them."""
_QUEUE = 4
"""Messages websockets reads ahead per connection (its default is 16)."""


def _outgoing_status(session: Session) -> dict[str, object]:
    service = session.outgoing
    if service is None:
        return {}
    granted = [kind for kind in ("tcp", "udp", "dns") if getattr(service, kind)]
    return {"outgoing": {"granted": granted, "connections": service.connections}}


def _conflict(other: Session, why: Overlap) -> Refused:
    """The refusal that says who holds the requests, and what to do."""
    since = time.strftime("%H:%M:%S UTC", time.gmtime(other.opened_at))
    minutes = max(0, int(time.time() - other.opened_at) // 60)
    holder = (
        f"{other.spec.client or 'someone'} holds these requests in session {other.id} "
        f"(since {since}, {minutes} min; {other.stolen} taken so far)"
    )
    if why.verdict is Verdict.CERTAIN:
        advice = ("use another preview key or filter, ask them to end theirs, or pass --force "
                  "to take over (their session ends and they are told)")  # fmt: skip
        return Refused("conflict", f"{holder}: {why.why}. To go on, {advice}")
    return Refused(
        "conflict",
        f"{holder}, and your filter may overlap theirs: {why.why}. If they cannot match the "
        "same requests, or to take over, pass --force (their session ends and they are told)",
    )


def _json(ws: ServerConnection, body: object) -> Response:
    response = ws.respond(HTTPStatus.OK, json.dumps(body) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    response.headers["Cache-Control"] = "no-store"
    return response


class ControlServer:
    def __init__(
        self,
        registry: SessionRegistry,
        token: str | None,
        token_file: Path | None,
        host: str,
        port: int,
        policy: OutgoingPolicy | None = None,
        resolv: ResolvConf | None = None,
        environment: Mapping[str, str] | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
    ):
        self.idle_timeout = idle_timeout
        """Seconds a session's client may stay silent (no message, no answer to the
        websocket's pings) before its session is closed: a laptop that vanished."""
        self.registry = registry
        self.environment = dict(environment or {})
        """The app container's environment, for `GET /v1/env`."""
        self.policy = policy or OutgoingPolicy(frozenset())
        self.resolv = resolv or ResolvConf()
        self._token = token.encode() if token is not None else None
        self._token_file = token_file
        self.host = host
        self.port = port
        self._server: Server | None = None
        self.serving = True
        self.announce: Callable[[list[Session]], Awaitable[None]] | None = None
        """Given the open sessions and the one about to open, before it opens:
        proxy workers learn its filter before it is welcomed."""
        self._opening: list[Session] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.guard = HandshakeGuard()
        self._handshaking: dict[str, int] = {}
        self.connections = 0
        """Websockets open (sessions, and callers before or after their HELLO)."""
        self.on_busy: Callable[[], None] | None = None
        """Called when `connections` changes."""

    def _current_token(self) -> bytes | None:
        """The token; if the sidecar started without one, read it once the file exists."""
        if self._token is None and self._token_file is not None and self._token_file.exists():
            try:
                self._token = read_token(self._token_file).encode()
            except TokenError as e:
                log.warning("the token file is there but unusable: %s", e)
        return self._token

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on host:port, or on `sock` (a listening socket the primary bound)."""
        where: dict[str, Any] = {"sock": sock} if sock is not None else {
            "host": self.host, "port": self.port,
        }  # fmt: skip
        self._server = await serve(
            self._counted,
            process_request=self._process_request,
            # Raised to MAX_MESSAGE once the HELLO is accepted.
            max_size=MAX_HELLO,
            max_queue=_QUEUE,
            open_timeout=HANDSHAKE_TIMEOUT,
            compression=None,
            # A ping every half of the idle timeout, answered within the other half:
            # a client silent for idle_timeout seconds is gone.
            ping_interval=self.idle_timeout / 2,
            ping_timeout=self.idle_timeout / 2,
            # Nor is a closing handshake awaited longer from a client that is gone.
            close_timeout=min(10.0, self.idle_timeout / 2),
            **where,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _counted(self, ws: ServerConnection) -> None:
        self.connections += 1
        self._busy_changed()
        try:
            await self._handle(ws)
        finally:
            self.connections -= 1
            self._busy_changed()

    def _busy_changed(self) -> None:
        if self.on_busy is not None:
            self.on_busy()

    @property
    def idle(self) -> bool:
        """No session, and no websocket open or opening."""
        return self.connections == 0 and not self.registry.sessions

    def stop_accepting(self) -> None:
        self.serving = False
        if self._server is not None:
            self._server.close(close_connections=False)

    async def end_sessions(self, reason: str) -> None:
        await asyncio.gather(
            *(s.tunnel.close(reason) for s in self.registry.sessions), return_exceptions=True
        )
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path in ("/healthz", STATUS_PATH, ENV_PATH) and request.method != "GET":
            # (websockets itself answers a non-GET /v1/tunnel with 405.)
            response = ws.respond(
                HTTPStatus.METHOD_NOT_ALLOWED, f"offramp sidecar: {path} answers GET only\n"
            )
            response.headers["Allow"] = "GET"
            return response
        if path == "/healthz":
            if self.serving:
                return ws.respond(HTTPStatus.OK, "ok\n")
            return ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
        if path == STATUS_PATH:
            return self._status(ws, request)
        if path == ENV_PATH:
            return self._env(ws, request)
        if path.startswith(SESSIONS_PATH + "/") and path.endswith("/end"):
            return self._end_request(ws, request, path[len(SESSIONS_PATH) + 1 : -len("/end")])
        if path != TUNNEL_PATH:
            return ws.respond(
                HTTPStatus.NOT_FOUND, f"offramp sidecar: the tunnel is at {TUNNEL_PATH}\n"
            )
        return None

    def _refused(self, ws: ServerConnection, request: Request, what: str) -> Response | None:
        """None if the request carries the token, else the answer that refuses it."""
        address = str(ws.remote_address[0]) if ws.remote_address else "?"
        if wait := self.guard.wait(address):
            self.guard.failed(address, f"{what} asked too often with a wrong token", spend=False)
            return ws.respond(HTTPStatus.TOO_MANY_REQUESTS, "offramp sidecar: too many failed "
                              f"tries from {address}; try again in {wait:.0f} s\n")  # fmt: skip
        token = self._current_token()
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if token is None or not hmac.compare_digest(given.encode(), token):
            self.guard.failed(address, f"{what} asked with a wrong token")
            return ws.respond(HTTPStatus.UNAUTHORIZED, "offramp sidecar: give the session token "
                              "as 'Authorization: Bearer TOKEN'\n")  # fmt: skip
        return None

    def _env(self, ws: ServerConnection, request: Request) -> Response:
        """The app container's environment, for `offramp steal`; token required."""
        if refused := self._refused(ws, request, "env"):
            return refused
        address = str(ws.remote_address[0]) if ws.remote_address else "?"
        log.info("env: %d variables given to %s", len(self.environment), address)
        return _json(ws, {"env": self.environment})

    def _status(self, ws: ServerConnection, request: Request) -> Response:
        """The sidecar's version and open sessions, for `offramp status`; token required."""
        if refused := self._refused(ws, request, "status"):
            return refused
        sessions = [
            {
                "id": s.id,
                "client": s.spec.client,
                "mode": s.mode.value,
                "filter": s.spec.http_filter.model_dump(mode="json", exclude_none=True),
                "ports": list(self.registry.covered_ports(s.spec)),
                "stolen": s.stolen,
                "mirrored": s.mirrored,
                "match_timeouts": s.timeouts.total,
                "incoming": s.spec.incoming,
                "opened_at": s.opened_at,
                **_outgoing_status(s),
            }
            for s in self.registry.sessions
        ]
        body = {
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "app_ports": list(self.registry.app_ports),
            "sessions": sessions,
            # Names only: values go to /v1/env.
            "env": sorted(self.environment),
        }
        return _json(ws, body)

    async def _handle(self, ws: ServerConnection) -> None:
        conn = Connection(Role.SIDECAR)
        peer = ws.remote_address
        address = str(peer[0]) if peer else "?"
        mine = self._handshaking.get(address, 0)
        if mine >= MAX_HANDSHAKES_PER_ADDRESS or sum(self._handshaking.values()) >= MAX_HANDSHAKES:
            log.debug("tunnel from %s turned away: too many handshakes open", peer)
            await ws.close(1013, "too many handshakes at once; try again shortly")
            return
        self._handshaking[address] = mine + 1
        try:
            first = await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT)
            if isinstance(first, str):
                raise ProtocolError("the first message must be a binary HELLO frame")
            conn.receive_data(first)
            hello = conn.next_event()
            if not isinstance(hello, Hello):
                raise ProtocolError("the first message must be HELLO")
        except (TimeoutError, ProtocolError) as e:
            self.guard.failed(address, f"bad handshake: {e or 'no HELLO in time'}")
            await ws.close(1002, "bad handshake")
            return
        except ConnectionClosed as e:
            # Too large a first message ends here (1009), as does a caller gone away.
            if e.rcvd is None or e.rcvd.code != CloseCode.NORMAL_CLOSURE:
                self.guard.failed(address, f"closed during handshake: {e}")
            return
        except Exception as e:
            log.info("tunnel from %s: closed during handshake: %s", peer, e)
            return
        finally:
            if self._handshaking[address] == 1:
                del self._handshaking[address]
            else:
                self._handshaking[address] -= 1

        wait = self.guard.wait(address)
        if wait:
            refusal: Refused | None = Refused(
                "rate_limited",
                f"too many failed handshakes from {address}; try again in {wait:.0f} s",
            )
            session = None
        else:
            refusal, session = await self._admit(hello, conn, ws)
        if session is not None and self.announce is not None:
            await self._announce(session)
        if session is not None:
            try:
                self.registry.add(session)  # starts capture for its ports
            except CaptureError as e:
                refusal, session = Refused("capture", f"the sidecar cannot capture: {e}"), None
        if refusal is not None:
            if refusal.code in ("unauthorized", "rate_limited"):
                spend = refusal.code == "unauthorized"
                self.guard.failed(address, refusal.message, spend=spend)
            else:
                log.warning("tunnel from %s refused: %s", peer, refusal.message)
            conn.send(refusal)
            with contextlib.suppress(Exception):
                await ws.send(conn.data_to_send())
                await ws.close(1008, refusal.code)
            return
        assert session is not None
        ws.protocol.max_message_size = MAX_MESSAGE
        ports = self.registry.covered_ports(session.spec)
        outgoing = self._outgoing(session)
        granted = tuple(k for k in ("tcp", "udp", "dns") if outgoing and getattr(outgoing, k))
        welcome = Welcome(
            PROTOCOL_VERSION, session.id, __version__, ports, granted,
            self.resolv.search, self.resolv.ndots,
        )  # fmt: skip
        conn.send(welcome)
        try:
            await ws.send(conn.data_to_send())
        except Exception:
            self.registry.remove(session)
            raise
        log.info(
            "%s opened from %s: %s on ports %s",
            session.describe(),
            peer,
            session.spec.mode.value,
            ",".join(map(str, ports)) or "none",
        )
        if outgoing is not None:
            session.outgoing = outgoing
            session.tunnel.on_outgoing = outgoing.on_stream
            log.info("%s: outgoing %s through the pod", session.describe(), "+".join(granted))
        for other in session.taking_over:
            task = asyncio.create_task(self._take_over(other, session))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        def on_goodbye(reason: str) -> None:
            # New requests go to the app from now on; open ones finish. Answering
            # GOODBYE tells the client that no further request will come.
            self.registry.remove(session)
            session.tunnel.say_goodbye("no new requests will be sent")

        session.tunnel.on_goodbye = on_goodbye
        reporter = asyncio.create_task(self._report_timeouts(session))
        try:
            reason = await session.tunnel.run()
        finally:
            reporter.cancel()
            self.registry.remove(session)
            if outgoing is not None:
                await outgoing.aclose()
        if "keepalive ping timeout" in reason:
            log.warning(
                "%s closed: its client (%s) answered nothing for %g s (the idle timeout); "
                "its laptop has gone or lost its connection",
                session.describe(), address, self.idle_timeout,
            )  # fmt: skip
        log.info(
            "%s closed (%s): %d stolen, %d mirrored, %d mirror copies dropped, %d filter timeouts",
            session.describe(),
            reason,
            session.stolen,
            session.mirrored,
            session.mirror_dropped,
            session.timeouts.total,
        )

    def _end_request(self, ws: ServerConnection, request: Request, sid: str) -> Response:
        """`POST /v1/sessions/ID/end`: someone with the token ends a session (theirs or
        another's, `offramp sessions --end`); `X-Offramp-By` says who, for its owner."""
        if request.method != "POST":
            response = ws.respond(HTTPStatus.METHOD_NOT_ALLOWED,
                                  "offramp sidecar: a session is ended with POST\n")  # fmt: skip
            response.headers["Allow"] = "POST"
            return response
        if refused := self._refused(ws, request, "end"):
            return refused
        session = next((s for s in self.registry.sessions if s.id == sid), None)
        if session is None:
            open_ = ", ".join(s.id for s in self.registry.sessions) or "none"
            return ws.respond(HTTPStatus.NOT_FOUND, f"offramp sidecar: no open session {sid!r} "
                              f"here; open: {open_}\n")  # fmt: skip
        by = request.headers.get("X-Offramp-By", "").strip()[:200] or "someone"
        task = asyncio.create_task(self._end(session, f"{ENDED_BY} {by}"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return _json(ws, {"ended": sid, "client": session.spec.client})

    async def _take_over(self, other: Session, by: Session) -> None:
        """End `other` for `by` (opened with force)."""
        await self._end(other, f"{TAKEN_OVER} {by.spec.client or 'someone'} "
                        f"(--force, session {by.id})")  # fmt: skip

    async def _end(self, other: Session, reason: str) -> None:
        """End `other`: no new request goes to it, and it is told why; its client
        finishes what it holds and closes, or is closed after TAKEOVER_GRACE s."""
        log.warning("%s: %s", other.describe(), reason)
        self.registry.remove(other)
        other.tunnel.say_goodbye(reason)
        await asyncio.sleep(TAKEOVER_GRACE)
        if not other.tunnel.closed:
            await other.tunnel.close(reason)

    def _outgoing(self, session: Session) -> OutgoingService | None:
        asked = session.spec.outgoing
        if asked is None or not (asked.tcp or asked.udp or asked.dns):
            return None
        return OutgoingService(
            session.describe(), self.policy, self.resolv, parse_rules(asked.named),
            asked.tcp, asked.dns, asked.udp,
        )  # fmt: skip

    async def _report_timeouts(self, session: Session) -> None:
        reported = 0
        while not session.tunnel.closed:
            await asyncio.sleep(TIMEOUT_REPORT_EVERY)
            count = session.timeouts.total
            if count > reported:
                log.warning(
                    "%s: %d match(es) of its filter ran out of time so far; those requests "
                    "went to the app (a pattern that backtracks? see README, Filters)",
                    session.describe(),
                    count,
                )
                session.tunnel.send(Stats(session.mirror_dropped, count))
                reported = count

    async def _announce(self, session: Session) -> None:
        self._opening.append(session)
        try:
            sessions = [*self.registry.sessions, *self._opening]
            assert self.announce is not None
            await asyncio.wait_for(self.announce(sessions), WORKER_SYNC_TIMEOUT)
        except TimeoutError:
            log.warning(
                "%s: not every proxy worker confirmed it within %.0f s; until they do, "
                "requests they serve go to the app",
                session.describe(),
                WORKER_SYNC_TIMEOUT,
            )
        finally:
            self._opening.remove(session)

    async def _admit(
        self, hello: Hello, conn: Connection, ws: ServerConnection
    ) -> tuple[Refused | None, Session | None]:
        if hello.version != PROTOCOL_VERSION:
            return Refused(
                "version",
                f"this sidecar (offramp {__version__}) speaks tunnel protocol "
                f"{PROTOCOL_VERSION}, the client speaks {hello.version}: use the same "
                "offramp version on both sides (upgrade the CLI or the sidecar image)",
            ), None
        if not self.serving:
            return Refused("shutting_down", "the sidecar is shutting down; retry shortly"), None
        token = self._current_token()
        if token is None:
            return Refused(
                "no_token",
                f"this sidecar has no session token yet: nothing at {self._token_file}. Create "
                "the Secret mounted there (key 'token'); the sidecar reads it once it appears",
            ), None
        if not hmac.compare_digest(hello.token.encode(), token):
            return Refused(
                "unauthorized",
                "the token does not match this sidecar's token; pass the token the sidecar "
                "was started with (--token-file)",
            ), None
        try:
            spec = SessionSpec.model_validate(hello.session)
        except ValidationError as e:
            return Refused("bad_spec", describe_validation_error(e)), None
        timeouts = TimeoutCounter()
        try:
            await check_cost(patterns_of(spec.http_filter))
            predicate = await asyncio.to_thread(compile_filter, spec.http_filter, timeouts)
        except FilterError as e:
            return Refused("bad_filter", str(e)), None
        ports = self.registry.covered_ports(spec)
        if not ports and spec.incoming:
            return Refused(
                "no_port",
                f"http_filter.ports {list(spec.http_filter.ports or ())} names none of the "
                f"ports this sidecar fronts ({', '.join(map(str, self.registry.app_ports))})",
            ), None
        session = Session(spec, predicate, Tunnel(conn, ws), timeouts)
        conflicts = self._conflicts(spec, ports)
        if conflicts and not spec.force:
            return _conflict(*conflicts[0]), None
        session.taking_over = [other for other, _ in conflicts]
        return None, session

    def _conflicts(
        self, spec: SessionSpec, ports: tuple[int, ...]
    ) -> list[tuple[Session, Overlap]]:
        """Other users' open sessions that could take requests this one would."""
        found = []
        for other in [*self.registry.sessions, *self._opening]:
            if other.spec.client == spec.client:
                continue  # the same developer (a reconnect, another replica's tunnel)
            o = overlap(other.spec, spec, self.registry.covered_ports(other.spec), ports)
            if o.verdict is not Verdict.NONE:
                found.append((other, o))
        return found
