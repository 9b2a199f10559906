"""An emulated cluster (tests/kube) for `offramp steal KIND/NAME` as a user types it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kube.cluster import Cluster, Image
from tests.netns import require_netns

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
APP_IMAGE = "shop/api:1"
SIDECAR_IMAGE = "offramp/sidecar:test"
BROKEN_SIDECAR_IMAGE = "offramp/sidecar:broken-caps"
"""The image as it was first built: iptables-nft carried NET_RAW as well, which the
injected container may not hold, so every start failed (CrashLoopBackOff)."""
NAMESPACE = "shop"
STARTED: list[Cli] = []


def sidecar_image() -> Image:
    """The sidecar image as the Dockerfile makes it, as far as a process sees it: its
    user, its environment (less PATH: the emulator's runs this checkout's venv)
    and the file capabilities of its binaries."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    run_stage = text.rsplit("\nFROM ", 1)[1]
    (user,) = re.findall(r"^USER (\S+)$", run_stage, re.M)
    env = [
        tuple(pair.split("=", 1))
        for line in re.findall(r"^ENV (.+)$", run_stage, re.M)
        for pair in line.split()
        if not pair.startswith("PATH=")
    ]
    caps = re.findall(r"setcap (\S+) (\S+)", run_stage)
    return Image(
        (str(BIN / "offramp-sidecar"),),
        user=int(user),
        env=tuple((k, v) for k, v in env),
        file_caps=tuple((path, cap) for cap, path in caps),
    )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    require_netns()
    images = {
        APP_IMAGE: Image((sys.executable, "-m", "tests.kube.app")),
        SIDECAR_IMAGE: sidecar_image(),
        BROKEN_SIDECAR_IMAGE: dataclasses.replace(
            sidecar_image(),
            file_caps=(
                ("/usr/sbin/xtables-nft-multi", "cap_net_admin,cap_net_raw+ep"),
                ("/bin/ss", "cap_net_admin+ep"),
            ),
        ),
    }
    c = Cluster(tmp_path / "cluster", images, developer_namespaces=[NAMESPACE])
    c.start()
    try:
        c.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        yield c
        assert not c.kubelet.errors, c.kubelet.errors
    finally:
        # A test that failed half-way may leave its CLI running: end it first.
        # Its whole process group goes (a command after -- included), so its
        # output pipe reaches EOF and the reader thread ends on its own.
        while STARTED:
            cli = STARTED.pop()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(cli.proc.pid, signal.SIGKILL)
            cli.proc.wait(10)
        c.close()
        for name, text in c.logs().items():
            if "offramp-sidecar" in name and "Traceback" in text:
                pytest.fail(f"{name} logged a traceback:\n{text[-3000:]}")


def deployment(
    name: str = "api", replicas: int = 3, port_name: str | None = "http", namespace: str = NAMESPACE
) -> dict[str, Any]:
    port: dict[str, Any] = {"containerPort": 8080}
    probe_port: int | str = 8080
    if port_name:
        port["name"] = port_name
        probe_port = port_name
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [
                        {
                            "name": name,
                            "image": APP_IMAGE,
                            "args": ["--port", "8080"],
                            "ports": [port],
                            "readinessProbe": {
                                "httpGet": {"path": "/ready", "port": probe_port},
                                "periodSeconds": 10,
                            },
                        }
                    ]
                },
            },
        },
    }


def service(
    name: str = "api", target: int | str = "http", namespace: str = NAMESPACE
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": target}]},
    }


def get(
    ip: str, port: int, path: str = "/", headers: dict[str, str] | None = None
) -> dict[str, Any]:
    req = urllib.request.Request(f"http://{ip}:{port}{path}", headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out


def user_env(kubeconfig: Path) -> dict[str, str]:
    """A user's environment with this kubeconfig, and offramp's user config of its own
    (beside the kubeconfig) rather than this machine's."""
    env = {k: v for k, v in os.environ.items() if k != "OFFRAMP_SIDECAR_IMAGE"}
    return {**env, "KUBECONFIG": str(kubeconfig), "XDG_CONFIG_HOME": str(kubeconfig.parent / "xdg")}


class Cli:
    """`offramp ...` run as a user runs it, with KUBECONFIG pointing at the emulator."""

    def __init__(self, kubeconfig: Path, *args: str):
        env = {**user_env(kubeconfig), "PYTHONUNBUFFERED": "1"}
        self.args = args
        self.proc = subprocess.Popen(
            [str(BIN / "offramp"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            start_new_session=True,
        )
        STARTED.append(self)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        for line in self.lines:
            if text in line:
                return line
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(
                    f"offramp exited ({self.proc.wait()}) before {text!r}:\n"
                    + "\n".join(self.lines)
                )
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} within {timeout:.0f} s:\n" + "\n".join(self.lines))

    def wait_count(self, text: str, n: int, timeout: float = 90) -> None:
        """Until `n` lines (so far, in all) contain `text`."""
        deadline = time.monotonic() + timeout
        while sum(text in line for line in self.lines) < n:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"fewer than {n} lines with {text!r} within {timeout:.0f} s:"
                    "\n" + "\n".join(self.lines)
                )
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(
                    f"offramp exited ({self.proc.wait()}):\n" + "\n".join(self.lines)
                )
            self.lines.append(line)

    def count_now(self, text: str) -> int:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._queue.put(None)  # for finish()
                break
            self.lines.append(line)
        return sum(text in line for line in self.lines)

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        assert self.proc.stdout is not None
        if self.proc.stdout.closed:
            return code  # finished already
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        self.proc.stdout.close()
        return code

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(2)
        return self.finish()


def offramp(kubeconfig: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = user_env(kubeconfig)
    return subprocess.run(
        [str(BIN / "offramp"), *args], capture_output=True, text=True, env=env, timeout=timeout
    )
