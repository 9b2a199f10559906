"""How a caller's connection reaches the app: when the app connection opens, and
how long a caller may take to send a request head.

mitmproxy's reverse mode either connects to the app as soon as a caller connects
("eager") or when the first request needs it ("lazy"). Eager made 300 callers
that dribble header bytes hold 300 connections to the app; lazy never connects
for a protocol in which the server speaks first (the caller waits for a
greeting that never comes). `GuardedReverseProxy` does both, in turn:

- the app connection opens when a request needs it (`--app-connect request`,
  the default), or once the caller has said nothing for SERVER_FIRST_WAIT
  seconds (it may be waiting for the server to speak first: MySQL, SMTP, SSH);
  with `--app-connect accept` it opens at once, as before;
- an HTTP/1 request head must arrive whole within `header_timeout` seconds
  from its first byte (`--header-timeout`, default 20 s; 0 turns it off). A
  late one is answered 408, our side of the connection is closed, and after
  LINGER seconds the rest. Not timed: a connection with nothing sent on it (an
  idle keep-alive connection, or one waiting for a server that speaks first),
  request and response bodies, h2c (its streams are the app's to time),
  websockets and raw TCP after their start.

mitmproxy internals this relies on (12.2.3, see pyproject.toml):
- `ReverseInstance.make_top_layer` returns the top layer of each connection
  (`install` replaces it); `ReverseProxy` sets `context.server.address` from
  the mode's spec on `Start`, as `GuardedReverseProxy` does;
- a child layer marks a blocking command as its own (`command.blocking = layer`)
  before it reaches us, so commands of the layers below pass through;
  `RequestWakeup` is answered with a `Wakeup` to the top layer;
- `NextLayer.layer` is the layer chosen for the connection (None until then),
  an `HttpLayer` keeps each connection's protocol layer in `connections`, and
  `Http1Server` waits for a head in its `read_headers` state with the bytes so
  far in `buf`.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

from mitmproxy.proxy import commands, events, layer, mode_servers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import HttpLayer
from mitmproxy.proxy.layers.http._http1 import Http1Server
from mitmproxy.proxy.mode_specs import ReverseMode

from sidecar.settings import HEADER_TIMEOUT

__all__ = [
    "HEADER_TIMEOUT",
    "LINGER",
    "SERVER_FIRST_WAIT",
    "AppConnect",
    "GuardedReverseProxy",
    "connection_strategy",
    "install",
]

AppConnect = Literal["request", "accept"]

SERVER_FIRST_WAIT = 0.2
"""Seconds of silence from a caller after which the app connection opens anyway."""
LINGER = 1.0
"""Seconds a timed-out caller has to read its 408 before the connection is closed."""


def _timeout_answer(seconds: float) -> bytes:
    body = (
        f"offramp: the request head did not arrive within {seconds:g} s of its first byte; "
        "the connection is closed\n"
    ).encode()
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )


def connection_strategy(app_connect: AppConnect) -> Literal["lazy", "eager"]:
    """mitmproxy's connection_strategy option for `--app-connect`."""
    return "eager" if app_connect == "accept" else "lazy"


class GuardedReverseProxy(layer.Layer):
    """mitmproxy's ReverseProxy layer, with the app connection opened when
    needed and a time limit on request heads (see the module's docstring)."""

    header_timeout: float = HEADER_TIMEOUT
    """Set for the whole process by `install`."""

    def __init__(self, context: Context):
        super().__init__(context)
        self.child_layer: layer.NextLayer = layer.NextLayer(self.context)
        self._wakeups: set[int] = set()
        self._head_since: float | None = None
        self._heard_client = False
        self._ended = False

    def _wake_in(self, delay: float) -> commands.RequestWakeup:
        command = commands.RequestWakeup(delay)
        self._wakeups.add(id(command))
        return command

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup) and id(event.command) in self._wakeups:
            self._wakeups.discard(id(event.command))
            yield from self._woken()
            return
        if self._ended:
            yield from self._after_timeout(event)
            return
        if isinstance(event, events.Start):
            yield from self._start()
            return
        if isinstance(event, events.DataReceived) and event.connection == self.context.client:
            self._heard_client = True
        yield from self.child_layer.handle_event(event)
        yield from self._watch_head()

    def _start(self) -> layer.CommandGenerator[None]:
        spec = self.context.client.proxy_mode
        assert isinstance(spec, ReverseMode)
        server = self.context.server
        server.address = spec.address
        if self.context.options.connection_strategy == "eager":
            if (yield commands.OpenConnection(server)):
                yield commands.CloseConnection(self.context.client)
                self._ended = True
                return
        else:
            yield self._wake_in(SERVER_FIRST_WAIT)
        yield from self.child_layer.handle_event(events.Start())

    def _woken(self) -> layer.CommandGenerator[None]:
        if self._ended:
            yield commands.CloseConnection(self.context.client)
            return
        server = self.context.server
        if not self._heard_client and self.child_layer.layer is None and not server.connected:
            # Silent so far: the app may be the one to speak first. If it cannot be
            # reached, the caller is told so the way eager connecting tells it.
            if (yield commands.OpenConnection(server)):
                self._ended = True
                yield commands.CloseConnection(self.context.client)
            return
        since = self._head_since
        if since is not None and time.monotonic() - since >= self.header_timeout:
            yield from self._time_out()

    def _in_head(self) -> bool:
        """The caller has sent part of an HTTP/1 request head, and not all of it."""
        chosen = self.child_layer.layer
        if chosen is None:
            return bool(self.child_layer.data_client())
        if not isinstance(chosen, HttpLayer):
            return False  # raw TCP
        http1 = chosen.connections.get(self.context.client)
        return (
            isinstance(http1, Http1Server) and http1.state == http1.read_headers and bool(http1.buf)
        )

    def _watch_head(self) -> layer.CommandGenerator[None]:
        if self.header_timeout <= 0:
            return
        if not self._in_head():
            self._head_since = None
        elif self._head_since is None:
            self._head_since = time.monotonic()
            yield self._wake_in(self.header_timeout)

    def _time_out(self) -> layer.CommandGenerator[None]:
        self._ended = True
        client = self.context.client
        yield commands.Log(
            f"{client.peername}: request head not complete within {self.header_timeout:g} s; "
            "answered 408",
            logging.INFO,
        )
        yield commands.SendData(client, _timeout_answer(self.header_timeout))
        yield commands.CloseTcpConnection(client, half_close=True)
        if self.context.server.connected:
            yield commands.CloseConnection(self.context.server)
        yield self._wake_in(LINGER)

    def _after_timeout(self, event: events.Event) -> layer.CommandGenerator[None]:
        """The caller reads its 408; what it still sends is dropped."""
        if isinstance(event, events.ConnectionClosed) and event.connection == self.context.client:
            yield commands.CloseConnection(self.context.client)


def install(header_timeout: float) -> None:
    """Use `GuardedReverseProxy` for every reverse-mode listener of this process."""
    GuardedReverseProxy.header_timeout = header_timeout

    def make_top_layer(self: mode_servers.ReverseInstance, context: Context) -> layer.Layer:
        return GuardedReverseProxy(context)

    mode_servers.ReverseInstance.make_top_layer = make_top_layer  # type: ignore[method-assign]
