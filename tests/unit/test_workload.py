"""Pure decisions about a workload: which ports a session filters."""

from __future__ import annotations

import jsonpatch
import pytest

from local_proxy.workload import TargetError, declared_ports, fronted_ports, session_ports
from sidecar.inject import InjectOptions, inject


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
