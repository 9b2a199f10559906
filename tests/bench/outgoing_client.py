"""The client of the outgoing benchmark (standard library only; run directly or as
offramp's local process):

    python3 outgoing_client.py HOST ECHO_PORT SINK_PORT CONNECTIONS MIB LISTEN_PORT

Listens on 127.0.0.1:LISTEN_PORT (offramp waits for that before it steals), then:
CONNECTIONS times connect to ECHO_PORT, send a byte, read it back, close (setup
plus one round trip, timed each); then send MIB MiB to SINK_PORT, half-close, and
read its count (timed). Prints `RESULT {json}`.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import time


def main() -> None:
    host, echo, sink, count, mib, listen = sys.argv[1:7]
    server = socket.create_server(("127.0.0.1", int(listen)))
    times = []
    for _ in range(int(count)):
        started = time.perf_counter()
        with socket.create_connection((host, int(echo)), timeout=30) as s:
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise SystemExit("the echo server did not echo")
        times.append((time.perf_counter() - started) * 1000)
    size = int(mib) * 1024 * 1024
    block = b"\x5a" * (1 << 20)
    started = time.perf_counter()
    with socket.create_connection((host, int(sink)), timeout=120) as s:
        for _ in range(int(mib)):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        got = int(s.makefile("rb").readline())
    seconds = time.perf_counter() - started
    if got != size:
        raise SystemExit(f"the sink counted {got} bytes of {size}")
    times.sort()
    print("RESULT " + json.dumps({
        "setup_ms_p50": statistics.median(times),
        "setup_ms_p99": times[min(len(times) - 1, int(len(times) * 0.99))],
        "mib_per_s": int(mib) / seconds,
    }), flush=True)  # fmt: skip
    server.close()


if __name__ == "__main__":
    main()
