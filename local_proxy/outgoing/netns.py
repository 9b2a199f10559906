"""Run the local process in a namespace of its own whose TCP and DNS come to offramp.

Linux only, and no root: an unprivileged user namespace with a network and a
mount namespace of its own (`unshare`), set up by a small helper process:

- `lo` up, 198.18.0.1/32 on it (else glibc's AI_ADDRCONFIG sends no DNS query)
  and a default route through it (else connect() fails with ENETUNREACH before
  netfilter sees the packet); where the kernel has IPv6, the same with
  2001:2::1/128 (RFC 5180's benchmarking range) and an IPv6 default route;
- an nft `nat output` chain per family: every UDP packet to port 53
  (hard-coded servers too) goes to a DNS socket, every TCP connection not to
  loopback to a listener, and loopback ones only to the ports the filter names;
  other UDP not to loopback goes to UDP sockets on UDP_PORTS (`udp`), where the
  kernel's connection tracking can be asked over ctnetlink (a netlink socket
  made inside and handed out too) where each flow was going; without ctnetlink
  UDP stays unrouted, as before, and `no_udp` says why;
- those sockets (on 127.0.0.1, and on ::1 for IPv6) are made inside and handed
  to offramp (SCM_RIGHTS), which accepts on them outside and reads each
  connection's destination with SO_ORIGINAL_DST (IP6T_SO_ORIGINAL_DST);
- /etc/resolv.conf is a bind mount with the pod's search list and ndots, so
  `payment-service` is looked up as it would be in the pod;
- the process runs in a nested user namespace that maps it back to your uid,
  so it sees itself as you (and cannot change the rules), under a seccomp
  filter that hands its connect() calls to offramp first (`connects`), so a
  connection the pod cannot make fails with the errno a direct one would.

The helper also makes sockets inside on request (`make_socket`), marked so the
rules let them through: offramp connects them to the process's own
127.0.0.1:PORT to hand it stolen requests, which is otherwise unreachable from
outside.

The helper is forked before any thread or event loop exists (`prepare`); the
process starts only when offramp says so (`run`), once the session is up.

Errors::

    NamespaceError       the namespace cannot be made; the message says which setting forbids it
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from local_proxy.outgoing.connects import (
    HOLD_NONBLOCKING,
    Call,
    KnownGood,
    ask,
    install_filter,
    parse_message,
    receive,
    respond,
    valid,
)

__all__ = ["MARK", "Namespace", "NamespaceError", "original_destination", "prepare"]

RELAY_PORT = 15001
"""The listener's port inside the namespace (the namespace is ours: any port is free)."""
UDP_PORTS = (15010, 15017)
"""The UDP sockets' ports (first, last): a socket of the process that sends to
several destinations at once has its flows spread over them."""
DNS_ADDRESS = "127.0.0.1"
NAMESERVER = "198.18.0.53"
"""What the process's resolv.conf names; any address would do, as all of UDP/53 is redirected."""
MARK = 0x4F46
"""Sockets offramp makes inside carry this mark; the rules leave them alone."""
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
"""The same option number, at the IPv6 level."""
_MS_REC, _MS_PRIVATE, _MS_BIND = 0x4000, 1 << 18, 0x1000
_PR_SET_PDEATHSIG = 1


class NamespaceError(Exception):
    """The namespace cannot be made here; the message says why and what to change."""


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        package = {"nft": "nftables", "ip": "iproute2"}[name]
        raise NamespaceError(f"{name} is not installed (install the {package} package)")
    return found


def why_forbidden(error: OSError | None = None) -> str:
    """Which setting keeps this machine from making an unprivileged user namespace."""
    checks = [
        ("/proc/sys/user/max_user_namespaces", "0", "user.max_user_namespaces is 0"),
        ("/proc/sys/kernel/unprivileged_userns_clone", "0",
         "kernel.unprivileged_userns_clone is 0 (sysctl -w kernel.unprivileged_userns_clone=1)"),
        ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
         "AppArmor restricts unprivileged user namespaces "
         "(kernel.apparmor_restrict_unprivileged_userns=1)"),
    ]  # fmt: skip
    for path, bad, what in checks:
        with contextlib.suppress(OSError):
            if Path(path).read_text().strip() == bad:
                return what
    return f"unshare failed: {error.strerror if error else 'unknown reason'}"


