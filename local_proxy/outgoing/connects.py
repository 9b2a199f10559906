"""The local process's connect() calls, held until offramp knows how they end.

In the namespace every outgoing TCP connection is redirected to offramp's
listener, which the kernel completes at once; so by itself a connection the pod
cannot make could only be reset after it seemed to succeed. To give the process
the error a direct connect would give, it runs under a seccomp filter whose
`connect` calls come here first (seccomp user notification, Linux >= 5.5; no
privilege: the process sets no_new_privs, so setuid programs it starts lose
their setuid):

- the namespace's helper (`netns`) receives each call: one that is not TCP
  over IPv4 or IPv6, or goes to loopback, or to a destination reached in the last 30 s
  (`KnownGood`), continues at once;
- it asks offramp about the others (`ConnectDecider`), which opens the way
  first: once it is open the call continues (and is redirected to the
  listener, which finds the way ready); if the pod or the laptop says no, the
  call fails with the matching errno: ECONNREFUSED, ENETUNREACH, ETIMEDOUT,
  EPERM (denied by policy) or EHOSTUNREACH (a name the pod cannot resolve).

Only the calling thread waits: about 0.1 ms when the helper lets it go on, a
round trip to the pod when offramp decides. A blocking socket's call waits for
the answer (up to the pod's 10 s connect timeout), as a direct connect would; a
non-blocking socket's (an event loop's: Node, asyncio, curl) at most
HOLD_NONBLOCKING seconds, so a dead destination cannot freeze the loop for
long: past that the call goes on, and if the pod then fails, the connection is
reset (ECONNRESET). The helper decides in its own process so that
offramp's busy event loop is not on the path of every connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import platform
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

__all__ = [
    "HOLD_NONBLOCKING",
    "Call",
    "ConnectDecider",
    "KnownGood",
    "ask",
    "install_filter",
    "parse_message",
    "receive",
    "respond",
    "valid",
]

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# Per machine: (audit arch, seccomp syscall, connect syscall, pidfd_open, pidfd_getfd).
_ARCH = {
    "x86_64": (0xC000003E, 317, 42, 434, 438),
    "aarch64": (0xC00000B7, 277, 203, 434, 438),
}
_SET_MODE_FILTER, _FLAG_NEW_LISTENER = 1, 1 << 3
_RET_USER_NOTIF, _RET_ALLOW = 0x7FC00000, 0x7FFF0000
_PR_SET_NO_NEW_PRIVS = 38
_NOTIF_RECV, _NOTIF_SEND, _NOTIF_ID_VALID = 0xC0502100, 0xC0182101, 0x40082102
_NOTIF_SIZE, _RESP_SIZE = 80, 24
_FLAG_CONTINUE = 1

HOLD_NONBLOCKING = 3.0
"""Seconds a non-blocking socket's connect() is held at most (see above)."""

