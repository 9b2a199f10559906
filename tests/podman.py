"""The sidecar image under a real container runtime, run as a pod runs it.

`build_image()` builds ./Dockerfile unchanged with buildah (scripts/build-image,
which makes a local stand-in for python:3.12-slim where no registry is
reachable). `run_flags(container)` turns a container of a pod spec, as the
injection writes it, into `podman run` flags: the user, the capabilities, no
new privileges, the read-only root filesystem, the volumes, the memory limit.
A key of the spec it does not know how to honour fails the test, so a change
to what the injection writes cannot go untested here.

One difference is undone: podman gives a non-root user the added capabilities
as ambient (and so effective) ones, where containerd and CRI-O give them only
to the bounding set, and a non-root process of a pod holds none unless a
binary's file capabilities grant them. That leniency would hide exactly the
failure a real pod shows (a binary without its file capability), so a
non-root container's entrypoint is started through `setpriv` with no ambient
or inheritable capabilities: the image's own process then holds what a pod's
would.

What stays different from a kubelet: the containers share a network namespace
the test made (`--network ns:...`) instead of a pause container's; volumes are
directories the test fills as the kubelet would (a Secret's files 0644, an
emptyDir 0777); probes are run by the test, not by a kubelet; the runtime is
runc under podman, not containerd, with the default seccomp profile standing in
for RuntimeDefault.

podman here needs lowered rlimits (the machine lacks CAP_SYS_RESOURCE, so runc
cannot apply podman's defaults) and runc (crun refuses this machine's hybrid
cgroup layout).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.kube.envvars import ContainerConfigError, container_env

REPO = Path(__file__).resolve().parents[1]
PODMAN = ["podman", "--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
BASE_IMAGE = "docker.io/library/python:3.12-slim"
TAG = "localhost/offramp-sidecar:test"
BUILD_TIMEOUT = 1200


def require_podman() -> None:
    missing = [t for t in ("buildah", "podman", "debootstrap", "runc") if shutil.which(t) is None]
    reason = ""
    if os.geteuid() != 0:
        reason = "the image tests need root (buildah, podman)"
    elif missing:
        reason = (
            f"the image tests need {', '.join(missing)} "
            "(apt-get install buildah podman debootstrap runc)"
        )
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must provide it (.ci/run installs it)")
        pytest.skip(reason)


def build_image() -> str:
    done = subprocess.run(
        [str(REPO / "scripts/build-image"), TAG],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    if done.returncode != 0:
        raise AssertionError(f"scripts/build-image failed:\n{done.stdout}\n{done.stderr[-5000:]}")
    return done.stdout.strip().splitlines()[-1]


def podman(*args: str, check: bool = True, timeout: float = 60) -> str:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


_KNOWN_CONTAINER_KEYS = {
    "name", "image", "args", "ports", "volumeMounts", "readinessProbe", "resources",
    "securityContext", "env", "envFrom",
}  # fmt: skip


def run_flags(
    container: dict[str, Any],
    volumes: dict[str, Path],
    netns: str,
    image: str | None = None,
    annotations: dict[str, str] | None = None,
    objects: dict[tuple[str, str], dict[str, Any]] | None = None,
    pod_containers: list[dict[str, Any]] | None = None,
) -> list[str]:
    """`podman run` flags that give `container` what a kubelet would.

    `volumes` maps each mounted volume's name to the directory that holds it;
    `image` is needed for a non-root container (its entrypoint is wrapped);
    `annotations` are the pod's, for env fieldRefs to them (kubelet gives "" for
    a key the pod lacks); `objects` the ConfigMaps and Secrets its env names, by
    ("configmaps" | "secrets", name); `pod_containers` the pod's containers, for
    resourceFieldRefs to another one.
    """
    unknown = set(container) - _KNOWN_CONTAINER_KEYS
    assert not unknown, f"podman.run_flags does not honour container keys {sorted(unknown)}"
    flags = [*LIMITS, "--pull", "never", "--network", f"ns:/run/netns/{netns}"]
    security = container.get("securityContext") or {}
    flags += _security_flags(security)
    if security.get("runAsUser", 0) != 0:
        assert image is not None, "a non-root container's image is needed for its entrypoint"
        entrypoint = json.loads(
            podman("image", "inspect", "--format", "{{json .Config.Entrypoint}}", image)
        )
        wrapped = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--", *entrypoint]
        flags += ["--entrypoint", json.dumps(wrapped)]
    # The environment as kubelet makes it (tests.kube.envvars): ConfigMaps and
    # Secrets from `objects`, fieldRefs to the pod's name and annotations.
    fields = {f"metadata.annotations['{k}']": v for k, v in (annotations or {}).items()}
    fields["metadata.name"] = netns
    pod = {
        "metadata": {"namespace": "default", "annotations": annotations or {}},
        "spec": {"containers": pod_containers or [container]},
    }
    try:
        env = container_env(pod, container, lambda kind, name: (objects or {}).get((kind, name)),
                            fields)  # fmt: skip
    except ContainerConfigError as e:
        raise AssertionError(f"podman.run_flags: {e}") from e
    for name, value in env.items():
        flags += ["--env", f"{name}={value}"]
    for mount in container.get("volumeMounts") or []:
        mode = "ro" if mount.get("readOnly") else "rw"
        flags += ["-v", f"{volumes[mount['name']]}:{mount['mountPath']}:{mode}"]
    limits = (container.get("resources") or {}).get("limits") or {}
    unknown = set(limits) - {"memory", "cpu"}
    assert not unknown, f"podman.run_flags does not honour resource limits {sorted(unknown)}"
    if "memory" in limits:
        flags += ["--memory", _bytes(limits["memory"])]
    return flags


def _security_flags(security: dict[str, Any]) -> list[str]:
    flags: list[str] = []
    for key, value in security.items():
        match key:
            case "runAsUser":
                flags += ["--user", str(value)]
            case "runAsNonRoot":
                assert value is True
                assert "runAsUser" in security and security["runAsUser"] != 0
            case "readOnlyRootFilesystem":
                if value:
                    # podman would otherwise mount tmpfs at /tmp, /var/tmp and /run.
                    flags += ["--read-only", "--read-only-tmpfs=false"]
            case "allowPrivilegeEscalation":
                if value is False:
                    flags += ["--security-opt", "no-new-privileges"]
            case "capabilities":
                unknown = set(value) - {"drop", "add"}
                assert not unknown, f"capabilities keys {sorted(unknown)}"
                flags += [f"--cap-drop={cap}" for cap in value.get("drop") or []]
                flags += [f"--cap-add={cap}" for cap in value.get("add") or []]
            case "seccompProfile":
                # podman's default profile stands in for the runtime's default.
                assert value == {"type": "RuntimeDefault"}, value
            case _:
                raise AssertionError(f"podman.run_flags does not honour securityContext.{key}")
    return flags


def _bytes(quantity: str) -> str:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return str(int(quantity[: -len(suffix)]) * factor)
    return str(int(quantity))


def status_caps(pid: int) -> dict[str, int]:
    """A process's uid and capability sets, from /proc."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            out[key] = int(value.strip(), 16)
        elif key == "Uid":
            out["Uid"] = int(value.split()[1])  # effective
        elif key == "NoNewPrivs":
            out["NoNewPrivs"] = int(value.strip())
    return out
