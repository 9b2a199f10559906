"""The real image under a real container runtime, with the pod spec the injection writes.

The image is built from ./Dockerfile unchanged (tests/podman.py); the sidecar
container gets exactly the user, capabilities, privilege and filesystem
settings that `sidecar.inject.patch` gives it, and shares a network namespace with
an app container as a pod's containers do. A caller in a namespace of its own
sends traffic to the pod's address, as another pod would.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import pytest

from sidecar.inject.patch import SIDECAR_NAME, InjectOptions, inject
from sidecar.settings import Capture
from tests.netns import PodBed, pod_bed
from tests.podman import (
    BASE_IMAGE,
    REPO,
    build_image,
    podman,
    require_podman,
    run_flags,
    status_caps,
)
from tests.support import HttpApp, start_app

# The first test also builds the image: about 3.5 minutes on a machine that has
# never built it (the stand-in base included), seconds once cached.
pytestmark = pytest.mark.timeout(900)

BIN = Path(sys.executable).parent
APP_PORT = 8080
CAP_NET_ADMIN = 1 << 12
ALICE = {"x-preview": "alice"}


@pytest.fixture(scope="module")
def image() -> str:
    require_podman()
    return build_image()


def app_template() -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app": "api"}},
        "spec": {
            "containers": [
                {
                    "name": "api",
                    "image": "shop/api:1",
                    "ports": [{"name": "http", "containerPort": APP_PORT}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                }
            ]
        },
    }


def injected_sidecar(options: InjectOptions) -> dict[str, Any]:
    template = app_template()
    pod = jsonpatch.apply_patch(template, inject(template, options))
    return copy.deepcopy(next(c for c in pod["spec"]["containers"] if c["name"] == SIDECAR_NAME))


class Pod:
    """An app container and the injected sidecar container in one network namespace."""

    def __init__(self, bed: PodBed, tmp: Path, image: str):
        self.bed, self.tmp, self.image = bed, tmp, image
        self.tag = secrets.token_hex(3)
        self.names: list[str] = []
        # What a kubelet makes of the injected volumes: the Secret's files are
        # written 0644 (its defaultMode), an emptyDir is 0777.
        self.token = secrets.token_hex(32)
        self.volumes = {"offramp-token": tmp / "token", "offramp-tmp": tmp / "emptydir"}
        self.volumes["offramp-token"].mkdir()
        (self.volumes["offramp-token"] / "token").write_text(self.token + "\n")
        (self.volumes["offramp-token"] / "token").chmod(0o644)
        self.volumes["offramp-tmp"].mkdir()
        self.volumes["offramp-tmp"].chmod(0o777)
        self.token_file = tmp / "cli-token"
        self.token_file.write_text(self.token + "\n")
        self.token_file.chmod(0o600)

    def start_app(self) -> None:
        name = f"ofr-app-{self.tag}"
        podman(
            "run", "-d", "--name", name, *run_flags({"name": "api"}, {}, self.bed.pod.name),
            "-v", f"{REPO / 'tests/kube/app.py'}:/app/app.py:ro",
            BASE_IMAGE, "python3", "/app/app.py", "--port", str(APP_PORT),
        )  # fmt: skip
        self.names.append(name)
        self.wait(lambda: self.pod_get(APP_PORT, "/ready").status_code == 200, "the app")

    def start_sidecar(
        self, container: dict[str, Any], objects: dict[tuple[str, str], Any] | None = None,
        pod_containers: list[dict[str, Any]] | None = None,
    ) -> str:  # fmt: skip
        name = f"ofr-sidecar-{self.tag}-{len(self.names)}"
        flags = run_flags(container, self.volumes, self.bed.pod.name, self.image,
                          objects=objects, pod_containers=pod_containers)  # fmt: skip
        podman("run", "-d", "--name", name, *flags, self.image, *container["args"])
        self.names.append(name)
        return name

    def wait_ready(self, name: str, container: dict[str, Any]) -> None:
        probe = container["readinessProbe"]["httpGet"]

        def ready() -> bool:
            assert self.state(name)["Running"], self.logs(name)
            return self.pod_get(probe["port"], probe["path"]).status_code == 200

        self.wait(ready, f"{name}'s readiness probe")

    def wait(self, check: Any, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if check():
                    return
            time.sleep(0.1)
        raise AssertionError(f"{what} not ready within {timeout:.0f} s")

    def pod_get(self, port: int, path: str) -> httpx.Response:
        """A request from inside the pod's network namespace (as a kubelet probe is not,
        but the address is the pod's own)."""
        url = f"http://{self.bed.pod_ip}:{port}{path}"
        return self.bed.caller.call(httpx.get, url)

    def get(self, path: str = "/", headers: dict[str, str] | None = None) -> dict[str, Any]:
        def go() -> dict[str, Any]:
            url = f"http://{self.bed.pod_ip}:{APP_PORT}{path}"
            r = httpx.get(url, headers=headers, timeout=20)
            return {"status": r.status_code, **r.json()}

        return self.bed.caller.call(go)

    def state(self, name: str) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(podman("inspect", "--format", "{{json .State}}", name))
        return state

    def logs(self, name: str) -> str:
        done = subprocess.run(["podman", "logs", name], capture_output=True, text=True, timeout=30)
        return done.stdout + done.stderr

    @contextlib.contextmanager
    def session(self, local_port: int, *args: str) -> Iterator[subprocess.Popen[str]]:
        """`offramp steal` as a user types it, from the caller's side."""
        proc = subprocess.Popen(
            self.bed.caller.cmd(
                str(BIN / "offramp"), "steal", "--sidecar-url",
                f"ws://{self.bed.pod_ip}:15081", "--token-file", str(self.token_file),
                "--to", str(local_port), *args,
            ),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "open" in line, line + (proc.stderr.read() if proc.stderr else "")
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)

    def close(self) -> None:
        for name in reversed(self.names):
            podman("rm", "--force", "--time", "2", name, check=False)


