"""Capture a pod's inbound traffic with iptables, only while a session listens.

For each app port with at least one session, the sidecar owns one nat chain,
`OFFRAMP-<port>`, jumped to from PREROUTING for inbound TCP to that port, which
REDIRECTs to the sidecar's listener. With no session the chain and the jump are
absent and the pod's traffic does not touch the sidecar at all.

- PREROUTING only sees packets that arrive from outside the pod, so the
  sidecar's own connections to the app (over loopback, through OUTPUT) are never
  redirected back to it.
- Connections already established when capture starts keep going to the app:
  only a connection's first packet (a SYN) is redirected. So that keep-alive
  clients come back through the sidecar, their *idle* connections are closed
  (`ss -K`); a connection with a request in progress is left until its answer
  is sent.
- The kernel tracks connections in a network namespace only while some rule
  needs it, and NAT lives in that tracking: a connection redirected to the
  listener keeps being translated only while tracking is on. Once the last
  REDIRECT rule is gone the replies of connections still open would go out
  from the listener's port, untranslated, and their callers would never get
  the rest of their answers. So one more chain, `OFFRAMP-CONNTRACK`, that
  nothing jumps to, holds a conntrack match from when capture starts until no
  connection to a listener is left (`ss`), and on exit until the drain ends.
  Then no rule of ours is left. The kernel keeps the entries of connections
  that were open (straight to the app) at that moment until they time out; a
  new connection that reuses exactly the addresses and ports of one of them
  while capture is on again goes to the app, as that entry says, not to us.
- Chains left behind by an earlier run that was killed are found by their name
  prefix and removed at start.

Works with iptables-nft and iptables-legacy: name the binary (`--iptables`).
Only IPv4 is captured.
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import time
from dataclasses import dataclass, field

__all__ = ["CHAIN_PREFIX", "CONNTRACK_CHAIN", "CaptureError", "IptablesCapture", "NoCapture"]

log = logging.getLogger(__name__)

CHAIN_PREFIX = "OFFRAMP-"
CONNTRACK_CHAIN = f"{CHAIN_PREFIX}CONNTRACK"
_CONNTRACK_RULE = ("-m", "conntrack", "--ctstate", "NEW", "-j", "RETURN")
RELEASE_POLL_SECONDS = 0.5
IDLE_SWEEP_SECONDS = 5.0
IDLE_SWEEP_INTERVAL = 0.1
IDLE_AFTER_MS = 500
"""A connection counts as idle once the app's last answer is this old (ms) and the
client has sent nothing since. Closing sooner could reset a connection whose
client has not yet read the answer (an RST discards unread data)."""


class CaptureError(RuntimeError):
    """iptables refused a change; the message has its output."""


class NoCapture:
    """`--capture none`: whatever sends traffic to the listener decides what it sees."""

    def start(self, port: int) -> None:
        pass

    def stop(self, port: int) -> None:
        pass

    def stop_all(self) -> None:
        pass

    def release_conntrack(self) -> None:
        pass


@dataclass
class IptablesCapture:
    listen_ports: dict[int, int]
    """app port -> the sidecar's listener port for it"""
    binary: str = "iptables"
    close_existing: bool = True
    active: set[int] = field(default_factory=set)
    _sweeps: set[asyncio.Task[int]] = field(default_factory=set)
    _release: asyncio.Task[None] | None = None

    def _run(self, *args: str, check: bool = True) -> str:
        cmd = [self.binary, "-w", "5", "-t", "nat", *args]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except PermissionError as e:
            raise CaptureError(f"cannot run {' '.join(cmd)}: {e}; {_NOT_PERMITTED}") from e
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CaptureError(f"cannot run {' '.join(cmd)}: {e}") from e
        if check and done.returncode != 0:
            raise CaptureError(
                f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}; "
                "the sidecar needs the NET_ADMIN capability for --capture iptables "
                "(or use --capture none)"
            )
        return done.stdout

    @staticmethod
    def chain(port: int) -> str:
        return f"{CHAIN_PREFIX}{port}"

    def _jump(self, port: int) -> list[str]:
        return ["-p", "tcp", "--dport", str(port), "--syn", "-j", self.chain(port)]

    def clean_stale(self) -> list[str]:
        """Remove chains (and their jumps) that an earlier run left behind.

        Run at start, it is also the check that capture can work here: iptables
        runs and `ss` (which releases tracking and closes idle connections) too.
        """
        rules = self._run("-S").splitlines()
        _check_ss()
        stale = sorted(line.split()[1] for line in rules if line.startswith(f"-N {CHAIN_PREFIX}"))
        for line in rules:
            if line.startswith("-A PREROUTING") and f"-j {CHAIN_PREFIX}" in line:
                self._run("-D", *line.split()[1:])
        for chain in stale:
            self._run("-F", chain)
            self._run("-X", chain)
        return stale

    def _hold_conntrack(self) -> None:
        self._cancel_release()
        rules = self._run("-S").splitlines()
        if f"-N {CONNTRACK_CHAIN}" not in rules:
            self._run("-N", CONNTRACK_CHAIN)
        if not any(r.startswith(f"-A {CONNTRACK_CHAIN} ") for r in rules):
            self._run("-A", CONNTRACK_CHAIN, *_CONNTRACK_RULE)

    def release_conntrack(self) -> None:
        """Let connection tracking go now (on exit, once the drain is over)."""
        self._cancel_release()
        self._drop_conntrack_chain()

    def _cancel_release(self) -> None:
        if self._release is not None:
            self._release.cancel()
            self._release = None

    def _drop_conntrack_chain(self) -> None:
        self._run("-F", CONNTRACK_CHAIN, check=False)
        self._run("-X", CONNTRACK_CHAIN, check=False)

    def _release_once_drained(self) -> None:
        if self._release is None:
            self._release = asyncio.get_running_loop().create_task(self._release_when_drained())

    async def _release_when_drained(self) -> None:
        """Release tracking once no connection to a listener is open any more."""
        listeners = " or ".join(f"sport = :{p}" for p in sorted(self.listen_ports.values()))
        while True:
            still_open = await _ss(
                "-H", "-t", "-n", "state", "connected", "exclude", "time-wait", f"( {listeners} )"
            )  # fmt: skip
            if not still_open.strip():
                break
            await asyncio.sleep(RELEASE_POLL_SECONDS)
        self._release = None
        self._drop_conntrack_chain()
        log.info("no redirected connection left: connection tracking released")

    def start(self, port: int) -> None:
        if port in self.active:
            return
        self._hold_conntrack()
        chain = self.chain(port)
        self._run("-N", chain)
        try:
            self._run(
                "-A", chain, "-p", "tcp", "-j", "REDIRECT", "--to-ports",
                str(self.listen_ports[port]),
            )  # fmt: skip
            self._run("-I", "PREROUTING", *self._jump(port))
        except CaptureError:
            self._run("-F", chain, check=False)
            self._run("-X", chain, check=False)
            if not self.active:
                self._release_once_drained()
            raise
        self.active.add(port)
        log.info("capturing inbound TCP to port %d (chain %s)", port, chain)
        if self.close_existing:
            task = asyncio.get_running_loop().create_task(close_idle_connections(port))
            self._sweeps.add(task)
            task.add_done_callback(self._sweeps.discard)

    def stop(self, port: int) -> None:
        if port not in self.active:
            return
        self.active.discard(port)
        self._run("-D", "PREROUTING", *self._jump(port), check=False)
        self._run("-F", self.chain(port), check=False)
        self._run("-X", self.chain(port), check=False)
        log.info("stopped capturing port %d", port)
        if not self.active:
            self._release_once_drained()

    def stop_all(self) -> None:
        """Stop redirecting; tracking stays until release_conntrack()."""
        for task in self._sweeps:
            task.cancel()
        for port in sorted(self.active):
            self.stop(port)
        self._cancel_release()


