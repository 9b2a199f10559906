"""The mitmproxy addon: decide per request, when its head arrives, and stream.

- no session on the port: only X-Forwarded-For is added; the body streams to the app.
- stolen: the head goes into the session's tunnel now (handed over), and the
  request is pointed at the gateway, which streams the body and the answer.
- mirrored: the request goes to the app; a copy streams into each mirroring
  session's tunnel without ever making the caller wait: what the tunnel cannot
  take yet waits in a bounded backlog, and a copy that would overflow it (or
  exceed the copies in flight) is dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from mitmproxy import http

from sidecar.proxy.flows import (
    InFlight,
    add_forwarded_for,
    answer_preview_link,
    peer_of,
    refuse_malformed,
    request_view,
)
from sidecar.proxy.gateway import ROUTE_HEADER, Gateway
from sidecar.proxy.workers import Handoff
from sidecar.sessions.preview import add_to_baggage
from sidecar.sessions.registry import (
    MAX_MIRRORS_IN_FLIGHT,
    MIRROR_BACKLOG,
    Session,
    SessionRegistry,
)
from sidecar.sessions.router import decide, is_probe
from sidecar.tunnel.driver import StreamHandle
from sidecar.tunnel.protocol import HOP_BY_HOP, MAX_DATA, Data, End, RequestHead, ResetCode, Stats

__all__ = ["OfframpAddon"]

log = logging.getLogger(__name__)

_META = "offramp"
# mitmproxy answers `expect: 100-continue` itself before the body streams.
_NOT_HANDED_OVER = HOP_BY_HOP | {b"expect"}


class _MirrorCopy:
    """One mirror copy's request half. Chunks go straight into the tunnel while
    the stream has window; beyond that they wait in a backlog drained as window
    returns. The session's backlogs together are bounded by MIRROR_BACKLOG: a
    copy that would exceed it is dropped. The caller never waits on a copy."""

    def __init__(self, session: Session, handle: StreamHandle):
        self.session = session
        self.handle = handle
        self.dropped = False
        self.ended = False
        self.backlog: deque[bytes] = deque()
        self.pump: asyncio.Task[None] | None = None

    def feed(self, chunk: bytes) -> None:
        if self.dropped:
            return
        if not self.backlog and self.handle.tunnel.conn.send_window(self.handle.id) >= len(chunk):
            for i in range(0, len(chunk), MAX_DATA):
                self.handle.send(Data(self.handle.id, chunk[i : i + MAX_DATA]))
            return
        if self.session.mirror_backlog + len(chunk) > MIRROR_BACKLOG:
            self.drop("the local side is not keeping up")
            return
        self.backlog.append(chunk)
        self.session.mirror_backlog += len(chunk)
        if self.pump is None:
            self.pump = asyncio.create_task(self._drain())

    def finish(self) -> None:
        if self.dropped:
            return
        self.ended = True
        if self.pump is None:
            self.handle.send(End(self.handle.id))

    def drop(self, why: str) -> None:
        if self.dropped:
            return
        self.dropped = True
        self._release()
        if self.pump is not None and self.pump is not asyncio.current_task():
            self.pump.cancel()
        self.handle.reset(ResetCode.MIRROR_DROPPED, why)
        _count_drop(self.session)

    def _release(self) -> None:
        self.session.mirror_backlog -= sum(map(len, self.backlog))
        self.backlog.clear()

    async def _drain(self) -> None:
        try:
            while self.backlog:
                chunk = self.backlog[0]
                sent = await self.handle.send_body(chunk)
                if not self.backlog or self.backlog[0] is not chunk:
                    return  # dropped meanwhile
                self.backlog.popleft()
                self.session.mirror_backlog -= len(chunk)
                if not sent:
                    self.drop("the mirror stream ended early")
                    return
            if self.ended:
                self.handle.send(End(self.handle.id))
        finally:
            self.pump = None


def _count_drop(session: Session) -> None:
    session.mirror_dropped += 1
    session.tunnel.send(Stats(session.mirror_dropped, session.timeouts.total))


class _Tee:
    """mitmproxy's `request.stream` callable: passes chunks on, copies them out."""

    def __init__(self, copies: list[_MirrorCopy]):
        self.copies = copies

    def __call__(self, chunk: bytes) -> bytes:
        if chunk:
            for copy in self.copies:
                copy.feed(chunk)
        return chunk