@pytest.fixture
def pod(image: str, tmp_path: Path) -> Iterator[Pod]:
    with pod_bed() as bed:
        p = Pod(bed, tmp_path, image)
        try:
            p.start_app()
            yield p
        finally:
            p.close()


@pytest.fixture
def local(pod: Pod) -> Iterator[HttpApp]:
    """The developer's local process, on the caller's side."""
    app = pod.bed.caller.call(start_app, "local", "0.0.0.0", 0)
    yield app
    app.server.shutdown()
    app.server.server_close()


def test_the_injected_sidecar_captures_steals_and_drains(
    pod: Pod, local: HttpApp, image: str
) -> None:
    container = injected_sidecar(InjectOptions(image=image))
    name = pod.start_sidecar(container)
    pod.wait_ready(name, container)

    # It runs as the spec says: its uid, no capability in effect, NET_ADMIN only
    # in its bounding set (what its binaries' file capabilities may use).
    caps = status_caps(int(pod.state(name)["Pid"]))
    assert caps["Uid"] == container["securityContext"]["runAsUser"]
    assert caps["CapEff"] == 0 and caps["CapPrm"] == 0
    assert caps["CapBnd"] == CAP_NET_ADMIN

    assert "OFFRAMP-" not in pod.bed.pod.nat_rules(), "no rule of ours before a session"
    assert pod.get("/cart")["peer"] == pod.bed.caller_ip, "not on the path without a session"

    with pod.session(local.port, "--header", "^x-preview: alice$"):
        assert f"OFFRAMP-{APP_PORT}" in pod.bed.pod.nat_rules()
        stolen = pod.get("/cart", ALICE)
        assert stolen["served_by"] == "local", stolen
        passed = pod.get("/cart")
        assert passed["served_by"] == "app" and passed["peer"] == "127.0.0.1", passed
        probe = pod.get("/ready", {**ALICE, "user-agent": "kube-probe/1.30"})
        assert probe["served_by"] == "app", "a probe is never stolen"

        # SIGTERM (what a kubelet sends) while a stolen request is in flight: it
        # is answered, then the sidecar removes its rules and exits 0.
        answers: list[dict[str, Any]] = []
        slow = threading.Thread(target=lambda: answers.append(pod.get("/sleep/2", ALICE)))
        slow.start()
        local.wait_seen(2)
        podman("stop", "--time", "30", name, timeout=60)
        slow.join(30)
        assert answers and answers[0]["served_by"] == "local", pod.logs(name)
    assert pod.state(name)["ExitCode"] == 0, pod.logs(name)
    assert "OFFRAMP-" not in pod.bed.pod.nat_rules(), pod.logs(name)
    assert "Traceback" not in pod.logs(name)
    assert pod.get("/cart")["peer"] == pod.bed.caller_ip, "the app serves directly again"


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def mapped(pid: int, library: str) -> bool:
    return library in Path(f"/proc/{pid}/maps").read_text()


def test_an_idle_injected_sidecar_is_one_small_process_until_a_session_opens(
    pod: Pod, local: HttpApp, image: str
) -> None:
    """Issue 19 in the real image: the primary (the container's first process)
    passes kubelet's probe without loading mitmproxy; a session starts the engine
    as its child, and the engine goes a while after the session ends."""
    container = injected_sidecar(InjectOptions(image=image))
    container["args"].append("--engine-linger=2")
    name = pod.start_sidecar(container)
    pod.wait_ready(name, container)
    primary = int(pod.state(name)["Pid"])
    assert children(primary) == [], "no engine before a session"
    assert not mapped(primary, "mitmproxy_rs") and not mapped(primary, "pydantic_core")

    with pod.session(local.port, "--header", "^x-preview: alice$"):
        (engine,) = children(primary)
        assert mapped(engine, "mitmproxy_rs")
        assert status_caps(engine)["CapEff"] == 0, "the engine holds no more than the primary"
        assert pod.get("/cart", ALICE)["served_by"] == "local"
        assert pod.get("/cart")["served_by"] == "app"
    pod.wait(lambda: not children(primary), "the engine to go after the linger")
    assert "OFFRAMP-" not in pod.bed.pod.nat_rules(), pod.logs(name)
    assert pod.get("/cart")["peer"] == pod.bed.caller_ip, "not on the path without a session"
    with pod.session(local.port, "--header", "^x-preview: alice$"):
        assert pod.get("/cart", ALICE)["served_by"] == "local"
    podman("stop", "--time", "30", name, timeout=60)
    assert pod.state(name)["ExitCode"] == 0, pod.logs(name)
    assert "Traceback" not in pod.logs(name)


