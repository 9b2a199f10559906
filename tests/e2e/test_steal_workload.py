"""`offramp steal deploy/NAME` end to end: the real CLI, the emulated cluster, real
sidecars capturing with iptables inside the pods' network namespaces."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import NAMESPACE, SIDECAR_IMAGE, Cli, deployment, get, offramp, service
from tests.kube.cluster import Cluster
from tests.support import HttpApp, start_app

pytestmark = pytest.mark.timeout(240)
ALICE = {"x-preview": "alice"}
DEPLOY = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/api"
OPEN = "open (steal, port 8080"


@pytest.fixture
def local() -> Iterator[HttpApp]:
    a = start_app("local")
    yield a
    a.server.shutdown()
    a.server.server_close()


def check_every_endpoint(cluster: Cluster, n: int) -> None:
    endpoints = cluster.endpoints(NAMESPACE, "api")
    assert len(endpoints) == n, endpoints
    for ip, port in endpoints:
        stolen = get(ip, port, "/a", ALICE)
        assert stolen["served_by"] == "local", (ip, stolen)
        passed = get(ip, port, "/b", {"x-preview": "bob"})
        assert passed["served_by"] == "app", (ip, passed)
        # Through the sidecar (iptables capture): the app sees the sidecar's address.
        assert passed["peer"] == "127.0.0.1"


def test_steal_follows_every_replica_through_scale_and_rollout(
    cluster: Cluster, local: HttpApp, tmp_path: Path
) -> None:
    """Matching requests are stolen whichever of 3 (then 4) replicas serves them, the
    rest reach the app; a rollout during the session does not end it."""
    cluster.apply(deployment(replicas=3))
    cluster.apply(service())
    cluster.wait("3 app pods", lambda: len(cluster.ready_pods(NAMESPACE, app="api")) == 3)
    original = cluster.request("GET", DEPLOY)["spec"]["template"]
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
    cli = Cli(
        kubeconfig,
        "steal",
        "deploy/api",
        "--to",
        str(local.port),
        "--header",
        "^x-preview: alice$",
        "--image",
        SIDECAR_IMAGE,
    )
    try:
        cli.wait_for("rolling out deploy/api: 3/3 updated, 3/3 ready")
        cli.wait_count(OPEN, 3)
        check_every_endpoint(cluster, 3)

        cluster.patch(DEPLOY, [{"op": "replace", "path": "/spec/replicas", "value": 4}])
        cli.wait_for("joined (4 pods)")
        cli.wait_count(OPEN, 4)
        check_every_endpoint(cluster, 4)

        # A rollout (a new template) replaces every pod; the session follows.
        before = {p["metadata"]["name"] for p in cluster.pods(NAMESPACE, app="api")}
        cluster.patch(
            DEPLOY,
            [
                {
                    "op": "add",
                    "path": "/spec/template/metadata/annotations/restartedAt",
                    "value": "now",
                }
            ],
        )

        def rolled() -> bool:
            pods = cluster.ready_pods(NAMESPACE, app="api")
            return len(pods) == 4 and not before & {p["metadata"]["name"] for p in pods}

        cluster.wait("the rollout", rolled, timeout=120)
        cli.wait_count(OPEN, 8)
        check_every_endpoint(cluster, 4)
        assert cli.proc.poll() is None
        assert len(local.seen) == 3 + 4 + 4
        assert all(
            ("x-preview", "alice") in [(k.lower(), v) for k, v in s.headers] for s in local.seen
        )
    finally:
        code = cli.stop()
    assert code == 0, "\n".join(cli.lines)
    assert cli.lines[-1].startswith("offramp: session ended: 11 stolen")

    # The sidecar stays; the next steal finds it injected and starts at once.
    again = Cli(
        kubeconfig, "steal", "deploy/api", "--to", str(local.port), "--image", SIDECAR_IMAGE
    )
    try:
        again.wait_for("the sidecar is already injected")
        again.wait_count(OPEN, 4)
    finally:
        again.stop()

    status = offramp(kubeconfig, "status", "deploy/api")
    assert status.returncode == 0, status.stderr
    assert "deploy/api: injected (image offramp/sidecar:test, capture iptables" in status.stdout
    assert "4 of 4 pods have a ready sidecar" in status.stdout

    done = offramp(kubeconfig, "uninject", "deploy/api")
    assert done.returncode == 0, done.stderr
    restored = cluster.request("GET", DEPLOY)["spec"]["template"]
    assert json.dumps(restored, sort_keys=True) == json.dumps(
        {**original, "metadata": {**original["metadata"], "annotations": {"restartedAt": "now"}}},
        sort_keys=True,
    )
