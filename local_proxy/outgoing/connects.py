"""The local process's connect() calls, held until offramp knows how they end.

In the namespace every outgoing TCP connection is redirected to offramp's
listener, which the kernel completes at once; so by itself a connection the pod
cannot make could only be reset after it seemed to succeed. To give the process
the error a direct connect would give, it runs under a seccomp filter whose
`connect` calls come here first (seccomp user notification, Linux >= 5.5; no
privilege: the process sets no_new_privs, so setuid programs it starts lose
their setuid):

- a connect that is not IPv4 TCP, or goes to loopback, continues untouched;
- otherwise offramp opens the way first (`decide`): once it is open the call
  continues (and is redirected to the listener, which finds the way ready); if
  the pod or the laptop says no, the call fails with the matching errno:
  ECONNREFUSED, ENETUNREACH, ETIMEDOUT, EPERM (denied by policy) or
  EHOSTUNREACH (a name the pod cannot resolve).

Only the calling thread waits (for a non-blocking socket too, as with mirrord's
connect hook), about one round trip to the pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import platform
import socket
import struct
from collections.abc import Awaitable, Callable

__all__ = ["ConnectSupervisor", "install_filter"]

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
            _instruction(0x15, 0, 3, audit_arch),  # another ABI: allow
            _instruction(0x20, 0, 0, 0),  # A = seccomp_data.nr
            _instruction(0x15, 0, 1, nr_connect),
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


class ConnectSupervisor:
    """Answers the filtered process's connect() calls (on the event loop)."""

    def __init__(self, listener: int, decide: Decide):
        self._fd = listener
        self._decide = decide
        self._tasks: set[asyncio.Task[None]] = set()
        self._pidfd_open, self._pidfd_getfd = _ARCH[platform.machine()][3:]
        self.held = 0

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self._fd, self._receive)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self._fd)
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _receive(self) -> None:
        notification = ctypes.create_string_buffer(_NOTIF_SIZE)
        if _libc.ioctl(self._fd, _NOTIF_RECV, notification) != 0:
            # ENOENT: the caller went away meanwhile; EBADF etc.: the process is gone.
            if ctypes.get_errno() not in (errno.ENOENT, errno.EINTR):
                with contextlib.suppress(ValueError):
                    asyncio.get_running_loop().remove_reader(self._fd)
            return
        notif_id, pid = struct.unpack_from("QI", notification, 0)
        sockfd, address, length = struct.unpack_from("3Q", notification, 32)
        target = self._target(pid, int(sockfd), address, length)
        if target is None or not self._valid(notif_id):
            self._respond(notif_id, 0)
            return
        task = asyncio.create_task(self._answer(notif_id, *target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _target(self, pid: int, sockfd: int, address: int, length: int) -> tuple[str, int] | None:
        """The IPv4 TCP destination of the call, or None (let it go on untouched)."""
        if not 16 <= length <= 128:
            return None
        try:
            with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
                mem.seek(address)
                raw = mem.read(16)
        except OSError:
            return None
        family, port = struct.unpack_from("=H", raw)[0], struct.unpack_from("!H", raw, 2)[0]
        if family != socket.AF_INET:
            return None
        host = socket.inet_ntoa(raw[4:8])
        if host.startswith("127.") or not self._is_tcp(pid, sockfd):
            return None
        return host, port

    def _is_tcp(self, pid: int, sockfd: int) -> bool:
        pidfd = _libc.syscall(self._pidfd_open, pid, 0)
        if pidfd < 0:
            return False
        try:
            dup = _libc.syscall(self._pidfd_getfd, pidfd, sockfd, 0)
            if dup < 0:
                return False
            sock = socket.socket(fileno=dup)
            try:
                return sock.type == socket.SOCK_STREAM
            finally:
                sock.close()
        finally:
            os.close(pidfd)

    async def _answer(self, notif_id: int, host: str, port: int) -> None:
        self.held += 1
        try:
            code = await self._decide(host, port)
        except Exception:
            log.exception("deciding a connect to %s:%d", host, port)
            code = 0
        self._respond(notif_id, code)

    def _valid(self, notif_id: int) -> bool:
        value = ctypes.c_uint64(notif_id)
        return bool(_libc.ioctl(self._fd, _NOTIF_ID_VALID, ctypes.byref(value)) == 0)

    def _respond(self, notif_id: int, code: int) -> None:
        flags = 0 if code else _FLAG_CONTINUE
        response = ctypes.create_string_buffer(
            struct.pack("QqiI", notif_id, 0, -code if code else 0, flags), _RESP_SIZE
        )
        # ENOENT: the call was interrupted (a signal, the process ended): nothing waits.
        _libc.ioctl(self._fd, _NOTIF_SEND, response)
