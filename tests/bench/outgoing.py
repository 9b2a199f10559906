"""Outgoing connections, measured side by side on loopback in one run.

    .venv/bin/python -m tests.bench.outgoing [--connections 500] [--mib 256] [--rounds 3]

One client (tests/bench/outgoing_client.py) measures per-connection setup (connect,
one byte there and back, close; p50 and p99) and bulk throughput (MiB sent to a
sink) against servers on this machine's 127.0.0.1, three ways:

  direct      the client runs as a plain process
  local       the client runs as `offramp steal ... --local :PORTS -- CLIENT`: in
              its namespace; offramp's relay dials the laptop's 127.0.0.1
  tunnel      `offramp steal ... --remote 127.0.0.1:PORTS -- CLIENT`: through the
              tunnel to a real sidecar (on 127.0.0.1, --capture none), which dials

The three take turns for --rounds rounds; each figure is the median over rounds.
Targets (issue 16): the tunnel adds <= 1 ms per connection over direct and carries
>= 100 MiB/s; a local-filtered destination adds <= 0.5 ms. Needs what the outgoing
tests need (nft, unshare); run as any user that may make user namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from tests.support import free_ports, start_sidecar

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "tests" / "bench" / "outgoing_client.py"
OFFRAMP = Path(sys.executable).parent / "offramp"


def _servers() -> tuple[int, int, list[socket.socket]]:
    """An echo server (one byte back, then close) and a sink (counts to EOF).

    The echo server is one thread with one epoll loop, not a thread per
    connection: starting a thread took about 0.1 ms of each direct connection's
    0.25 ms, time that is the server's, not the path's."""
    echo = socket.create_server(("127.0.0.1", 0), backlog=1024)
    sink = socket.create_server(("127.0.0.1", 0), backlog=16)

    def serve_echo() -> None:
        echo.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(echo, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is echo:
                        try:
                            conn, _ = echo.accept()
                        except BlockingIOError:
                            continue
                        except OSError:  # the listener was closed: the bench is over
                            return
                        selector.register(conn, selectors.EVENT_READ)
                        continue
                    selector.unregister(sock)
                    with sock, contextlib.suppress(OSError):
                        if data := sock.recv(1):
                            sock.send(data)

    def serve_sink() -> None:
        while True:
            try:
                conn, _ = sink.accept()
            except OSError:
                return
            threading.Thread(target=count, args=(conn,), daemon=True).start()

    def count(conn: socket.socket) -> None:
        with conn:
            total = 0
            while data := conn.recv(1 << 20):
                total += len(data)
            conn.sendall(f"{total}\n".encode())

    threading.Thread(target=serve_echo, daemon=True).start()
    threading.Thread(target=serve_sink, daemon=True).start()
    return echo.getsockname()[1], sink.getsockname()[1], [echo, sink]


def _run(argv: list[str]) -> dict[str, float]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    raise RuntimeError(f"{argv[0]}: no result\n{done.stdout}\n{done.stderr}")


def measure(connections: int, mib: int, rounds: int) -> dict[str, dict[str, float]]:
    echo, sink, listeners = _servers()
    tmp = Path(tempfile.mkdtemp(prefix="offramp-bench-out-"))
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    app_port, listen = free_ports(2, avoid=(echo, sink))
    sidecar = start_sidecar(app_port, token, tmp)
    client = [sys.executable, str(CLIENT), "127.0.0.1", str(echo), str(sink),
              str(connections), str(mib)]  # fmt: skip
    ports = (str(echo), str(sink))
    steal = [str(OFFRAMP), "steal", "--sidecar-url", sidecar.control_url, "--token-file",
             str(token), "--to", str(listen)]  # fmt: skip
    ways = {
        "direct": [*client, str(listen)],
        "local": [*steal, *(f for p in ports for f in ("--local", f":{p}")), "--", *client,
                  str(listen)],
        "tunnel": [*steal, *(f for p in ports for f in ("--remote", f"127.0.0.1:{p}")), "--",
                   *client, str(listen)],
    }  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in ways}
    try:
        for _ in range(rounds):
            for name, argv in ways.items():
                runs[name].append(_run(argv))
    finally:
        sidecar.stop()
        for listener in listeners:
            listener.close()
    return {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in runs.items()
    }


def report(results: dict[str, dict[str, float]]) -> str:
    direct = results["direct"]
    lines = [f"{'':8} {'setup p50':>10} {'setup p99':>10} {'added p50':>10} {'MiB/s':>8}"]
    for name, r in results.items():
        added = r["setup_ms_p50"] - direct["setup_ms_p50"]
        lines.append(f"{name:8} {r['setup_ms_p50']:8.3f}ms {r['setup_ms_p99']:8.3f}ms "
                     f"{added:+8.3f}ms {r['mib_per_s']:8.0f}")  # fmt: skip
    tunnel_added = results["tunnel"]["setup_ms_p50"] - direct["setup_ms_p50"]
    local_added = results["local"]["setup_ms_p50"] - direct["setup_ms_p50"]
    checks = [
        ("tunnel adds <= 1 ms per connection", tunnel_added <= 1.0, f"{tunnel_added:+.3f} ms"),
        ("tunnel carries >= 100 MiB/s", results["tunnel"]["mib_per_s"] >= 100,
         f"{results['tunnel']['mib_per_s']:.0f} MiB/s"),
        ("local adds <= 0.5 ms per connection", local_added <= 0.5, f"{local_added:+.3f} ms"),
    ]  # fmt: skip
    lines.append("")
    lines += [f"{'met' if ok else 'NOT met'}: {what} ({value})" for what, ok, value in checks]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.outgoing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--connections", type=int, default=500)
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, help="also write results.json here")
    args = p.parse_args(argv)
    results = measure(args.connections, args.mib, args.rounds)
    print(report(results))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "outgoing.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