@dataclass
class Namespace:
    pid: int
    control: socket.socket
    listeners: tuple[socket.socket, ...]
    """Where the process's TCP connections arrive: IPv4's, and IPv6's if it has it."""
    dns: tuple[socket.socket, ...]
    """Where its DNS queries arrive, the same way."""
    udp: tuple[socket.socket, ...]
    """Where its other UDP arrives (empty without ctnetlink: see `no_udp`)."""
    ctnetlink: socket.socket | None
    """Asks the namespace's connection tracking where a UDP flow was going."""
    decisions: socket.socket
    """Where the helper asks offramp about the process's connect() calls (`connects`)."""
    no_udp: str = ""
    """Why UDP other than DNS is not carried, if it is not."""
    supervised: bool = False
    """Whether the process's connect() calls are held (once it runs; where the kernel
    offers no seccomp user notification, `no_connects` says why not)."""
    no_connects: str = ""

    def make_socket(self, family: int = socket.AF_INET) -> socket.socket:
        """A new TCP socket inside the namespace (not connected)."""
        self.control.send(b"s6" if family == socket.AF_INET6 else b"s4")
        _, fds, _, _ = socket.recv_fds(self.control, 16, 1)
        if not fds:
            raise OSError("the namespace helper has gone")
        return socket.socket(fileno=fds[0])

    def run(
        self, command: list[str], resolv_conf: str | None, env: dict[str, str] | None = None
    ) -> None:
        """Start `command` inside (its resolv.conf the given text, or the laptop's;
        its environment `env`, or offramp's as it was when the helper was made)."""
        message = {"command": command, "resolv": resolv_conf, "cwd": os.getcwd(), "env": env}
        try:
            self.control.send(b"r" + json.dumps(message).encode())
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                raise NamespaceError(
                    f"the command and its environment are too large to hand over ({e})"
                ) from e
            raise
        answer = self.control.recv(4096)
        if not answer.startswith(b"ok"):
            raise NamespaceError(answer.decode(errors="replace").removeprefix("error: "))
        self.supervised = answer == b"ok"
        self.no_connects = answer[3:].decode(errors="replace")

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def close(self) -> None:
        for s in (self.control, *self.listeners, *self.dns, *self.udp, self.decisions):
            s.close()
        if self.ctnetlink is not None:
            self.ctnetlink.close()


def prepare(loopback_ports: tuple[int, ...] = ()) -> Namespace:
    """Fork the helper and make the namespace. Call before any thread starts."""
    if sys.platform != "linux":
        raise NamespaceError(f"network namespaces are Linux's, and this is {sys.platform}")
    ip, nft = _tool("ip"), _tool("nft")
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    asked, asking = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    uid, gid = os.getuid(), os.getgid()
    pid = os.fork()
    if pid == 0:  # the helper
        parent.close()
        asked.close()
        code = 1
        try:
            code = _helper(child, asking, uid, gid, ip, nft, loopback_ports)
        except BaseException as e:
            with contextlib.suppress(OSError):
                child.send(f"error: {e}".encode())
        finally:
            os._exit(code)
    child.close()
    asking.close()
    message, fds, _, _ = socket.recv_fds(parent, 4096, 64)
    if not message.startswith(b"ok "):
        for fd in fds:
            os.close(fd)
        os.waitpid(pid, 0)
        asked.close()
        raise NamespaceError(message.decode(errors="replace").removeprefix("error: ") or
                             "the namespace helper ended without a word")  # fmt: skip
    said = json.loads(message[3:])
    socks: dict[str, list[socket.socket]] = {"tcp": [], "dns": [], "udp": [], "ctnetlink": []}
    for role, fd in zip(said["roles"], fds, strict=True):
        socks[role].append(socket.socket(fileno=fd))
    return Namespace(
        pid, parent, tuple(socks["tcp"]), tuple(socks["dns"]), tuple(socks["udp"]),
        socks["ctnetlink"][0] if socks["ctnetlink"] else None, asked, no_udp=said["no_udp"],
    )  # fmt: skip


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where an accepted (redirected) connection was going."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port, packed = struct.unpack_from("!2xH4x16s", raw)
        return socket.inet_ntop(socket.AF_INET6, packed), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


# --- the helper ----------------------------------------------------------------------


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _helper(
    control: socket.socket,
    decisions: socket.socket,
    uid: int,
    gid: int,
    ip: str,
    nft: str,
    loopback_ports: tuple[int, ...],
) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        os.unshare(os.CLONE_NEWUSER | os.CLONE_NEWNET | os.CLONE_NEWNS)
    except OSError as e:
        raise NamespaceError(why_forbidden(e)) from e
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")
    for args in (
        ["link", "set", "lo", "up"],
        ["addr", "add", "198.18.0.1/32", "dev", "lo"],
        ["route", "add", "default", "dev", "lo"],
    ):
        _run([ip, *args])
    ctnetlink, no_udp = _ctnetlink()
    udp = ctnetlink is not None
    socks = _listening(socket.AF_INET, "127.0.0.1", udp)
    rules = _rules("ip", "127.0.0.0/8", loopback_ports, udp)
    try:  # IPv6 where the kernel has it; without, the process gets IPv4 only, as before
        _run([ip, "-6", "addr", "add", "2001:2::1/128", "dev", "lo", "nodad"])
        _run([ip, "-6", "route", "add", "default", "dev", "lo"])
        socks += _listening(socket.AF_INET6, "::1", udp)
        rules += _rules("ip6", "::1", loopback_ports, udp)
    except (NamespaceError, OSError):
        pass
    _run([nft, "-f", "-"], rules)
    if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise NamespaceError(f"cannot make mounts private: {os.strerror(ctypes.get_errno())}")
    if ctnetlink is not None:
        socks.append(("ctnetlink", ctnetlink))
    said = json.dumps({"roles": [role for role, _ in socks], "no_udp": no_udp})
    socket.send_fds(control, [b"ok " + said.encode()], [s.fileno() for _, s in socks])
    for _, sock in socks:
        sock.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C reaches the process
    return _serve(control, decisions, libc, uid, gid)