def test_a_container_without_the_capability_its_binaries_carry_fails_with_the_reason(
    pod: Pod, image: str
) -> None:
    """What the first real pod did (file capabilities outside the bounding set), made
    visible: the sidecar exits at once and says what to grant."""
    container = injected_sidecar(InjectOptions(image=image))
    container["securityContext"]["capabilities"] = {"drop": ["ALL"]}
    name = pod.start_sidecar(container)
    deadline = time.monotonic() + 60
    while pod.state(name)["Running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    logs = pod.logs(name)
    assert pod.state(name)["ExitCode"] == 1, logs
    assert "cannot capture the pod's traffic" in logs and "NET_ADMIN" in logs, logs
    assert "Traceback" not in logs
    assert pod.get("/cart")["served_by"] == "app", "the app keeps serving"


def test_privilege_free_mode_runs_with_no_capability_and_no_privilege_escalation(
    pod: Pod, local: HttpApp, image: str
) -> None:
    container = injected_sidecar(
        InjectOptions(image=image, capture=Capture.NONE, named_port="http")
    )
    name = pod.start_sidecar(container)
    pod.wait_ready(name, container)
    caps = status_caps(int(pod.state(name)["Pid"]))
    assert caps["CapBnd"] == 0 and caps["CapEff"] == 0 and caps["NoNewPrivs"] == 1
    listen = next(p["containerPort"] for p in container["ports"] if p.get("name") == "http")

    def via_sidecar(headers: dict[str, str] | None = None) -> dict[str, Any]:
        def go() -> dict[str, Any]:
            r = httpx.get(f"http://{pod.bed.pod_ip}:{listen}/cart", headers=headers, timeout=20)
            return {"status": r.status_code, **r.json()}

        return pod.bed.caller.call(go)

    with pod.session(local.port, "--header", "^x-preview: alice$"):
        assert via_sidecar(ALICE)["served_by"] == "local"
        assert via_sidecar()["served_by"] == "app"


def test_the_sidecar_carries_the_apps_environment_whatever_its_python_variables(
    pod: Pod, image: str
) -> None:
    """The app's env and envFrom, copied under the prefix with kubelet resolving them
    (here tests.kube.envvars, as the emulator's kubelet): junk PYTHONPATH and
    PYTHONHOME for the app do not reach the image's Python, which starts, and the
    sidecar hands the app's environment to the token holder."""
    template = app_template()
    app = template["spec"]["containers"][0]
    app["env"] = [
        {"name": "PYTHONPATH", "value": "/nonexistent/junk"},
        {"name": "PYTHONHOME", "value": "/nonexistent/home"},
        {"name": "PASS", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
        {"name": "URL", "value": "postgres://app:$(PASS)@db/$(MODE)"},
        {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory",
                                                           "divisor": "1Mi"}}},
    ]  # fmt: skip
    app["envFrom"] = [{"configMapRef": {"name": "settings"}}]
    app["resources"] = {"limits": {"memory": "64Mi"}}
    injected = jsonpatch.apply_patch(template, inject(template, InjectOptions(image=image)))
    containers = injected["spec"]["containers"]
    container = copy.deepcopy(next(c for c in containers if c["name"] == SIDECAR_NAME))
    objects = {
        ("secrets", "db"): {"data": {"password": base64.b64encode(b"s3cret").decode()}},
        ("configmaps", "settings"): {"data": {"MODE": "shop"}},
    }
    name = pod.start_sidecar(container, objects, containers)
    pod.wait_ready(name, container)

    def env() -> httpx.Response:
        url = f"http://{pod.bed.pod_ip}:15081/v1/env"
        return httpx.get(url, headers={"Authorization": f"Bearer {pod.token}"}, timeout=20)

    answer = pod.bed.caller.call(env)
    assert answer.status_code == 200, pod.logs(name)
    assert answer.json()["env"] == {
        "MODE": "shop",
        "PYTHONPATH": "/nonexistent/junk",
        "PYTHONHOME": "/nonexistent/home",
        "PASS": "s3cret",
        "URL": "postgres://app:s3cret@db/shop",
        "MEM": "64",
    }
    assert "s3cret" not in pod.logs(name)
