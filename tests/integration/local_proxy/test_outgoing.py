"""Outgoing traffic and DNS through the pod, with the laptop side as an unprivileged user.

    laptop (root netns) ── veth ── pod ns ── veth ── cluster ns
      offramp steal ... -- CMD      the real    kube-dns,
      as nobody; CMD in offramp's   sidecar     payment-service
      user+net+mount namespace

The pod's resolv.conf is the cluster's (`ip netns exec` mounts /etc/netns/POD/resolv.conf
over /etc/resolv.conf for the sidecar): search list default.svc.cluster.local ..., ndots:5.
Only addresses of the namespaces made here are used.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.netns import Netns, add_netns, remove_netns, require_netns, sh
from tests.support import free_ports

REPO = Path(__file__).resolve().parents[3]
NOBODY = 65534
BULK = 256 * 1024 * 1024
CMD_PORT = 9999


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True  # a port of the test before may still be in TIME_WAIT
    daemon_threads = True


def banner_server(host: str, port: int, text: str) -> Server:
    """Answers each connection's first bytes with `text` ({peer} is the caller's
    address); serves in a thread until shut down."""

    class Banner(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(100)
            self.request.sendall(text.format(peer=self.client_address[0]).encode())

    server = Server((host, port), Banner)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class Bed:
    pod: Netns
    cluster: Netns
    pod_ip: str  # as the laptop reaches it
    pod_cluster_ip: str  # as the cluster sees it
    laptop_ip: str  # the laptop's end of the veth to the pod
    dns_ip: str
    service_ip: str
    hardcoded_dns: str
    token_file: Path
    sidecar_log: Path
    tmp: Path
    service_ip6: str = ""
    pod_cluster_ip6: str = ""

    @property
    def sidecar_url(self) -> str:
        return f"ws://{self.pod_ip}:15081"


def _unreachable_ancestors(paths: list[Path]) -> list[Path]:
    """Directories on the way to `paths` that others may not traverse (/root, say)."""
    found: list[Path] = []
    for path in paths:
        for parent in reversed(path.resolve().parents):
            if parent != Path("/") and not parent.stat().st_mode & 0o001 and parent not in found:
                found.append(parent)
    return found


def as_nobody(cmd: list[str], hosts: Path | None = None) -> list[str]:
    """`cmd` as an unprivileged user, in a private mount namespace. Where offramp's
    interpreter or this checkout sit under a directory others may not enter (pyenv
    under /root), it re-exposes that directory's entries, each with its own modes.
    `hosts`, if given, is the laptop's /etc/hosts there."""
    hidden = _unreachable_ancestors([REPO, Path(sys.base_prefix), Path(sys.executable)])
    script = "set -e\n"
    if hosts is not None:
        script += f"mount --bind {hosts} /etc/hosts\n"
    for i, directory in enumerate(hidden):
        keep = f"/tmp/ofr-keep-{os.getpid()}-{i}"
        script += (
            f"mkdir -p {keep}; mount --bind {directory} {keep}\n"
            f"mount -t tmpfs -o mode=755 tmpfs {directory}\n"
            f'for e in {keep}/* {keep}/.[!.]*; do [ -e "$e" ] || continue; '
            f'n={directory}/$(basename "$e"); if [ -d "$e" ]; then mkdir -p "$n"; '
            f'else touch "$n"; fi; mount --bind "$e" "$n"; done\n'
        )
    script += f'exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups -- "$@"\n'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *cmd]