Decide = Callable[[str, int], Awaitable[int]]
"""(address, port) -> 0 to let the connect go on, else the errno it fails with."""


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _instruction(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def install_filter() -> int:
    """In the process about to exec: route its connect() calls to a supervisor.
    Returns the listener fd to hand to it. Raises OSError where it cannot."""
    arch = _ARCH.get(platform.machine())
    if arch is None:
        raise OSError(errno.ENOSYS, f"no seccomp filter for {platform.machine()}")
    audit_arch, nr_seccomp, nr_connect, _, _ = arch
    program = b"".join(
        [
            _instruction(0x20, 0, 0, 4),  # A = seccomp_data.arch
            _instruction(0x15, 0, 6, audit_arch),  # another ABI: allow
            _instruction(0x20, 0, 0, 0),  # A = seccomp_data.nr
            _instruction(0x15, 0, 4, nr_connect),
            _instruction(0x20, 0, 0, 32),  # A = the low word of args[2], the address length
            _instruction(0x15, 1, 0, 16),  # an IPv4 address has 16 bytes,
            _instruction(0x15, 0, 1, 28),  # an IPv6 one 28
            _instruction(0x06, 0, 0, _RET_USER_NOTIF),
            _instruction(0x06, 0, 0, _RET_ALLOW),
        ]
    )
    buffer = ctypes.create_string_buffer(program)
    fprog = _Fprog(len(program) // 8, ctypes.addressof(buffer))
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    fd = _libc.syscall(nr_seccomp, _SET_MODE_FILTER, _FLAG_NEW_LISTENER, ctypes.byref(fprog))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"seccomp user notification: {os.strerror(code)}")
    return int(fd)


@dataclass(frozen=True)
class Call:
    """A held connect(): its notification id and where it goes."""

    notif_id: int
    host: str
    port: int
    blocking: bool = True


def receive(listener: int, known: KnownGood) -> Call | bool:
    """The next held connect() to a TCP destination not on loopback and not
    `known`: a Call. True: one that was let go on at once. False: the listener is
    done (the process has gone)."""
    notification = ctypes.create_string_buffer(_NOTIF_SIZE)
    if _libc.ioctl(listener, _NOTIF_RECV, notification) != 0:
        return ctypes.get_errno() in (errno.ENOENT, errno.EINTR)
    notif_id, pid = struct.unpack_from("QI", notification, 0)
    sockfd, address, length = struct.unpack_from("3Q", notification, 32)
    target = _target(pid, int(sockfd), address, length, known)
    if target is None or not valid(listener, notif_id):
        respond(listener, notif_id, 0)
        return True
    return Call(notif_id, *target)


def _target(
    pid: int, sockfd: int, address: int, length: int, known: KnownGood
) -> tuple[str, int, bool] | None:
    """The TCP destination of the call and whether its socket blocks, or None
    (let it go on untouched)."""
    if not 16 <= length <= 128:
        return None
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        try:
            raw = os.pread(fd, min(length, 28), address)
        finally:
            os.close(fd)
    except OSError:
        return None
    target = _destination(raw)
    if target is None or target in known:
        return None
    kind = _socket_kind(pid, sockfd)
    if kind is None:
        return None
    return (*target, kind)


def _destination(raw: bytes) -> tuple[str, int] | None:
    """An IPv4 or IPv6 sockaddr's address and port, or None for loopback (or
    anything else). A v4-mapped IPv6 address goes out as IPv4: its IPv4 text."""
    if len(raw) < 8:
        return None
    family, port = struct.unpack_from("=H", raw)[0], struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(raw[4:8])
    elif family == socket.AF_INET6 and len(raw) >= 24:
        v6 = ipaddress.IPv6Address(raw[8:24])
        address = v6.ipv4_mapped or v6
    else:
        return None
    return None if address.is_loopback else (str(address), port)


def _socket_kind(pid: int, sockfd: int) -> bool | None:
    """None unless the socket is TCP; else whether it blocks."""
    pidfd_open, pidfd_getfd = _ARCH[platform.machine()][3:]
    pidfd = _libc.syscall(pidfd_open, pid, 0)
    if pidfd < 0:
        return None
    try:
        dup = _libc.syscall(pidfd_getfd, pidfd, sockfd, 0)
        if dup < 0:
            return None
        sock = socket.socket(fileno=dup)
        try:
            return os.get_blocking(dup) if sock.type == socket.SOCK_STREAM else None
        finally:
            sock.close()
    finally:
        os.close(pidfd)


def valid(listener: int, notif_id: int) -> bool:
    """Whether the call still waits (its process may have been killed meanwhile)."""
    value = ctypes.c_uint64(notif_id)
    return bool(_libc.ioctl(listener, _NOTIF_ID_VALID, ctypes.byref(value)) == 0)


def respond(listener: int, notif_id: int, code: int) -> None:
    """Let the call go on (code 0) or fail it with errno `code`."""
    flags = 0 if code else _FLAG_CONTINUE
    response = ctypes.create_string_buffer(
        struct.pack("QqiI", notif_id, 0, -code if code else 0, flags), _RESP_SIZE
    )
    # ENOENT: the call was interrupted (a signal, the process ended): nothing waits.
    _libc.ioctl(listener, _NOTIF_SEND, response)


# The helper and offramp speak of held calls in these messages (an address is 16
# bytes: IPv6, or IPv4 as a v4-mapped IPv6 address):
#   helper -> offramp  b"c" + id (u64) + address + port (u16): decide this one
#   offramp -> helper  b"a" + id (u64) + errno (i32): 0 lets it go on
#   offramp -> helper  b"f" + address + port: forget that this destination was reached
_ASK = struct.Struct("!cQ16sH")
_ANSWER = struct.Struct("!cQi")
_FORGET = struct.Struct("!c16sH")


def _packed(host: str) -> bytes:
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed).packed
    return address.packed


