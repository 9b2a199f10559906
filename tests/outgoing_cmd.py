"""The local process of the outgoing tests: `offramp steal ... -- python3 this.py ARGS`.

Standard library only (it runs under the system's python3, not offramp's). It
listens on 127.0.0.1:PORT for stolen requests (answering "the local process",
and ending on GET /done), runs the checks named in CHECKS, prints one line
`RESULT {json}`, then waits for /done (at most 120 s).

    python3 outgoing_cmd.py PORT SERVICE_IP HARDCODED_DNS BULK_BYTES CHECK,CHECK,... LOCAL_PORT
"""

from __future__ import annotations

import errno
import hashlib
import json
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

done = threading.Event()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"the local process saw {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if self.path == "/done":
            done.set()

    def log_message(self, *args: object) -> None:
        pass


def resolve(name: str) -> list[str] | str:
    try:
        return sorted({i[4][0] for i in socket.getaddrinfo(name, 80, socket.AF_INET)})
    except socket.gaierror as e:
        return f"gaierror {e.errno}"


def http_get(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[-1].decode()


def hardcoded_dns(server: str, name: bytes = b"payment-service.default.svc.cluster.local") -> str:
    qname = b"".join(bytes([len(p)]) + p for p in name.split(b"."))
    query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + qname + b"\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(query, (server, 53))
        answer = s.recv(4096)
    return socket.inet_ntoa(answer[-4:])  # the last record's A data


def dns_over_tcp() -> str:
    """Ask resolv.conf's nameserver over TCP (as `dig +tcp` does) for payment-service."""
    with open("/etc/resolv.conf") as conf:
        server = next(line.split()[1] for line in conf if line.startswith("nameserver"))
    qname = b"".join(
        bytes([len(p)]) + p for p in b"payment-service.default.svc.cluster.local".split(b".")
    )
    query = struct.pack("!HHHHHH", 0x4321, 0x0100, 1, 0, 0, 0) + qname + b"\x00\x00\x01\x00\x01"
    with socket.create_connection((server, 53), timeout=10) as s:
        s.sendall(len(query).to_bytes(2, "big") + query)
        reply = s.makefile("rb")
        size = int.from_bytes(reply.read(2), "big")
        answer = reply.read(size)
    return socket.inet_ntoa(answer[-4:])


def attempt(host: str, port: int) -> str:
    """What a client sees when it connects (a blocking socket, as most libraries'
    synchronous clients use) and reads: what it read, or the error's errno name
    (ECONNREFUSED at connect, ECONNRESET on reading, ...)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.connect((host, port))
            s.settimeout(20)
            s.sendall(b"hello")
            data = s.recv(100)
            return f"read {data!r}"
    except OSError as e:  # ETIMEDOUT arrives as TimeoutError too, with its errno
        if e.errno is None:
            return "client timeout"
        return errno.errorcode.get(e.errno or 0, type(e).__name__)


def attempt_nonblocking(host: str, port: int) -> list[object]:
    """The same with a non-blocking socket (an event loop's): [seconds until connect()
    returned, what happened]."""
    started = time.monotonic()
    with socket.socket() as s:
        s.setblocking(False)
        code = s.connect_ex((host, port))
        returned = round(time.monotonic() - started, 1)
        if code not in (0, errno.EINPROGRESS):
            return [returned, errno.errorcode.get(code, str(code))]
        s.settimeout(20)
        try:
            s.sendall(b"hello")
            return [returned, f"read {s.recv(100)!r}"]
        except OSError as e:
            return [returned, errno.errorcode.get(e.errno or 0, type(e).__name__)]


def half_close(host: str) -> str:
    with socket.create_connection((host, 7000), timeout=30) as s:
        s.sendall(b"x" * (1 << 20))
        s.shutdown(socket.SHUT_WR)
        return s.makefile("rb").readline().decode().strip()


def loop(host: str, count: int) -> int:
    ok = 0
    deadline = time.monotonic() + 90
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        if "payment-service" in http_get(host, 8080):
            ok += 1
    return ok


def bulk(host: str, size: int) -> dict[str, object]:
    started = time.monotonic()
    with socket.create_connection((host, 7000), timeout=120) as s:
        block = bytes(range(256)) * 256
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            s.sendall(piece)
            sent += len(piece)
        s.shutdown(socket.SHUT_WR)
        up = s.makefile("rb").readline().decode().strip()
    up_s = time.monotonic() - started
    started = time.monotonic()
    digest, got = hashlib.sha256(), 0
    with socket.create_connection((host, 7001), timeout=120) as s:
        s.sendall(f"{size}\n".encode())
        while chunk := s.recv(1 << 16):
            digest.update(chunk)
            got += len(chunk)
    return {
        "up": up,
        "up_s": up_s,
        "down_bytes": got,
        "down_sha": digest.hexdigest(),
        "down_s": time.monotonic() - started,
    }


def udp(host: str, ports: list[int], connected: bool = False, timeout: float = 10) -> list[object]:
    """Datagrams from one socket to each port, and what came back from where."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    answers: list[object] = []
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for port in ports:
            if connected:
                s.connect((host, port))
                s.send(b"hello %d" % port)
            else:
                s.sendto(b"hello %d" % port, (host, port))
        for _ in ports:
            data, sender = s.recvfrom(2048)
            answers.append([data.decode(), sender[0], sender[1]])
    return sorted(answers, key=str)


def resolve6(name: str) -> list[str] | str:
    try:
        return sorted({i[4][0] for i in socket.getaddrinfo(name, 80, socket.AF_INET6)})
    except socket.gaierror as e:
        return f"gaierror {e.errno}"


def main() -> None:
    port, service_ip, hardcoded, size, checks, local_port = sys.argv[1:7]
    service_ip6 = sys.argv[7] if len(sys.argv) > 7 else ""
    laptop_ip = sys.argv[8] if len(sys.argv) > 8 else ""
    server = ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    results: dict[str, object] = {}
    for check in checks.split(","):
        try:
            if check == "resolve":
                results[check] = {
                    n: resolve(n)
                    for n in (
                        "payment-service",
                        "payment-service.default",
                        "payment-service.default.svc.cluster.local",
                        "big",
                        "no-such-service",
                    )
                }
            elif check == "http":
                results[check] = http_get("payment-service", 8080)
            elif check == "dns_tcp":
                results[check] = dns_over_tcp()
            elif check == "hardcoded_dns":
                results[check] = hardcoded_dns(hardcoded)
            elif check == "local_name":
                results[check] = attempt(hardcoded_dns(hardcoded, b"app-db"), 5432)
            elif check == "local_port":
                results[check] = attempt("127.0.0.1", int(local_port))
            elif check == "refused":
                results[check] = attempt(service_ip, 9)
            elif check == "denied":
                results[check] = attempt("169.254.169.254", 80)
            elif check == "unreachable":  # no host has this address on the cluster's link
                results[check] = attempt(service_ip.rsplit(".", 1)[0] + ".250", 80)
            elif check == "timeout":  # the cluster drops SYNs to this port
                results[check] = attempt(service_ip, 81)
            elif check == "timeout_nonblocking":  # let go after 3 s, reset at the pod's 10
                results[check] = attempt_nonblocking(service_ip, 81)
            elif check == "refused_nonblocking":
                results[check] = attempt_nonblocking(service_ip, 9)
            elif check == "refused_twice":  # a refusal is not cached as reachable
                results[check] = [attempt(service_ip, 9), attempt(service_ip, 9)]
            elif check == "half_close":
                results[check] = half_close(service_ip)
            elif check == "loop":
                results[check] = loop(service_ip, 1000)
            elif check == "bulk":
                results[check] = bulk(service_ip, int(size))
            elif check == "udp":  # one unconnected socket, two destinations
                results[check] = udp(service_ip, [7002, 7003])
            elif check == "udp_denied":  # the sidecar's policy: dropped, as UDP is
                try:
                    results[check] = udp("169.254.169.254", [123], timeout=2)
                except TimeoutError:
                    results[check] = "no answer"
            elif check == "udp_local":  # a --local udp:// destination: from the laptop
                results[check] = udp(laptop_ip, [int(local_port)])
            elif check == "udp_connected":
                results[check] = udp(service_ip, [7002], connected=True)
            elif check == "ipv6_resolve":
                results[check] = [resolve("dual"), resolve6("dual"), resolve6("payment-service")]
            elif check == "ipv6_http":  # by address, and by the name's AAAA record
                named = resolve6("dual")
                results[check] = [
                    http_get(service_ip6, 8080),
                    http_get(named[0], 8080) if isinstance(named, list) else named,
                ]
            elif check == "ipv6_udp":
                results[check] = udp(service_ip6, [7002, 7003])
            elif check == "ipv6_refused":
                results[check] = attempt(service_ip6, 9)
            elif check == "ipv6_denied":  # a cloud metadata address, by the sidecar's policy
                results[check] = attempt("fd00:ec2::254", 80)
        except Exception as e:  # reported, not raised: the test reads every result
            results[check] = f"error {type(e).__name__}: {e}"
    print("RESULT " + json.dumps(results), flush=True)
    done.wait(120)


if __name__ == "__main__":
    main()
