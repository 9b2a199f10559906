"""What both proxy addons (the primary's and a worker's) read from a flow."""

from __future__ import annotations

import asyncio
import re
import weakref

from mitmproxy import http

from sidecar.sessions.filters import RequestView
from sidecar.sessions.preview import link_answer

__all__ = [
    "InFlight",
    "add_forwarded_for",
    "answer_preview_link",
    "peer_of",
    "refuse_malformed",
    "request_view",
]


# RFC 9110 5.5: a recipient must reject or replace CR, LF and NUL in a field value.
# Refused, never replaced, so that no filter and no app sees a request whose
# header lines split differently from how the caller wrote them.
_CR_LF_NUL = re.compile(rb"[\r\n\x00]")


def refuse_malformed(flow: http.HTTPFlow) -> bool:
    """Answer 400 (and close) for a request with CR, LF or NUL in its target or a
    header, before any session or the app sees it. True if refused."""
    data = flow.request.data
    if _CR_LF_NUL.search(data.path):
        where = "the request target"
    else:
        bad = next((n for n, v in data.headers.fields if _CR_LF_NUL.search(n + v)), None)
        if bad is None:
            return False
        where = f"header {bad.decode('latin-1')!r}"
    flow.response = http.Response.make(
        400,
        f"offramp sidecar: {where} contains CR, LF or NUL, which HTTP does not allow "
        "(RFC 9110 section 5.5)\n",
        {"content-type": "text/plain; charset=utf-8", "connection": "close"},
    )
    return True


def answer_preview_link(flow: http.HTTPFlow, prefix: str | None) -> bool:
    """Answer a request for the preview link (sidecar.sessions.preview) here,
    whatever sessions are open. True if answered."""
    # Every request passes here: one byte-prefix comparison for all but the link's.
    if prefix is None or not flow.request.data.path.startswith(f"{prefix}/preview/".encode()):
        return False
    request = flow.request
    answer = link_answer(prefix, request.method, request.path, _over_tls(flow))
    if answer is None:
        return False
    flow.response = http.Response.make(
        answer.status,
        b"" if request.method == "HEAD" else answer.body.encode(),
        http.Headers([(k.encode(), v.encode()) for k, v in answer.headers]),
    )
    return True


def _over_tls(flow: http.HTTPFlow) -> bool:
    """The caller's connection was TLS: to this proxy, or (as it is in a cluster,
    where an ingress ends TLS) to the proxy in front that says so."""
    headers = flow.request.headers
    proto = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    forwarded = headers.get("forwarded", "").split(",")[0].lower().replace(" ", "")
    return bool(
        flow.client_conn.tls_established
        or proto == "https"
        or any(part == "proto=https" for part in forwarded.split(";"))
    )


def peer_of(flow: http.HTTPFlow) -> str:
    """`ip:port` of the caller, or "" when mitmproxy does not know it."""
    peer = flow.client_conn.peername
    return f"{peer[0]}:{peer[1]}" if peer else ""


def add_forwarded_for(request: http.Request, peer: str) -> None:
    """Append the caller's address (`peer` as from `peer_of`) to X-Forwarded-For.
    (Runs on every request: one pass over the raw fields, and appending the
    header where there was none, cost fewer calls than the mapping methods.)"""
    client_ip = peer.rpartition(":")[0]
    if not client_ip:
        return
    headers = request.headers
    if any(name.lower() == b"x-forwarded-for" for name, _ in headers.fields):
        headers["x-forwarded-for"] = f"{headers['x-forwarded-for']}, {client_ip}"
    else:
        headers.add("x-forwarded-for", client_ip)


def request_view(request: http.Request) -> RequestView:
    """The request head as the filters see it: each header as `Name: value`."""
    data = request.data
    return RequestView(
        data.method.decode("latin-1"),
        data.path.decode("latin-1"),
        [f"{n.decode('latin-1')}: {v.decode('latin-1')}" for n, v in data.headers.fields],
    )


class InFlight:
    """The requests a proxy has begun and not finished, for the drain on SIGTERM.

    It needs no hook of its own (every hook an addon implements costs mitmproxy
    about 30 Python calls on every request): flows are held weakly from
    `requestheaders` on, and looked at only when asked."""

    def __init__(self) -> None:
        self._flows: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()

    def add(self, flow: http.HTTPFlow) -> None:
        self._flows.add(flow)

    def count(self) -> int:
        return sum(1 for flow in list(self._flows) if not _finished(flow))

    async def drain(self, seconds: float) -> int:
        """Wait until none is open, or `seconds`; how many are still open."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        # Polled: flows signal nothing without a hook, and this runs once, at exit.
        while (open_ := self.count()) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return open_


def _finished(flow: http.HTTPFlow) -> bool:
    # The answer is complete (for an upgrade: its 101), or the flow has ended.
    response = flow.response
    done = response is not None and response.timestamp_end is not None
    return done or not flow.live or flow.error is not None
