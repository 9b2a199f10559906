"""Pure decisions about a workload: which ports a session filters, whether a pod
of the rollout cannot start."""

from __future__ import annotations

import jsonpatch
import pytest

from local_proxy.cluster.workload import (
    TargetError,
    declared_ports,
    fronted_ports,
    rollout_failure,
    session_pods,
    session_ports,
)
from sidecar.inject.patch import ANNOTATION, SIDECAR_NAME, InjectOptions, inject


def template(*ports: int, udp: int | None = None) -> dict[str, object]:
    declared: list[dict[str, object]] = [{"containerPort": p} for p in ports]
    if udp:
        declared.append({"containerPort": udp, "protocol": "UDP"})
    return {"spec": {"containers": [{"name": "app", "image": "a:1", "ports": declared}]}}


def test_an_injection_fronts_every_declared_tcp_port() -> None:
    t = template(8080, 9090, udp=5353)
    injected = jsonpatch.apply_patch(t, inject(t, InjectOptions(image="s:1")))
    assert declared_ports(t, None) == [8080, 9090]
    assert fronted_ports(injected) == [8080, 9090]
    assert fronted_ports(t) == []


@pytest.mark.parametrize(
    ("wanted", "kept", "missing"),
    [
        (None, None, []),
        ((), None, []),
        ((8080,), (8080,), []),
        ((80, 8080), (8080,), [80]),
        ((9090, 80, 8080), (9090, 8080), [80]),
    ],
)
def test_ports_to_filter_that_are_not_served_are_left_out(
    wanted: tuple[int, ...] | None, kept: tuple[int, ...] | None, missing: list[int]
) -> None:
    assert session_ports(wanted, [8080, 9090]) == (kept, missing)


def test_none_of_the_ports_to_filter_served_is_an_error_that_names_both() -> None:
    with pytest.raises(
        TargetError, match=r"fronts port 8080, and none of the ports to filter \(80, 81\)"
    ):
        session_ports((80, 81), [8080])


def _pod(record: str | None, statuses: list[dict[str, object]], deleting: bool = False) -> dict:
    meta: dict[str, object] = {
        "name": "api-1",
        "annotations": {ANNOTATION: record} if record else {},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"containerStatuses": statuses}}


TEMPLATE = {"metadata": {"annotations": {ANNOTATION: "new"}}}
CRASH = {
    "name": SIDECAR_NAME,
    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
    "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
}


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        (_pod("new", [CRASH]), ("offramp-sidecar", "CrashLoopBackOff", 1, True)),
        (
            _pod("new", [{"name": "api", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]),
            ("api", "ImagePullBackOff", None, False),
        ),
        (
            _pod("new", [{"name": SIDECAR_NAME, "state": {"terminated": {"exitCode": 2}}}]),
            ("offramp-sidecar", "Error", 2, True),
        ),
        # The app exiting once while it starts is not yet a failure; the old
        # template's pods and pods on their way out are not this rollout's.
        (_pod("new", [{**CRASH, "name": "api", "state": {"running": {}}}]), None),
        (_pod("old", [CRASH]), None),
        (_pod(None, [CRASH]), None),
        (_pod("new", [CRASH], deleting=True), None),
        (
            _pod("new", [{"name": "api", "state": {"waiting": {"reason": "ContainerCreating"}}}]),
            None,
        ),
    ],
)
def test_a_pod_of_the_rollout_that_cannot_start(pod: dict, expected: tuple | None) -> None:
    failure = rollout_failure(TEMPLATE, [pod])
    if expected is None:
        assert failure is None
    else:
        assert failure is not None
        assert (failure.container, failure.reason, failure.exit_code, failure.crashed) == expected


def _running(name: str, ready: bool, deleting: bool = False, phase: str = "Running") -> dict:
    meta: dict[str, object] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "spec": {
            "containers": [
                {
                    "name": SIDECAR_NAME,
                    "ports": [{"name": "offramp-control", "containerPort": 15081}],
                }
            ]
        },
        "status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_a_terminating_pod_keeps_its_session_while_it_runs_but_none_joins() -> None:
    pods = [
        _running("ready", True),
        _running("unready", False),
        _running("terminating", False, deleting=True),
        _running("gone", False, deleting=True, phase="Succeeded"),
    ]
    assert session_pods(pods) == {"ready": 15081}
    kept = session_pods(pods, keep={"ready", "terminating", "gone", "unready"})
    assert kept == {"ready": 15081, "terminating": 15081, "unready": 15081}
