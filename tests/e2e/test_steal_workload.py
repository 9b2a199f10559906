"""`offramp steal deploy/NAME` end to end: the real CLI, the emulated cluster, real
sidecars capturing with iptables inside the pods' network namespaces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    BROKEN_SIDECAR_IMAGE,
    NAMESPACE,
    SIDECAR_IMAGE,
    Cli,
    deployment,
    get,
    offramp,
    service,
)
from tests.kube.cluster import Cluster
from tests.support import HttpApp, free_port, start_app

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

    # The sidecar stays; the next steal finds it injected and starts at once, with
    # the image it has. A mirrord config whose http_filter.ports lists a port the
    # workload does not serve filters the ports it does serve; other ports to
    # filter are a session's matter and restart nothing.
    config = tmp_path / "mirrord.json"
    config.write_text(
        '{"feature": {"network": {"incoming": {"mode": "steal", "http_filter": '
        '{"header_filter": "^x-preview: alice$", "ports": [80, 8080]}}}}}'
    )
    generation = cluster.request("GET", DEPLOY)["metadata"]["generation"]
    for args in (["-f", str(config)], ["--port", "8080"]):
        again = Cli(kubeconfig, "steal", "deploy/api", "--to", str(local.port), *args)
        try:
            again.wait_for("the sidecar is already injected")
            if args[0] == "-f":
                again.wait_for("deploy/api serves no port 80; filtering port 8080")
            again.wait_count(OPEN, 4)
        finally:
            again.stop()
    assert cluster.request("GET", DEPLOY)["metadata"]["generation"] == generation

    status = offramp(kubeconfig, "status", "deploy/api")
    assert status.returncode == 0, status.stderr
    assert "deploy/api: injected (image offramp/sidecar:test, capture iptables" in status.stdout
    assert "4 of 4 pods have a ready sidecar" in status.stdout

    done = offramp(kubeconfig, "uninject", "deploy/api")
    assert done.returncode == 0, done.stderr
    assert (
        "the token Secret offramp-token-deploy-api stays (the offramp-user role may not delete "
        "Secrets); remove it with: kubectl -n shop delete secret offramp-token-deploy-api"
    ) in done.stdout
    restored = cluster.request("GET", DEPLOY)["spec"]["template"]
    assert json.dumps(restored, sort_keys=True) == json.dumps(
        {**original, "metadata": {**original["metadata"], "annotations": {"restartedAt": "now"}}},
        sort_keys=True,
    )


def test_privilege_free_mode_is_chosen_where_podsecurity_forbids_net_admin(
    cluster: Cluster, local: HttpApp, tmp_path: Path
) -> None:
    """In a namespace that enforces PodSecurity baseline the sidecar gets no NET_ADMIN:
    it takes over the Service's named targetPort, and kubelet probes still reach the
    app directly on the renamed port."""
    cluster.patch(
        f"/api/v1/namespaces/{NAMESPACE}",
        [
            {
                "op": "add",
                "path": "/metadata/labels",
                "value": {"pod-security.kubernetes.io/enforce": "baseline"},
            }
        ],
    )
    cluster.apply(deployment(replicas=2))
    cluster.apply(service(target="http"))
    cluster.wait("2 app pods", lambda: len(cluster.ready_pods(NAMESPACE, app="api")) == 2)
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
    cli = Cli(kubeconfig, "steal", "deploy/api", "--to", str(local.port), "--image", SIDECAR_IMAGE)
    try:
        line = cli.wait_for("injecting the sidecar")
        assert "enforces PodSecurity 'baseline', which forbids NET_ADMIN, port http" in line
        cli.wait_count(OPEN, 2)
        pods = cluster.ready_pods(NAMESPACE, app="api")
        for pod in pods:
            app, sidecar = pod["spec"]["containers"]
            assert app["ports"] == [{"name": "app-8080", "containerPort": 8080}]
            assert app["readinessProbe"]["httpGet"]["port"] == "app-8080"
            assert "NET_ADMIN" not in str(sidecar["securityContext"])
            assert sidecar["ports"][0]["name"] == "http"
        endpoints = cluster.endpoints(NAMESPACE, "api")
        assert sorted(port for _, port in endpoints) == [15080, 15080]
        for ip, port in endpoints:
            # No filter: every request is stolen, except a kubelet probe.
            assert get(ip, port, "/x")["served_by"] == "local"
            probe = get(ip, port, "/ready", {"User-Agent": "kube-probe/1.30"})
            assert probe["served_by"] == "app"
            # The kubelet's own probes go to the app's renamed port, past the sidecar.
            direct = get(ip, 8080, "/ready", {"User-Agent": "kube-probe/1.30"})
            assert direct["served_by"] == "app" and direct["peer"] == cluster.kubelet.node_ip
    finally:
        assert cli.stop() == 0, "\n".join(cli.lines)


def test_a_command_after_the_double_dash_runs_for_the_session(
    cluster: Cluster, tmp_path: Path
) -> None:
    """`offramp steal ... -- CMD`: the session starts once CMD listens on --to and
    ends when CMD exits, with CMD's exit code."""
    cluster.apply(deployment(replicas=1))
    cluster.wait("the app pod", lambda: len(cluster.ready_pods(NAMESPACE, app="api")) == 1)
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
    port = free_port()
    cli = Cli(
        kubeconfig,
        "steal",
        "deploy/api",
        "--to",
        str(port),
        "--path",
        "^/mine",
        "--image",
        SIDECAR_IMAGE,
        "--",
        sys.executable,
        "-m",
        "tests.kube.app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    )
    cli.wait_for(f"listens on 127.0.0.1:{port}")
    cli.wait_count(OPEN, 1)
    pod = cluster.ready_pods(NAMESPACE, app="api")[0]
    ip = pod["status"]["podIP"]
    mine = get(ip, 8080, "/mine")
    assert mine["pod"] != pod["metadata"]["name"] and mine["peer"] == "127.0.0.1"
    assert get(ip, 8080, "/other")["pod"] == pod["metadata"]["name"]
    # The local process ends (as a developer's Ctrl-C in its own terminal would end it).
    found = subprocess.run(["pgrep", "-P", str(cli.proc.pid)], capture_output=True, text=True)
    (pid,) = found.stdout.split()
    os.kill(int(pid), signal.SIGTERM)
    assert cli.finish() == 128 + signal.SIGTERM
    assert "offramp: session ended: 1 stolen, 0 mirrored" in cli.lines
    assert get(ip, 8080, "/mine")["pod"] == pod["metadata"]["name"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rs/api"], "cannot use 'rs/api' as a target: write KIND/NAME with KIND one of deploy"),
        (["deploy/nope"], "no deployment 'nope' in namespace 'shop'; deployments there: api"),
        (["sts/api"], "no statefulset 'api' in namespace 'shop'; statefulsets there: none"),
        (
            ["deploy/api", "--port", "9090"],
            "the sidecar fronts port 8080, and none of the ports to filter (9090)",
        ),
        (
            ["deploy/api", "--no-iptables"],
            "Service 'api' targets port 8080 by number. Name the port in the container",
        ),
        (
            ["deploy/api", "-n", "other"],
            'deployments "api" is forbidden: User "developer" cannot get resource "deployments" '
            'in API group "apps" in the namespace "other" (ask a cluster admin to bind the '
            "offramp-user ClusterRole",
        ),
    ],
    ids=[
        "unknown kind",
        "missing object",
        "missing kind",
        "no such port",
        "numbered targetPort",
        "forbidden",
    ],
)
def test_what_cannot_work_is_refused_with_what_exists(
    cluster: Cluster, tmp_path: Path, args: list[str], message: str
) -> None:
    cluster.apply(deployment(replicas=1, port_name=None))
    cluster.apply(service(target=8080))
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
    done = offramp(kubeconfig, "steal", *args, "--to", "9", "--image", SIDECAR_IMAGE)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    # Nothing was changed on the way to the refusal.
    template = cluster.request("GET", DEPLOY)["spec"]["template"]
    assert "annotations" not in template["metadata"]


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (
            BROKEN_SIDECAR_IMAGE,
            [
                "container offramp-sidecar: CrashLoopBackOff, exit code 1",
                "its last log lines:",
                "cannot capture the pod's traffic",
                "bounding set",
            ],
        ),
        ("registry.corp/team/offramp-sidecar:typo", ["container offramp-sidecar: ErrImagePull"]),
    ],
    ids=["sidecar crashes", "image cannot be pulled"],
)
def test_a_pod_that_cannot_start_ends_the_rollout_wait_with_its_reason(
    cluster: Cluster, local: HttpApp, tmp_path: Path, image: str, expected: list[str]
) -> None:
    cluster.apply(deployment(replicas=2))
    cluster.wait("2 app pods", lambda: len(cluster.ready_pods(NAMESPACE, app="api")) == 2)
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
    started = time.monotonic()
    done = offramp(kubeconfig, "steal", "deploy/api", "--to", str(local.port), "--image", image)
    took = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    assert took < 30, f"{took:.0f} s: the failing pod was not noticed ({done.stderr})"
    assert "deploy/api: a new pod cannot start: pod api-" in done.stderr
    for text in expected:
        assert text in done.stderr, done.stderr
    assert "deploy/api is still injected: undo it with 'offramp uninject deploy/api -n shop'" in (
        done.stderr
    )
    # The old pods keep serving; a good image rolls out over the broken one.
    cli = Cli(kubeconfig, "steal", "deploy/api", "--to", str(local.port), "--image", SIDECAR_IMAGE)
    try:
        cli.wait_for("re-injecting the sidecar")
        cli.wait_count(OPEN, 2)
    finally:
        assert cli.stop() == 0, "\n".join(cli.lines)


