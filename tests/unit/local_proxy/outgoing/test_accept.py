"""offramp's accept loop for CMD's redirected connections: an accept() that fails
(out of descriptors, say) rests the listener rather than spinning on it, and the
connection waiting is taken once the rest is over."""

from __future__ import annotations

import asyncio
import errno
import socket
from types import SimpleNamespace

import pytest

from local_proxy.outgoing import runner
from local_proxy.outgoing.runner import Outgoing


class _FailingOnce(socket.socket):
    """A listener whose first accept() fails as a process out of descriptors sees."""

    def __init__(self) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.calls = 0

    def accept(self) -> tuple[socket.socket, object]:
        self.calls += 1
        if self.calls == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


@pytest.mark.timeout(10)
async def test_a_failing_accept_rests_the_listener_then_takes_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner, "ACCEPT_PAUSE", 0.3)
    monkeypatch.setattr(runner, "original_destination", lambda sock: ("10.0.0.1", 80))
    served: list[tuple[str, int, bytes]] = []
    outgoing = object.__new__(Outgoing)  # only what the accept loop uses
    outgoing.session = SimpleNamespace(open_tunnel=lambda: None)  # type: ignore[assignment]
    outgoing.relay = SimpleNamespace(  # type: ignore[assignment]
        serve=lambda conn, host, port, first: (served.append((host, port, first)), conn.close())
    )
    outgoing._tcp_dns = set()
    outgoing._resting = set()
    loop = asyncio.get_running_loop()
    with _FailingOnce() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), outgoing._accept, listener)
        try:
            _, writer = await asyncio.open_connection(*listener.getsockname())
            writer.write(b"hello")
            await writer.drain()
            await asyncio.sleep(0.15)
            assert listener.calls == 1 and not served  # resting, not spinning
            assert len(outgoing._resting) == 1
            for _ in range(50):
                await asyncio.sleep(0.05)
                if served:
                    break
            assert served == [("10.0.0.1", 80, b"hello")]
            assert not outgoing._resting
            writer.close()
        finally:
            loop.remove_reader(listener.fileno())