def _rules(family: str, loopback: str, loopback_ports: tuple[int, ...], udp: bool) -> str:
    """One family's nat output chain (`ip` or `ip6`): DNS, TCP and UDP to offramp."""
    named = ""
    if loopback_ports:
        ports = ", ".join(map(str, loopback_ports))
        named = f"{family} daddr {loopback} tcp dport {{ {ports} }} redirect to :{RELAY_PORT}\n"
    other_udp = f"meta l4proto udp redirect to :{UDP_PORTS[0]}-{UDP_PORTS[1]}" if udp else ""
    return f"""
table {family} offramp {{
  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark {MARK} return
    udp dport 53 redirect to :53
    {named}{family} daddr {loopback} return
    meta l4proto tcp redirect to :{RELAY_PORT}
    {other_udp}
  }}
}}
"""


def _listening(family: int, address: str, udp: bool) -> list[tuple[str, socket.socket]]:
    """The relay's listener, the DNS socket and the UDP sockets for one address family."""

    def made(kind: int, port: int) -> socket.socket:
        sock = socket.socket(family, kind)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        return sock

    listener = made(socket.SOCK_STREAM, RELAY_PORT)
    listener.listen(1024)
    socks = [("tcp", listener), ("dns", made(socket.SOCK_DGRAM, 53))]
    if udp:
        first, last = UDP_PORTS
        socks += [("udp", made(socket.SOCK_DGRAM, port)) for port in range(first, last + 1)]
    return socks


def _ctnetlink() -> tuple[socket.socket | None, str]:
    """A ctnetlink socket in this namespace, if its connection tracking answers on it."""
    from local_proxy.outgoing.udp import conntrack_socket, original_destination

    try:
        sock = conntrack_socket()
    except OSError as e:
        return None, f"no ctnetlink socket: {e.strerror or e}"
    try:
        original_destination(sock, ("127.0.0.1", 1), ("127.0.0.1", 1))
    except FileNotFoundError:
        return sock, ""  # it answered: no such flow
    except OSError as e:
        sock.close()
        return None, f"connection tracking does not answer over ctnetlink: {e.strerror or e}"
    return sock, ""


def _run(cmd: list[str], stdin: str | None = None) -> None:
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NamespaceError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")