@dataclass(frozen=True)
class _Socket:
    local: str
    peer: str
    idle: bool


_ADDR = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<v4>[^:]+)):(?P<port>\d+)$")
_TIMER = re.compile(r"\b(lastsnd|lastrcv):(\d+)")


def parse_ss(output: str) -> list[_Socket]:
    """Parse `ss -H -t -n -i` output: one address line, then one info line per socket.

    A socket is idle when the app has answered (it sent after it last received),
    that answer is at least IDLE_AFTER_MS old, and nothing waits in its queues.
    A fresh connection that has exchanged nothing yet is not idle: its request
    is probably on the way."""
    sockets = []
    lines = output.splitlines()
    for first, info in zip(lines[::2], lines[1::2], strict=False):
        fields = first.split()
        if len(fields) < 4:
            continue
        recv_q, send_q, local, peer = fields[-4:]
        timers = {k: int(v) for k, v in _TIMER.findall(info)}
        # ss prints how many ms ago; a missing timer means "never".
        sent_ago = timers.get("lastsnd")
        received_ago = timers.get("lastrcv", 1 << 62)
        idle = (
            recv_q == "0"
            and send_q == "0"
            and sent_ago is not None
            and IDLE_AFTER_MS <= sent_ago <= received_ago
        )
        sockets.append(_Socket(local, peer, idle))
    return sockets