class OfframpAddon:
    def __init__(
        self,
        registry: SessionRegistry,
        gateway: Gateway,
        probe_paths: frozenset[str],
        handoff: Handoff | None = None,
        preview_prefix: str | None = None,
    ):
        self.registry = registry
        self.preview_prefix = preview_prefix
        self.handoff = handoff
        self.gateway = gateway
        self.probe_paths = probe_paths
        self.in_flight = InFlight()

    # -- hooks ------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if refuse_malformed(flow) or answer_preview_link(flow, self.preview_prefix):
            return
        request = flow.request
        request.stream = True
        self.in_flight.add(flow)
        peer = peer_of(flow)
        handed = self.handoff.take(request) if self.handoff is not None else None
        if handed is not None:
            peer = handed  # a worker's: it added X-Forwarded-For
        else:
            add_forwarded_for(request, peer)

        sessions = self.registry.for_port(request.data.port)
        if not sessions:
            return
        fields = request.headers.fields
        view = request_view(request)
        probe = is_probe(view.first("user-agent"), view.path, self.probe_paths)
        decision = decide(sessions.candidates(view), view, probe)
        if decision.steal is None and not decision.mirrors:
            return
        http2 = request.is_http2
        upgrade = "" if http2 else _upgrade_of(request)
        head_fields = tuple(
            (n, v)
            for n, v in fields
            if n.lower() not in _NOT_HANDED_OVER or (http2 and _is_te_trailers(n, v))
        )
        no_body = _has_no_body(request) and not upgrade
        authority = request.authority if http2 else ""

        def head(mirror: bool, session: Session) -> Callable[[int], RequestHead]:
            # A preview session's requests carry the key on in W3C baggage, so that
            # the local process can pass it to the next service.
            key = session.spec.http_filter.preview
            fields = head_fields if key is None else add_to_baggage(head_fields, key)
            return lambda sid: RequestHead(
                sid,
                request.method,
                request.path,
                fields,
                request.port,
                peer,
                mirror,
                no_body,
                http2,
                authority,
                upgrade,
            )

        # A copy of an upgrade would open a second conversation the caller never sees.
        if decision.mirrors and not upgrade:
            copies = []
            for session in decision.mirrors:
                if session.mirrors_in_flight() >= MAX_MIRRORS_IN_FLIGHT:
                    _count_drop(session)
                    continue
                handle = session.tunnel.open_stream(head(True, session))
                if handle is not None:
                    session.mirrored += 1
                    session.mirror_streams.add(handle)
                    copies.append(_MirrorCopy(session, handle))
            if copies and not no_body:
                # A bodyless copy was complete with its head; others get the body
                # as it streams, and END once the request hook says it is whole.
                flow.metadata[_META + ".mirrors"] = copies
                request.stream = _Tee(copies)

        if decision.steal is not None:
            session = decision.steal
            handle = session.tunnel.open_stream(head(False, session))
            if handle is None:
                return  # the tunnel closed a moment ago: the app serves it
            session.stolen += 1
            key = self.gateway.register(handle, session.describe(), no_body, upgrade)
            flow.metadata[_META + ".route"] = key
            if http2:
                request.headers[ROUTE_HEADER] = key
            else:
                _only_what_the_gateway_reads(request, key, upgrade)
            request.data.host = self.gateway.host
            request.data.port = self.gateway.port
            log.debug("%s %s stolen by %s", request.method, request.path, session.describe())

    def request(self, flow: http.HTTPFlow) -> None:
        # The whole request has been read: close the mirror copies' request halves.
        for copy in flow.metadata.pop(_META + ".mirrors", ()):
            copy.finish()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        assert flow.response is not None
        flow.response.stream = True

    def error(self, flow: http.HTTPFlow) -> None:
        key = flow.metadata.pop(_META + ".route", None)
        if key is not None:
            self.gateway.abandon(key)
        for copy in flow.metadata.pop(_META + ".mirrors", ()):
            if not copy.dropped:
                copy.handle.reset(ResetCode.CANCEL, "the caller went away")


def _only_what_the_gateway_reads(request: http.Request, key: str, upgrade: str) -> None:
    """Strip the stolen HTTP/1.1 request that mitmproxy sends on to the gateway
    down to what the gateway reads: the route key, the body's framing and an
    upgrade. Its head went into the tunnel as the caller wrote it, and bytes the
    caller may send (the app would get them too) must not meet the gateway's
    stricter parser: a request it refused would leave the local side without a body."""
    data = request.data
    data.path = b"/"
    fields = [(b"host", b"offramp-gateway"), (ROUTE_HEADER.encode(), key.encode())]
    fields += [(n, v) for n, v in data.headers.fields if n.lower() in _GATEWAY_KEEPS]
    # mitmproxy reads the same head to know whether the caller's connection stays open.
    tokens = {t.strip().lower() for t in request.headers.get("connection", "").split(",")}
    if upgrade:
        protocol = upgrade.encode("utf-8", "surrogateescape")
        fields += [(b"connection", b"upgrade"), (b"upgrade", protocol)]
    elif "close" in tokens:
        fields.append((b"connection", b"close"))
    elif "keep-alive" in tokens:
        fields.append((b"connection", b"keep-alive"))
    data.headers = http.Headers(fields)


# mitmproxy has already checked the framing (a request it cannot frame never gets
# here), and reads `expect` after the hook to answer 100 Continue itself.
_GATEWAY_KEEPS = frozenset({b"content-length", b"transfer-encoding", b"expect"})


def _upgrade_of(request: http.Request) -> str:
    """The protocol an HTTP/1.1 request asks to switch to, or ""."""
    connection = request.headers.get("connection", "")
    if "upgrade" not in (t.strip().lower() for t in connection.split(",")):
        return ""
    return str(request.headers.get("upgrade", "")).strip()


def _is_te_trailers(name: bytes, value: bytes) -> bool:
    # gRPC servers require "te: trailers", the one `te` HTTP/2 allows.
    return name.lower() == b"te" and value.strip().lower() == b"trailers"


def _has_no_body(request: http.Request) -> bool:
    """True when the head alone says there is no body (HTTP/1.x framing)."""
    if request.is_http2 or request.is_http3:
        return False
    headers = request.headers
    if "transfer-encoding" in headers:
        return False
    length = headers.get("content-length")
    return length is None or length.strip() == "0"