def _serve(
    control: socket.socket, decisions: socket.socket, libc: ctypes.CDLL, uid: int, gid: int
) -> int:
    """Until the process ends: make sockets inside for offramp, start the process,
    and hold its connect() calls (letting most go on at once, asking offramp about
    the rest: see `connects`)."""
    child = 0
    listener: int | None = None
    # offramp answers DNS over TCP to the resolv.conf's nameserver itself: no pod to ask.
    known = KnownGood(always=frozenset({(NAMESERVER, 53)}))
    # Held calls offramp is asked about: destination, and when a non-blocking one is
    # let go regardless (None: held until the answer, or already let go).
    pending: dict[int, tuple[tuple[str, int], float | None]] = {}
    resolv_dir: str | None = None

    def forward(signum: int, _frame: object) -> None:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)
        else:
            os._exit(128 + signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGHUP, forward)
    try:
        while True:
            if child:
                done, status = os.waitpid(child, os.WNOHANG)
                if done:
                    if os.WIFSIGNALED(status):  # end the same way, so offramp can tell
                        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
                        os.kill(os.getpid(), os.WTERMSIG(status))
                    return os.waitstatus_to_exitcode(status) % 256
            watched: list[int | socket.socket] = [control, decisions]
            if listener is not None:
                watched.append(listener)
            now = time.monotonic()
            deadlines = [at for _, at in pending.values() if at is not None]
            wait = max(0.0, min([0.1, *(at - now for at in deadlines)]))
            try:
                ready, _, _ = select.select(watched, [], [], wait)
            except InterruptedError:
                continue
            if listener is not None and deadlines:
                _release_overdue(listener, pending)
            if listener is not None and listener in ready:
                call = receive(listener, known)
                if call is False:  # the process (and all it started) has gone
                    os.close(listener)
                    listener = None
                elif isinstance(call, Call):
                    at = None if call.blocking else time.monotonic() + HOLD_NONBLOCKING
                    pending[call.notif_id] = ((call.host, call.port), at)
                    decisions.send(ask(call))
            if decisions in ready:
                data = decisions.recv(64)
                if not data:  # offramp has gone
                    return _abandoned(child)
                said = parse_message(data)
                if isinstance(said, tuple) and isinstance(said[0], int):
                    notif_id, code = said
                    held = pending.pop(notif_id, None)
                    if held is not None and code == 0:
                        known.add(held[0])
                    if held is not None and listener is not None and valid(listener, notif_id):
                        respond(listener, notif_id, code)
                elif isinstance(said, tuple):
                    known.discard((str(said[0]), said[1]))
            if control not in ready:
                continue
            # A message's whole size first: the one that starts the process carries
            # its environment, which may be large.
            size = control.recv_into(bytearray(1), 1, socket.MSG_PEEK | socket.MSG_TRUNC)
            message = control.recv(max(size, 1))
            if not message:  # offramp has gone
                return _abandoned(child)
            if message[:1] == b"s":
                family = socket.AF_INET6 if message == b"s6" else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
                socket.send_fds(control, [b"s"], [sock.fileno()])
                sock.close()
            elif message[:1] == b"r" and not child:
                request = json.loads(message[1:])
                try:
                    if request["resolv"] is not None:
                        resolv_dir = tempfile.mkdtemp(prefix="offramp-resolv-")
                        path = os.path.join(resolv_dir, "resolv.conf")
                        _write(path, request["resolv"])
                        target = os.path.realpath("/etc/resolv.conf")
                        if libc.mount(path.encode(), target.encode(), None, _MS_BIND, None) != 0:
                            raise OSError(ctypes.get_errno(), f"cannot bind-mount {target}")
                    child, listener, why = _start(
                        request["command"], request["cwd"], uid, gid, request.get("env")
                    )
                except OSError as e:
                    control.send(f"error: cannot start {request['command'][0]!r}: {e}".encode())
                    return 1
                control.send(b"ok" if listener is not None else b"ok " + why.encode())
    finally:
        if resolv_dir is not None:
            shutil.rmtree(resolv_dir, ignore_errors=True)


def _abandoned(child: int) -> int:
    """offramp has gone: end the process too (it would be cut off from everything)."""
    if child:
        os.kill(child, signal.SIGTERM)
        os.waitpid(child, 0)
    return 1


def _release_overdue(
    listener: int, pending: dict[int, tuple[tuple[str, int], float | None]]
) -> None:
    """Let non-blocking calls held past HOLD_NONBLOCKING go on; offramp's answer,
    when it comes, then only tells whether the destination was reached."""
    now = time.monotonic()
    for notif_id, (key, at) in list(pending.items()):
        if at is not None and at <= now:
            if valid(listener, notif_id):
                respond(listener, notif_id, 0)
            del pending[notif_id]
            pending[notif_id] = (key, None)


def _start(
    command: list[str], cwd: str, uid: int, gid: int, env: dict[str, str] | None
) -> tuple[int, int | None, str]:
    """Fork the process; it maps itself back to the user's uid in a nested user
    namespace, puts its connect() calls under the seccomp listener it hands back
    (else why not), then runs `command`. Errors before exec reach the helper as
    OSError."""
    read, write = os.pipe()
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        os.close(read)
        mine.close()
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            os.unshare(os.CLONE_NEWUSER)
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"{uid} 0 1")
            _write("/proc/self/gid_map", f"{gid} 0 1")
            os.chdir(cwd)
            try:
                connects = install_filter()
            except OSError as e:
                theirs.send(f"no {e.strerror or e}".encode())
            else:
                socket.send_fds(theirs, [b"fd"], [connects])
                os.close(connects)
            theirs.close()
            os.set_inheritable(write, False)
            if env is None:
                os.execvp(command[0], command)
            os.execvpe(command[0], command, env)
        except OSError as e:
            os.write(write, f"{e.errno}:{e.strerror}".encode())
        finally:
            os._exit(127)
    os.close(write)
    theirs.close()
    with mine:
        mine.settimeout(10)
        try:
            note, fds, _, _ = socket.recv_fds(mine, 1024, 1)
        except OSError:
            note, fds = b"", []
    with os.fdopen(read, "rb") as pipe:
        failure = pipe.read()
    if failure:
        os.waitpid(pid, 0)
        for fd in fds:
            os.close(fd)
        errno_text, _, text = failure.decode().partition(":")
        raise OSError(int(errno_text), text)
    if fds:
        return pid, fds[0], ""
    return pid, None, note.decode(errors="replace").removeprefix("no ") or "unknown"
