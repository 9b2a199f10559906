"""Which protocol a captured connection speaks: raw TCP, HTTP/1.1 or h2c.

In-cluster gRPC is cleartext HTTP/2 with prior knowledge: the client opens with
the preface `PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n` and no TLS, so there is no ALPN
to say "h2". mitmproxy 12 only speaks HTTP/2 where ALPN chose it, and would
parse the preface as an HTTP/1 request. `ProtocolDetect` replaces mitmproxy's
`NextLayer` addon and, on seeing the preface, marks the connection as if ALPN
had chosen h2.

mitmproxy internals this relies on (pinned to 12.2.3 in pyproject.toml; check
each before moving the pin):
- `NextLayer._next_layer(context, data_client, data_server)` returns the layer
  for a connection's first bytes, and raising `NeedsMoreData` there defers the
  decision until more bytes arrive;
- `HttpLayer` picks `Http2Server` for the client side when
  `context.client.alpn == b"h2"`, and `HttpClient` picks `Http2Client` for a
  server connection whose `alpn == b"h2"`. Neither looks at whether TLS
  actually negotiated it;
- where the server connection (`context.server`) is already open when the
  first bytes arrive (`--app-connect accept`, or a caller silent for a moment:
  `sidecar.proxy.connections`), its `alpn` is set here too; a server
  connection opened later (by the request, to the gateway or to the app) gets
  it in the `server_connect` hook, before `HttpClient` starts;
- `HttpLayer.get_connection` does not reuse a server connection for an h2
  client unless that connection's `alpn` is also h2; with both set, the
  streams of one client connection share one connection per destination;
- `Proxyserver` finds this addon by the name "nextlayer";
- the addon manager finds a hook with `getattr(addon, hook_name)`, so a bound
  method stored on the instance serves as well as one defined on the class.

Anything that is not HTTP goes to the app as raw TCP, untouched: a server that
speaks first, or first bytes that are no HTTP request line. An h2c server's
SETTINGS frame, which grpcio sends as soon as a connection opens, does not
count as speaking first: the caller's bytes decide.
"""

from __future__ import annotations

import logging
import re

from mitmproxy import hooks, log, options
from mitmproxy.addons import core, proxyserver
from mitmproxy.addons.next_layer import NeedsMoreData, NextLayer
from mitmproxy.master import Master
from mitmproxy.proxy import layer, layers, server_hooks
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import HTTPMode

from sidecar.tunnel.h2conn import H2_PREFACE, starts_like_h2_settings

__all__ = ["ProtocolDetect", "new_master"]

# A request line starts with a method token then a space. Shorter prefixes of
# that shape are given the benefit of the doubt.
_HTTP_START = re.compile(rb"^[A-Z]{1,20}( |$)")


class ProtocolDetect(NextLayer):
    """mitmproxy's NextLayer addon, plus raw TCP for non-HTTP and h2c by preface."""

    name = "nextlayer"  # mitmproxy's proxyserver looks for the addon by this name

    def __init__(self, rides_along: object | None = None) -> None:
        """`rides_along`: an addon whose hooks this one carries, instead of it
        taking a place of its own in mitmproxy's addon chain. For every event
        (about eight a request) mitmproxy walks each addon in the chain, about 14
        Python calls an addon whether it has the hook or not; carried here, the
        sidecar's chain is as short as bare mitmproxy's."""
        super().__init__()
        if rides_along is None:
            return
        for hook in hooks.all_hooks:
            method = getattr(rides_along, hook, None)
            if method is None:
                continue
            if hasattr(self, hook):
                raise TypeError(f"both ProtocolDetect and {rides_along!r} have the {hook} hook")
            setattr(self, hook, method)

    def _next_layer(
        self, context: Context, data_client: bytes, data_server: bytes
    ) -> layer.Layer | None:
        if not data_client:
            if data_server and not starts_like_h2_settings(data_server):
                return layers.TCPLayer(context)
            # An h2c server (grpcio's, for one) sends its SETTINGS as soon as the
            # connection opens; whether the caller speaks h2c, its bytes tell.
            raise NeedsMoreData
        if data_client.startswith(H2_PREFACE):
            context.client.alpn = b"h2"
            if context.server.connected and not context.server.tls:
                context.server.alpn = b"h2"
            return layers.HttpLayer(context, HTTPMode.transparent)
        if H2_PREFACE.startswith(data_client):
            raise NeedsMoreData  # "P", "PR", ...: the preface, or a PUT/POST, soon
        if not _HTTP_START.match(data_client):
            return layers.TCPLayer(context)
        return super()._next_layer(context, data_client, data_server)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.client.alpn == b"h2" and not data.client.tls and not data.server.tls:
            data.server.alpn = b"h2"


def new_master(server: proxyserver.Proxyserver, addon: object) -> Master:
    """mitmproxy's Master as the sidecar runs it: mitmproxy's Core, `server`, and
    ProtocolDetect carrying `addon`'s hooks (as many addons as bare mitmproxy).

    Without mitmproxy's deprecated `add_log` hook: the handler it puts on the
    root logger turns every log line of the process (ours included) into a
    wake-up of the event loop through its self-pipe and an event sent to each
    addon, none of which listens for it. The outgoing dialer logs a line per
    connection: with the hook, `--log-level info` cost about 0.09 ms per
    connection over `warning`; without it, about 0.015 ms."""
    master = Master(options.Options())
    master.addons.add(core.Core(), server, ProtocolDetect(addon))
    for handler in list(logging.getLogger().handlers):
        if isinstance(handler, log.LegacyLogEvents):
            handler.uninstall()
    return master
