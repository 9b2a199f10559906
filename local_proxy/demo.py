"""`offramp demo`: the whole path on one machine, nothing else to install.

A demo app stands in for the pod, the real sidecar runs in front of it, and a
second small server stands in for the developer's local process. A session
steals requests carrying `x-preview: alice`; sample requests show who answered
each and why. Exit status 0 when every request went where it should.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from local_proxy.config import LocalSettings
from local_proxy.session import LocalSession
from sidecar.sessions.spec import HttpFilterSpec, SessionSpec

__all__ = ["run_demo"]

FILTER = "^x-preview: alice$"


@dataclass(frozen=True)
class Sample:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    stolen: bool
    why: str


SAMPLES = (
    Sample("GET", "/cart", {"x-preview": "alice"}, b"", True, "header x-preview: alice matches"),
    Sample("GET", "/cart", {}, b"", False, "no header matches the filter"),
    Sample("GET", "/cart", {"x-preview": "bob"}, b"", False, "bob's key, not alice's"),
    Sample(
        "POST",
        "/orders",
        {"x-preview": "alice", "content-type": "application/json"},
        b'{"item": "tea", "qty": 2}',
        True,
        "header matches; the body streams through the tunnel",
    ),
    Sample(
        "GET",
        "/healthz",
        {"x-preview": "alice", "user-agent": "kube-probe/1.31"},
        b"",
        False,
        "a Kubernetes probe is never stolen",
    ),
    Sample(
        "GET",
        "/search?q=tea",
        {"X-Preview": "ALICE"},
        b"",
        True,
        "header filters are case-insensitive",
    ),
)


def _free_ports(n: int) -> list[int]:
    """`n` distinct free ports (all held while chosen, so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def _server(name: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            out = json.dumps(
                {"served_by": name, "method": self.command, "path": self.path, "bytes": len(body)}
            ).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("x-served-by", name)
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@contextlib.contextmanager
def _servers() -> Iterator[tuple[ThreadingHTTPServer, ThreadingHTTPServer]]:
    app, local = _server("app"), _server("local")
    try:
        yield app, local
    finally:
        app.shutdown()
        local.shutdown()


async def _wait_healthy(url: str, sidecar: asyncio.subprocess.Process) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            if sidecar.returncode is not None:
                raise RuntimeError(f"the sidecar exited with status {sidecar.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url, timeout=1)).status_code == 200:
                    return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"the sidecar did not become healthy at {url}")


async def run_demo(quiet: bool = False) -> int:
    def say(line: str = "") -> None:
        if not quiet:
            print(line, flush=True)

    listen_port, control_port, health_port = _free_ports(3)
    with tempfile.TemporaryDirectory() as tmp, _servers() as (app, local):
        token_file = Path(tmp) / "token"
        token_file.write_text(secrets.token_hex(32))
        token_file.chmod(0o600)
        app_port, local_port = app.server_address[1], local.server_address[1]
        say(f"demo app (the pod's app)    on 127.0.0.1:{app_port}")
        say(f"your local process          on 127.0.0.1:{local_port}")
        sidecar = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar",
            f"--app-port={app_port}",
            f"--listen-port={listen_port}",
            "--listen-host=127.0.0.1",
            f"--control-port={control_port}",
            "--control-host=127.0.0.1",
            f"--health-port={health_port}",
            f"--token-file={token_file}",
            "--capture=none",
            "--log-level=warning",
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        session: LocalSession | None = None
        runner: asyncio.Task[None] | None = None
        try:
            await _wait_healthy(f"http://127.0.0.1:{control_port}/healthz", sidecar)
            say(f"offramp sidecar             on 127.0.0.1:{listen_port} (control {control_port})")
            settings = LocalSettings(
                sidecar_url=f"ws://127.0.0.1:{control_port}",
                token=token_file.read_text(),
                to_port=int(local_port),
                spec=SessionSpec(http_filter=HttpFilterSpec(header_filter=FILTER), client="demo"),
            )
            session = LocalSession(settings, report=lambda line: say(f"  {line}"))
            runner = asyncio.create_task(session.run())
            ready = asyncio.create_task(session.ready.wait())
            await asyncio.wait({runner, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            if runner.done():
                runner.result()  # raises why the session failed
            ready.cancel()
            say(f"\nsending {len(SAMPLES)} requests to the sidecar; filter: header {FILTER!r}\n")
            stolen = passed = wrong = 0
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{listen_port}") as client:
                for n, sample in enumerate(SAMPLES, 1):
                    response = await client.request(
                        sample.method, sample.path, headers=sample.headers, content=sample.body
                    )
                    by = response.headers.get("x-served-by", f"? ({response.status_code})")
                    went_local = by == "local"
                    stolen += went_local
                    passed += by == "app"
                    ok = went_local == sample.stolen
                    wrong += not ok
                    hdrs = " ".join(f"{k}: {v}" for k, v in sample.headers.items())
                    say(
                        f"{n}. {sample.method} {sample.path} [{hdrs or 'no extra headers'}]\n"
                        f"   -> answered by {'YOUR LOCAL PROCESS' if went_local else 'the app'}: "
                        f"{sample.why}{'' if ok else '  <-- UNEXPECTED'}"
                    )
            expected = sum(s.stolen for s in SAMPLES)
            print(
                f"\nstolen: {stolen}, passed: {passed} "
                f"(expected stolen: {expected}, passed: {len(SAMPLES) - expected})",
                flush=True,
            )
            return 0 if wrong == 0 and stolen + passed == len(SAMPLES) else 1
        finally:
            if session is not None:
                session.stop()
            if runner is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(runner, 10)
            if sidecar.returncode is None:
                sidecar.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(sidecar.wait(), 15)
                except TimeoutError:
                    sidecar.kill()
                    await sidecar.wait()