def _nobody_env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "CI")}
    return keep | {"HOME": "/tmp", "USER": "nobody", "LOGNAME": "nobody",
                   "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    require_netns()
    for tool in ("unshare", "setpriv", "nft", "curl"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            pytest.fail(f"{tool} is missing (.ci/run installs it)")
    # Not under pytest's own temporary directory: that one only root may enter.
    tmp = Path(tempfile.mkdtemp(prefix="offramp-outgoing-"))
    tmp.chmod(0o755)
    tag = secrets.token_hex(3)
    net = int(tag[:2], 16) % 250 + 1
    pod, cluster = Netns(f"ofr-opod-{tag}"), Netns(f"ofr-oclu-{tag}")
    created: list[Netns] = []
    procs: list[subprocess.Popen[bytes]] = []
    etc = Path(f"/etc/netns/{pod.name}")
    try:
        for ns in (pod, cluster):
            add_netns(ns, created)
        sh("ip", "link", "add", f"oop{tag}", "netns", pod.name, "type", "veth",
           "peer", "name", f"ooc{tag}", "netns", cluster.name)  # fmt: skip
        sh("ip", "link", "add", f"ooh{tag}", "type", "veth", "peer", "name", f"ool{tag}",
           "netns", pod.name)  # fmt: skip
        pod_cluster_ip, pod_ip = f"10.214.{net}.2", f"10.215.{net}.2"
        dns_ip, service_ip = f"10.214.{net}.53", f"10.214.{net}.100"
        pod.sh("ip", "addr", "add", f"{pod_cluster_ip}/24", "dev", f"oop{tag}")
        pod.sh("ip", "link", "set", f"oop{tag}", "up")
        pod.sh("ip", "addr", "add", f"{pod_ip}/24", "dev", f"ool{tag}")
        pod.sh("ip", "link", "set", f"ool{tag}", "up")
        sh("ip", "addr", "add", f"10.215.{net}.1/24", "dev", f"ooh{tag}")
        sh("ip", "link", "set", f"ooh{tag}", "up")
        for address in (f"10.214.{net}.1", dns_ip, service_ip):
            cluster.sh("ip", "addr", "add", f"{address}/24", "dev", f"ooc{tag}")
        cluster.sh("ip", "link", "set", f"ooc{tag}", "up")
        # IPv6 on the pod's link to the cluster too (a dual-stack cluster), no DAD wait.
        pod_cluster_ip6, service_ip6 = f"fd0f:{net:x}::2", f"fd0f:{net:x}::100"
        pod.sh("ip", "-6", "addr", "add", f"{pod_cluster_ip6}/64", "dev", f"oop{tag}", "nodad")
        for address in (f"fd0f:{net:x}::1", service_ip6):
            cluster.sh("ip", "-6", "addr", "add", f"{address}/64", "dev", f"ooc{tag}", "nodad")
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(
            f"nameserver {dns_ip}\n"
            "search default.svc.cluster.local svc.cluster.local cluster.local\n"
            "options ndots:5\n"
        )
        token_file = tmp / "token"
        token_file.write_text(secrets.token_hex(32))
        os.chown(token_file, NOBODY, NOBODY)
        token_file.chmod(0o600)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        services = subprocess.Popen(
            cluster.cmd(sys.executable, "-m", "tests.outgoing_cluster", dns_ip, service_ip,
                        service_ip6),
            cwd=REPO, stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        procs.append(services)
        assert services.stdout is not None and services.stdout.readline().strip() == b"ready"
        sidecar_log = tmp / "sidecar.log"
        with sidecar_log.open("wb") as log:
            procs.append(subprocess.Popen(
                pod.cmd(sys.executable, "-m", "sidecar", "--app-port=8080", "--listen-port=15080",
                        "--control-port=15081", f"--token-file={token_file}", "--capture=none"),
                stdout=log, stderr=subprocess.STDOUT, env=env,
            ))  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://{pod_ip}:15081/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, sidecar_log.read_text()
            time.sleep(0.1)
        yield Bed(pod, cluster, pod_ip, pod_cluster_ip, f"10.215.{net}.1", dns_ip, service_ip,
                  f"10.214.{net}.200", token_file, sidecar_log, tmp, service_ip6,
                  pod_cluster_ip6)  # fmt: skip
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for ns in created:
            remove_netns(ns)
        shutil.rmtree(etc, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def result(self) -> dict[str, object]:
        for line in self.out.splitlines():
            if line.startswith("RESULT "):
                return dict(json.loads(line[7:]))
        raise AssertionError(f"no RESULT line\nstdout:\n{self.out}\nstderr:\n{self.err}")


def steal(bed: Bed, flags: list[str], cmd: list[str], *, prefix: list[str] | None = None,
          steal_after: bool = True, timeout: float = 60,
          hosts: Path | None = None) -> Run:  # fmt: skip
    """Run `offramp steal` as nobody with CMD; once CMD printed its RESULT, send it one
    stolen request (`/done`) from the cluster, which also ends it."""
    argv = [
        str(Path(sys.executable).parent / "offramp"), "steal", "--sidecar-url", bed.sidecar_url,
        "--token-file", str(bed.token_file), "--to", str(CMD_PORT), "--header", "^x-dev: me$",
        *flags, "--", *cmd,
    ]  # fmt: skip
    proc = subprocess.Popen(as_nobody([*(prefix or []), *argv], hosts), cwd=bed.tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_nobody_env())  # fmt: skip
    out: list[str] = []
    seen_result = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if line.startswith("RESULT "):
                seen_result.set()

    reader = threading.Thread(target=read, daemon=True)  # stdout is read as it comes
    reader.start()
    try:
        if steal_after:
            deadline = time.monotonic() + timeout
            while not seen_result.wait(0.2) and proc.poll() is None:
                if time.monotonic() > deadline:
                    break
            if not seen_result.is_set():
                proc.kill()
                assert proc.stderr is not None
                raise AssertionError("no RESULT from CMD\n" + "".join(out) + proc.stderr.read())
            # Once CMD has reported, the stealing session opens: ask for /done until
            # the local process answers it.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                answer = bed.cluster.sh(
                    "curl", "-s", "-m", "5", "-H", "x-dev: me",
                    f"http://{bed.pod_cluster_ip}:15080/done",
                )  # fmt: skip
                if "the local process saw /done" in answer:
                    break
                time.sleep(0.2)
            else:
                raise AssertionError("the stolen request never reached CMD\n" + "".join(out))
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
    assert proc.stderr is not None and proc.stdout is not None
    err = proc.stderr.read()
    proc.stderr.close()
    proc.stdout.close()
    return Run(proc.returncode, "".join(out), err)


def cmd(bed: Bed, checks: str, size: int = 0, port: int = 0) -> list[str]:
    return ["/usr/bin/python3", str(REPO / "tests" / "outgoing_cmd.py"), str(CMD_PORT),
            bed.service_ip, bed.hardcoded_dns, str(size), checks, str(port),
            bed.service_ip6, bed.laptop_ip]  # fmt: skip


def test_cmd_resolves_and_connects_through_the_pod(bed: Bed) -> None:
    """Short name, name.namespace and FQDN resolve with the pod's search list; an
    unknown name is NXDOMAIN; a truncated answer is retried over TCP; a query sent
    straight to a hard-coded server, or over TCP, is answered by the pod's resolver; the
    service sees the connection come from the pod; a stolen request reaches CMD
    inside its namespace; CMD runs as the unprivileged user."""
    run = steal(bed, [], cmd(bed, "resolve,http,hardcoded_dns,dns_tcp"))
    assert run.code == 0, run.err + run.out
    result = run.result
    names = result["resolve"]
    assert isinstance(names, dict)
    for name in ("payment-service", "payment-service.default",
                 "payment-service.default.svc.cluster.local", "big"):  # fmt: skip
        assert names[name] == [bed.service_ip], (name, result)
    assert str(names["no-such-service"]).startswith("gaierror"), result
    assert result["http"] == f"payment-service; you are {bed.pod_cluster_ip}\n", result
    assert result["hardcoded_dns"] == bed.service_ip, result
    assert result["dns_tcp"] == bed.service_ip, result  # DNS over TCP to resolv.conf's server
    assert "outgoing: 1 connection(s) through the pod" in run.out, run.out


def test_udp_leaves_from_the_pod(bed: Bed) -> None:
    """UDP other than DNS: each flow through the pod, the answers back from the
    address the process sent to, one socket to two destinations at once, and a
    connected socket."""
    run = steal(bed, [], cmd(bed, "udp,udp_connected,udp_denied"))
    assert run.code == 0, run.err + run.out
    result = run.result
    you = f"you are {bed.pod_cluster_ip}"
    assert result["udp"] == [
        [f"udp 7002: {you}: hello 7002", bed.service_ip, 7002],
        [f"udp 7003: {you}: hello 7003", bed.service_ip, 7003],
    ], result
    assert result["udp_connected"] == [[f"udp 7002: {you}: hello 7002", bed.service_ip, 7002]]
    assert result["udp_denied"] == "no answer", result
    # The metadata flow failed: its one datagram is counted as dropped.
    udp = "UDP: 3 flow(s) through the pod, 0 from here, 1 failed, 1 datagram(s) dropped"
    assert udp in run.out, run.out
    log = bed.sidecar_log.read_text()
    assert f"udp to {bed.service_ip}:7003 ({bed.service_ip}:7003): 1 datagrams out" in log, log
    assert "udp to 169.254.169.254:123 refused: " in log, log


def test_a_local_udp_destination_is_reached_from_the_laptop(bed: Bed) -> None:
    """--local udp://ADDRESS:PORT: that flow leaves from this machine (offramp's own
    socket), and its answers reach CMD from the address it sent to."""
    (port,) = free_ports(1)
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind((bed.laptop_ip, port))
    echo.settimeout(30)

    def serve() -> None:
        with contextlib.suppress(OSError):
            data, peer = echo.recvfrom(2048)
            echo.sendto(b"laptop saw " + data + f" from {peer[0]}".encode(), peer)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        flags = ["--local", f"udp://{bed.laptop_ip}:{port}"]
        run = steal(bed, flags, cmd(bed, "udp_local", port=port))
    finally:
        echo.close()
        server.join(5)
    assert run.code == 0, run.err + run.out
    # offramp's socket on the laptop sent it: the laptop's own address.
    reply = f"laptop saw hello {port} from {bed.laptop_ip}"
    assert run.result["udp_local"] == [[reply, bed.laptop_ip, port]], run.result
    assert "UDP: 0 flow(s) through the pod, 1 from here" in run.out, run.out


def test_ipv6_destinations_leave_from_the_pod_too(bed: Bed) -> None:
    """A dual-stack cluster: the pod's resolver gives a name's A and AAAA records (and
    no AAAA where it has none); CMD's connections to IPv6 addresses, literal or from
    the AAAA answer, leave from the pod's IPv6 address; a refusal is ECONNREFUSED and
    a metadata address EPERM, as for IPv4; UDP to IPv6 goes through the pod too."""
    checks = "ipv6_resolve,ipv6_http,ipv6_refused,ipv6_denied,ipv6_udp,http"
    run = steal(bed, [], cmd(bed, checks))
    assert run.code == 0, run.err + run.out
    result = run.result
    assert result["ipv6_resolve"] == [[bed.service_ip], [bed.service_ip6], "gaierror -5"], result
    you = f"payment-service; you are {bed.pod_cluster_ip6}\n"
    assert result["ipv6_http"] == [you, you], result
    assert result["ipv6_refused"] == "ECONNREFUSED", result
    assert result["ipv6_denied"] == "EPERM", result
    assert result["ipv6_udp"] == [
        [f"udp {port}: you are {bed.pod_cluster_ip6}: hello {port}", bed.service_ip6, port]
        for port in (7002, 7003)
    ], result
    assert result["http"] == f"payment-service; you are {bed.pod_cluster_ip}\n", result
    log = bed.sidecar_log.read_text()
    assert f"([{bed.service_ip6}]:8080)" in log, log


def test_connect_errors_are_the_ones_a_direct_connect_gives(bed: Bed) -> None:
    """CMD's connect() waits while the pod tries, then fails as a direct connect would:
    refused -> ECONNREFUSED, a metadata address refused by the sidecar's policy ->
    EPERM, no route on the cluster's link -> ENETUNREACH/EHOSTUNREACH, a destination
    that drops SYNs -> ETIMEDOUT after the pod's 10 s (a blocking socket); a
    half-closed connection still gets its answer."""
    bed.cluster.sh("iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "81", "-j", "DROP")
    try:
        checks = ("refused_twice,denied,unreachable,timeout,half_close,refused_nonblocking,"
                  "timeout_nonblocking")  # fmt: skip
        run = steal(bed, [], cmd(bed, checks), timeout=90)
    finally:
        bed.cluster.sh("iptables-nft", "-D", "INPUT", "-p", "tcp", "--dport", "81", "-j", "DROP")
    result = run.result
    assert result["refused_twice"] == ["ECONNREFUSED", "ECONNREFUSED"], result
    assert result["denied"] == "EPERM", result
    assert result["unreachable"] in ("EHOSTUNREACH", "ENETUNREACH"), result
    assert result["timeout"] == "ETIMEDOUT", result
    assert result["half_close"].startswith("got 1048576 bytes"), result  # type: ignore[union-attr]
    # An event loop's socket: refused at once as well; one the pod cannot reach is let
    # go after at most 3 s (the loop must not freeze) and reset when the pod gives up.
    assert result["refused_nonblocking"][1] == "ECONNREFUSED", result  # type: ignore[index]
    returned, outcome = result["timeout_nonblocking"]  # type: ignore[misc]
    assert 2.5 <= returned <= 6 and outcome == "ECONNRESET", result
    log = bed.sidecar_log.read_text()
    assert "169.254.169.254:80 is a link-local (cloud metadata) address" in log, log
    assert f"{bed.service_ip}:9 refused" in log, log


def test_local_port_reaches_the_laptops_loopback(bed: Bed) -> None:
    """--local :PORT: CMD's 127.0.0.1:PORT is the laptop's. With nothing listening
    there, CMD's connection is reset (a loopback connect() is not held for an
    answer, see local_proxy.outgoing.connects) rather than left hanging."""
    port, closed = free_ports(2)
    with banner_server("127.0.0.1", port, "laptop-{peer}") as server:
        run = steal(bed, ["--local", f":{port}"], cmd(bed, "local_port,http", port=port))
        server.shutdown()
    assert run.result["local_port"] == "read b'laptop-127.0.0.1'", run.result
    assert "payment-service; you are" in str(run.result["http"])
    run = steal(bed, ["--local", f":{closed}"], cmd(bed, "local_port", port=closed))
    assert run.result["local_port"] == "ECONNRESET", run.result


def test_a_local_name_resolves_and_connects_on_the_laptop(bed: Bed) -> None:
    """The seed blog's case, `--local app-db`: app-db is asked of DNS, answered by the
    laptop's resolver (its /etc/hosts here), and the connection to that address
    leaves from the laptop (the server sees the laptop's address, not the pod's),
    while payment-service still goes through the pod."""
    hosts = bed.tmp / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{bed.laptop_ip} app-db\n")
    hosts.chmod(0o644)
    with banner_server(bed.laptop_ip, 5432, "app-db sees {peer}") as server:
        run = steal(bed, ["--local", "app-db"], cmd(bed, "local_name,http"), hosts=hosts)
        server.shutdown()
    assert run.result["local_name"] == f"read b'app-db sees {bed.laptop_ip}'", run.result
    assert run.result["http"] == f"payment-service; you are {bed.pod_cluster_ip}\n"
    assert "outgoing: 1 connection(s) through the pod, 1 from here" in run.out, run.out


def test_a_statically_linked_client(bed: Bed) -> None:
    """busybox (static: no preload could reach it) resolves and connects through the pod."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.fail("busybox-static is missing (.ci/run installs it)")
    run = steal(bed, [], ["sh", "-c", f"{busybox} wget -q -O - http://payment-service:8080/; "
                          "echo RESULT '{}'"], steal_after=False)  # fmt: skip
    assert f"payment-service; you are {bed.pod_cluster_ip}" in run.out, run.out + run.err


def test_the_seed_blogs_config_file_does_what_it_says(bed: Bed) -> None:
    """outgoing-filter-blog.md's second config (typographic quotes, a "target" that
    --sidecar-url overrides, {"local": [":8888"]}) loaded with -f: 127.0.0.1:8888 is
    the laptop's."""
    config = bed.tmp / "config.json"
    config.write_text(
        '{\n  "target": \u201cpod/uwu-app\u201d,\n  "feature": {\n    "network": {\n'
        '      "incoming": "steal",\n'
        '      "outgoing": { "filter": { "local": [":8888"] } }\n    }\n  }\n}\n'
    )
    config.chmod(0o644)
    with banner_server("127.0.0.1", 8888, "laptop-8888") as server:
        run = steal(bed, ["-f", str(config)], cmd(bed, "local_port,http", port=8888))
        server.shutdown()
    assert run.result["local_port"] == "read b'laptop-8888'", run.result
    assert "ignoring target (pod/uwu-app): the command line gives --sidecar-url" in run.err
    assert ":2:13: read typographic quotes as plain double quotes" in run.err, run.err


@pytest.mark.timeout(400)
def test_a_thousand_connections_and_256_mib_each_way(bed: Bed) -> None:
    run = steal(bed, [], cmd(bed, "loop,bulk", BULK), timeout=300)
    result = run.result
    assert result["loop"] == 1000, result
    bulk = result["bulk"]
    assert isinstance(bulk, dict)
    from tests.support import pattern_sha256

    assert bulk["up"].startswith(f"got {BULK} bytes"), bulk
    assert bulk["down_bytes"] == BULK and bulk["down_sha"] == pattern_sha256(BULK), bulk
    print(f"256 MiB up in {bulk['up_s']:.2f} s, down in {bulk['down_s']:.2f} s; {run.out}")


def test_curl_as_the_local_process(bed: Bed) -> None:
    """A program that is not Python: curl resolves and connects through the pod."""
    run = steal(bed, [], ["sh", "-c", "curl -s -m 20 http://payment-service:8080/; "
                          "echo RESULT '{}'"], steal_after=False)  # fmt: skip
    assert f"payment-service; you are {bed.pod_cluster_ip}" in run.out, run.out + run.err


def test_proxy_variables_where_user_namespaces_are_forbidden(bed: Bed) -> None:
    """With user namespaces off (user.max_user_namespaces=0 in a child user
    namespace), offramp says which setting forbids them and runs CMD with the
    proxy variables; curl honours them."""
    forbid = ["unshare", "-Ur", "sh", "-c",
              'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh"]  # fmt: skip
    run = steal(bed, [], ["sh", "-c", "curl -s -m 20 http://payment-service:8080/; "
                          "echo RESULT '{}'"], prefix=forbid, steal_after=False)  # fmt: skip
    assert "user.max_user_namespaces is 0" in run.err, run.err
    assert "ALL_PROXY" in run.err
    assert f"payment-service; you are {bed.pod_cluster_ip}" in run.out, run.out + run.err


def test_offramp_proxy_serves_socks5_and_http_through_the_pod(bed: Bed) -> None:
    """`offramp proxy`: SOCKS5 with names resolved in the pod, HTTP CONNECT and plain
    http:// requests; each failure in its protocol's terms."""
    port = 18000 + secrets.randbelow(1000)
    argv = [str(Path(sys.executable).parent / "offramp"), "proxy", "--sidecar-url",
            bed.sidecar_url, "--token-file", str(bed.token_file),
            "--listen", str(port)]  # fmt: skip
    proc = subprocess.Popen(as_nobody(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_nobody_env())  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("export ALL_PROXY="):
                break
        assert f"export ALL_PROXY=socks5h://127.0.0.1:{port}\n" in lines, lines

        def curl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["curl", "-sS", "-m", "20", *args], capture_output=True,
                                  text=True, timeout=30)  # fmt: skip

        you = f"payment-service; you are {bed.pod_cluster_ip}\n"
        socks = f"socks5h://127.0.0.1:{port}"
        http = f"http://127.0.0.1:{port}"
        assert curl("-x", socks, "http://payment-service:8080/").stdout == you
        assert curl("-x", http, "http://payment-service.default:8080/").stdout == you
        assert curl("-p", "-x", http, "http://payment-service:8080/").stdout == you  # CONNECT
        nxdomain = curl("-x", socks, "http://no-such-service:8080/")
        # curl prints the SOCKS5 reply code: 4 host unreachable, 2 not allowed by ruleset.
        assert "no-such-service. (4)" in nxdomain.stderr, nxdomain
        denied = curl("-x", socks, "http://169.254.169.254/")
        assert "169.254.169.254. (2)" in denied.stderr, denied
        refused = curl("-p", "-x", http, f"http://{bed.service_ip}:9/")
        assert "502" in refused.stderr, refused
    finally:
        proc.send_signal(2)
        proc.wait(20)
        if proc.stdout is not None:
            lines += proc.stdout.readlines()
            proc.stdout.close()
    assert any("outgoing: 3 connection(s) through the pod" in line for line in lines), lines