def _is_loopback(address: str) -> bool:
    match = _ADDR.match(address)
    host = (match.group("v4") or match.group("v6")) if match else address
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")


_NOT_PERMITTED = (
    "the kernel refuses to run a binary whose file capabilities are not all in the "
    "container's bounding set: the sidecar image gives iptables-nft and ss NET_ADMIN "
    "(iptables-legacy also NET_RAW), so the container's securityContext must add them "
    "(capabilities.add) and allow privilege escalation; or use --capture none"
)


def _check_ss() -> None:
    try:
        done = subprocess.run(
            ["ss", "-H", "-t", "-n", "state", "listening"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except PermissionError as e:
        raise CaptureError(f"cannot run ss: {e}; {_NOT_PERMITTED}") from e
    except FileNotFoundError as e:
        raise CaptureError(
            "ss (from iproute2) is not installed, and --capture iptables needs it; "
            "install iproute2 in the image, or use --capture none"
        ) from e
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CaptureError(f"cannot run ss: {e}") from e
    if done.returncode != 0:
        raise CaptureError(f"ss failed ({done.returncode}): {done.stderr.strip()}")


async def _ss(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "ss", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await proc.communicate()
    return out.decode()


async def close_idle_connections(port: int, sweep: float = IDLE_SWEEP_SECONDS) -> int:
    """Close callers' idle keep-alive connections to the app port, re-checking busy
    ones for `sweep` seconds. Returns how many were closed."""
    closed = 0
    deadline = time.monotonic() + sweep
    while True:
        sockets = [
            s
            for s in parse_ss(
                await _ss("-H", "-t", "-n", "-i", "state", "established", f"( sport = :{port} )")
            )
            if not _is_loopback(s.peer)
        ]
        for s in sockets:
            if s.idle:
                peer = _ADDR.match(s.peer)
                if peer is None:
                    continue
                host = peer.group("v4") or peer.group("v6")
                await _ss(
                    "-K", "-t", "state", "established",
                    f"( sport = :{port} and dst {host} and dport = :{peer.group('port')} )",
                )  # fmt: skip
                closed += 1
        busy = [s for s in sockets if not s.idle]
        if not busy or time.monotonic() > deadline:
            if closed or busy:
                log.info(
                    "port %d: closed %d idle connections opened before capture%s",
                    port,
                    closed,
                    f"; {len(busy)} still busy, left to finish" if busy else "",
                )
            return closed
        await asyncio.sleep(IDLE_SWEEP_INTERVAL)