def test_ctrl_c_during_the_rollout_says_it_was_interrupted_and_what_state_is_left(
    cluster: Cluster, local: HttpApp, tmp_path: Path
) -> None:
    cluster.apply(deployment(replicas=2))
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
    cli = Cli(kubeconfig, "steal", "deploy/api", "--to", str(local.port), "--image", SIDECAR_IMAGE)
    cli.wait_for("injecting the sidecar")
    code = cli.stop()
    out = "\n".join(cli.lines)
    assert code == 1, out
    assert "interrupted while rolling out deploy/api" in out, out
    assert "did not finish" not in out
    assert "deploy/api is still injected: undo it with 'offramp uninject deploy/api -n shop'" in out


def test_without_an_image_nothing_is_changed_and_the_user_is_told_how_to_set_one(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.apply(deployment(replicas=1))
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
    for image in ([], ["--image", "registry.example/offramp-sidecar:0.1.0"]):
        done = offramp(kubeconfig, "steal", "deploy/api", "--to", "9", *image)
        assert done.returncode == 1, done.stderr
        assert "no sidecar image is set, and there is no public one" in done.stderr
        assert "offramp set-image IMAGE" in done.stderr and "Nothing was changed" in done.stderr
        if image:
            assert "is the documentation's placeholder" in done.stderr
        template = cluster.request("GET", DEPLOY)["spec"]["template"]
        assert "annotations" not in template["metadata"]

    done = offramp(kubeconfig, "set-image", SIDECAR_IMAGE)
    assert done.returncode == 0, done.stderr
    config = kubeconfig.parent / "xdg/offramp/config.json"
    assert json.loads(config.read_text()) == {"sidecar_image": SIDECAR_IMAGE}
    cli = Cli(kubeconfig, "steal", "deploy/api", "--to", "9")
    try:
        cli.wait_for("injecting the sidecar")
        cli.wait_for(OPEN)
    finally:
        cli.stop()
    sidecar = cluster.request("GET", DEPLOY)["spec"]["template"]["spec"]["containers"][1]
    assert sidecar["image"] == SIDECAR_IMAGE


def test_a_developer_who_may_not_port_forward_is_told_so(
    cluster: Cluster, local: HttpApp, tmp_path: Path
) -> None:
    """Without `create` on pods/portforward (what the API server asks for a websocket
    port-forward since 1.30) the command ends with the API server's reason."""
    rules = cluster.users[cluster.developer_token].bindings[NAMESPACE]
    rules[:] = [
        {**r, "verbs": ["get"]} if r["resources"] == ["pods/portforward"] else r for r in rules
    ]
    cluster.apply(deployment(replicas=1))
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
    done = offramp(kubeconfig, "steal", "deploy/api", "--to", str(local.port),
                   "--image", SIDECAR_IMAGE, timeout=90)  # fmt: skip
    assert done.returncode == 1
    assert 'cannot create resource "pods/portforward" in API group ""' in done.stderr
    assert "bind the offramp-user ClusterRole" in done.stderr


def test_a_pod_joins_alone_and_a_pod_without_sidecar_is_refused(
    cluster: Cluster, local: HttpApp, tmp_path: Path
) -> None:
    """pod/NAME: a pod of an injected workload is stolen from alone; a pod without
    the sidecar cannot get one (its containers are immutable) and the CLI says so."""
    cluster.apply(deployment(replicas=2))
    cluster.wait("2 app pods", lambda: len(cluster.ready_pods(NAMESPACE, app="api")) == 2)
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
    bare = cluster.pods(NAMESPACE, app="api")[0]["metadata"]["name"]
    done = offramp(kubeconfig, "steal", f"pod/{bare}", "--to", str(local.port))
    assert done.returncode == 1
    assert f"pod {bare} has no offramp sidecar" in done.stderr

    whole = Cli(
        kubeconfig, "steal", "deploy/api", "--to", str(local.port), "--image", SIDECAR_IMAGE
    )
    whole.wait_count(OPEN, 2)
    whole.stop()
    pod = cluster.ready_pods(NAMESPACE, app="api")[0]
    one = Cli(kubeconfig, "steal", f"pod/{pod['metadata']['name']}", "--to", str(local.port))
    try:
        one.wait_count(OPEN, 1)
        assert one.count_now("joined") == 1
        assert get(pod["status"]["podIP"], 8080, "/x")["served_by"] == "local"
    finally:
        assert one.stop() == 0


def test_a_statefulset_is_stolen_from_and_uninjected(
    cluster: Cluster, local: HttpApp, tmp_path: Path
) -> None:
    """sts/NAME: the controller replaces its pods one at a time, highest ordinal
    first; the session covers both once they are back, and uninject restores it."""
    sts = deployment(replicas=2)
    sts["kind"] = "StatefulSet"
    sts["spec"]["serviceName"] = "api"
    cluster.apply(sts)
    cluster.apply(service())
    cluster.wait("2 app pods", lambda: len(cluster.ready_pods(NAMESPACE, app="api")) == 2)
    path = f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/api"
    original = cluster.request("GET", path)["spec"]["template"]
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
    cli = Cli(kubeconfig, "steal", "statefulset/api", "--to", str(local.port),
              "--header", "^x-preview: alice$", "--image", SIDECAR_IMAGE)  # fmt: skip
    try:
        cli.wait_for("rolling out sts/api: 2/2 updated, 2/2 ready")
        cli.wait_count(OPEN, 2)
        assert sorted(p["metadata"]["name"] for p in cluster.pods(NAMESPACE, app="api")) == [
            "api-0",
            "api-1",
        ]
        check_every_endpoint(cluster, 2)
    finally:
        assert cli.stop() == 0
    done = offramp(kubeconfig, "uninject", "sts/api")
    assert done.returncode == 0, done.stdout + done.stderr
    assert cluster.request("GET", path)["spec"]["template"] == original