def _unpacked(raw: bytes) -> str:
    address = ipaddress.IPv6Address(raw)
    return str(address.ipv4_mapped or address)


def ask(call: Call) -> bytes:
    return _ASK.pack(b"c", call.notif_id, _packed(call.host), call.port)


def answer(notif_id: int, code: int) -> bytes:
    return _ANSWER.pack(b"a", notif_id, code)


def forget(host: str, port: int) -> bytes:
    return _FORGET.pack(b"f", _packed(host), port)


def parse_message(data: bytes) -> Call | tuple[int, int] | tuple[str, int] | None:
    """An ask (Call), an answer (id, errno) or a forget (host, port)."""
    if data[:1] == b"c" and len(data) == _ASK.size:
        _, notif_id, host, port = _ASK.unpack(data)
        return Call(notif_id, _unpacked(host), port)
    if data[:1] == b"a" and len(data) == _ANSWER.size:
        _, notif_id, code = _ANSWER.unpack(data)
        return notif_id, code
    if data[:1] == b"f" and len(data) == _FORGET.size:
        _, host, port = _FORGET.unpack(data)
        return _unpacked(host), port
    return None


class KnownGood:
    """Destinations reached lately, and `always`: a connect to one goes on at once."""

    def __init__(self, seconds: float = 30.0, always: frozenset[tuple[str, int]] = frozenset()):
        self.seconds = seconds
        self.always = always
        self._at: dict[tuple[str, int], float] = {}

    def __contains__(self, key: tuple[str, int]) -> bool:
        if key in self.always:
            return True
        at = self._at.get(key)
        return at is not None and time.monotonic() - at < self.seconds

    def add(self, key: tuple[str, int]) -> None:
        self._at[key] = time.monotonic()
        if len(self._at) > 4096:
            oldest = min(self._at, key=self._at.__getitem__)
            del self._at[oldest]

    def discard(self, key: tuple[str, int]) -> None:
        self._at.pop(key, None)


class ConnectDecider:
    """offramp's side: decides the calls the helper asks about (on the event loop)."""

    def __init__(self, channel: socket.socket, decide: Decide):
        self._channel = channel
        self._decide = decide
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._channel.setblocking(False)
        asyncio.get_running_loop().add_reader(self._channel.fileno(), self._receive)

    def forget(self, host: str, port: int) -> None:
        with contextlib.suppress(OSError):
            self._channel.send(forget(host, port))

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self._channel.fileno())
        for task in self._tasks:
            task.cancel()

    def _receive(self) -> None:
        try:
            data = self._channel.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        call = parse_message(data)
        if isinstance(call, Call):
            task = asyncio.create_task(self._answer(call))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, call: Call) -> None:
        try:
            code = await self._decide(call.host, call.port)
        except Exception:
            log.exception("deciding a connect to %s:%d", call.host, call.port)
            code = 0
        with contextlib.suppress(OSError):
            self._channel.send(answer(call.notif_id, code))
