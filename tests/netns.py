"""A pod and a caller made of network namespaces, joined by a veth pair.

    caller ns (CALLER_IP) <── veth ──> pod ns (POD_IP): app + real sidecar (iptables)

Only addresses inside these namespaces are used; both namespaces (and so the
veth pair) are removed when the bed is closed, also after a failed test.
Code runs in a namespace either as a process (`ip netns exec`) or in a thread
that has joined the namespace (`in_ns`): sockets it opens belong there.

Needs root, `ip` (iproute2), `ss` and iptables. Without them the tests skip with
the reason, except under CI (CI=true), where a missing tool is a failure.
"""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest


def require_netns() -> None:
    missing = [tool for tool in ("ip", "ss", "iptables-nft") if shutil.which(tool) is None]
    reason = ""
    if os.geteuid() != 0:
        reason = "pod-level tests need root (network namespaces and iptables)"
    elif missing:
        reason = f"pod-level tests need {', '.join(missing)} (apt-get install iproute2 iptables)"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must provide it (.ci/run installs it)")
        pytest.skip(reason)


def sh(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Netns:
    name: str

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def sh(self, *args: str) -> str:
        return sh(*self.cmd(*args))

    def call[T](self, fn: Callable[..., T], *args: object) -> T:
        """Run fn(*args) in a thread that has joined this namespace."""

        def joined() -> T:
            fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                os.setns(fd, os.CLONE_NEWNET)
            finally:
                os.close(fd)
            return fn(*args)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(joined).result()

    def nat_rules(self, binary: str = "iptables") -> str:
        return self.sh(binary, "-t", "nat", "-S")


def add_netns(ns: Netns, created: list[Netns]) -> None:
    """Make `ns` with its loopback up; it joins `created` (for `remove_netns`)."""
    sh("ip", "netns", "add", ns.name)
    created.append(ns)
    ns.sh("ip", "link", "set", "lo", "up")


def remove_netns(ns: Netns) -> None:
    """End every process still inside, then the namespace and its veth ends."""
    pids = subprocess.run(
        ["ip", "netns", "pids", ns.name], capture_output=True, text=True
    ).stdout.split()
    for pid in pids:
        subprocess.run(["kill", "-9", pid], capture_output=True)
    subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)


@dataclass
class PodBed:
    pod: Netns
    caller: Netns
    pod_ip: str
    caller_ip: str


@contextmanager
def pod_bed() -> Iterator[PodBed]:
    require_netns()
    tag = secrets.token_hex(3)
    net = int(tag[:2], 16) % 250 + 1
    pod, caller = Netns(f"ofr-pod-{tag}"), Netns(f"ofr-call-{tag}")
    pod_ip, caller_ip = f"10.213.{net}.2", f"10.213.{net}.1"
    created: list[Netns] = []
    try:
        for ns in (pod, caller):
            add_netns(ns, created)
        sh("ip", "link", "add", f"ofp{tag}", "netns", pod.name, "type", "veth",
           "peer", "name", f"ofc{tag}", "netns", caller.name)  # fmt: skip
        pod.sh("ip", "addr", "add", f"{pod_ip}/24", "dev", f"ofp{tag}")
        pod.sh("ip", "link", "set", f"ofp{tag}", "up")
        caller.sh("ip", "addr", "add", f"{caller_ip}/24", "dev", f"ofc{tag}")
        caller.sh("ip", "link", "set", f"ofc{tag}", "up")
        yield PodBed(pod, caller, pod_ip, caller_ip)
    finally:
        for ns in created:
            remove_netns(ns)
