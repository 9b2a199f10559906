"""How the sidecar tells an h2 server's first frame from a server-first protocol,
how its own gRPC errors are encoded, and the mitmproxy master it runs."""

from __future__ import annotations

import h2.config
import h2.connection
import pytest

from sidecar.proxy.gateway_h2 import _grpc_message
from sidecar.tunnel.h2conn import starts_like_h2_settings


def server_preface() -> bytes:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    return conn.data_to_send()


def test_a_real_h2_servers_first_bytes_look_like_settings() -> None:
    first = server_preface()
    assert starts_like_h2_settings(first)
    # Judged on what has arrived so far, byte by byte.
    for n in range(1, 9):
        assert starts_like_h2_settings(first[:n])


@pytest.mark.parametrize(
    "greeting",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"220 smtp.example ESMTP\r\n",
        b"J\x00\x00\x00\x0a8.0.36\x00",  # a MySQL server greeting
        b"+OK POP3 ready\r\n",
        b"\x00\x00\x0c\x04\x01\x00\x00\x00\x00",  # SETTINGS with ACK: never first
        b"\x00\x00\x07\x04\x00\x00\x00\x00\x00",  # length not a multiple of 6
        b"\x00\x00\x00\x04\x00\x00\x00\x00\x01",  # not on stream 0
    ],
)
def test_server_first_protocols_are_not_mistaken_for_h2(greeting: bytes) -> None:
    assert not starts_like_h2_settings(greeting)


def test_grpc_message_percent_encodes_as_the_grpc_spec_says() -> None:
    assert _grpc_message("plain text: ok") == b"plain text: ok"
    assert _grpc_message("100% down") == b"100%25 down"
    assert _grpc_message("caf\u00e9\nnext") == b"caf%C3%A9%0Anext"


class _Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []

    def requestheaders(self, flow: object) -> None:
        self.seen.append(("requestheaders", flow))

    def error(self, flow: object) -> None:
        self.seen.append(("error", flow))


async def test_protocol_detect_carries_another_addons_hooks_through_mitmproxys_dispatch() -> None:
    from mitmproxy import options
    from mitmproxy.master import Master
    from mitmproxy.proxy.layers.http import HttpErrorHook, HttpRequestHeadersHook
    from mitmproxy.test import tflow

    from sidecar.proxy.h2c import ProtocolDetect

    recorder = _Recorder()
    master = Master(options.Options())
    master.addons.add(ProtocolDetect(recorder))
    assert len(master.addons.chain) == 1
    flow = tflow.tflow()
    await master.addons.trigger_event(HttpRequestHeadersHook(flow))
    await master.addons.trigger_event(HttpErrorHook(flow))
    assert recorder.seen == [("requestheaders", flow), ("error", flow)]


def test_protocol_detect_refuses_to_carry_a_hook_it_has_itself() -> None:
    from sidecar.proxy.h2c import ProtocolDetect

    class Clashing:
        def server_connect(self, data: object) -> None: ...

    with pytest.raises(TypeError, match="server_connect"):
        ProtocolDetect(Clashing())


async def test_the_sidecars_master_leaves_no_add_log_hook_on_the_root_logger() -> None:
    """mitmproxy's Master installs a handler that turns every log line into a wake-up
    of the event loop; the sidecar's master takes it off again (and only it)."""
    import logging

    from mitmproxy import log
    from mitmproxy.addons import proxyserver

    from sidecar.proxy.h2c import new_master

    root = logging.getLogger()
    before = list(root.handlers)
    master = new_master(proxyserver.Proxyserver(), object())
    try:
        assert not [h for h in root.handlers if isinstance(h, log.LegacyLogEvents)]
        assert root.handlers == [h for h in before if not isinstance(h, log.LegacyLogEvents)]
        assert [type(a).__name__ for a in master.addons.chain] == [
            "Core", "Proxyserver", "ProtocolDetect",
        ]  # fmt: skip
    finally:
        master.shutdown()
