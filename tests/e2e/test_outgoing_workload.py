"""`offramp steal deploy/NAME -- CMD` with outgoing traffic: CMD's connections leave
from a pod of the workload, reached through the Kubernetes port-forward."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import NAMESPACE, SIDECAR_IMAGE, Cli, deployment, get, offramp
from tests.kube.cluster import Cluster
from tests.support import free_port

pytestmark = pytest.mark.timeout(240)

# CMD: listens on --to for stolen requests; asks for the pod's own app (its
# loopback: only through the pod, and only when named) and for the laptop's
# nothing-there loopback port; prints what it got, then waits to be ended.
CMD = """
import json, socket, sys, threading, time, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"pod": "local", "peer": self.client_address[0],
                           "served_by": "local"}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
threading.Thread(target=server.serve_forever, daemon=True).start()
result = {}
for name, port in (("named", 8080), ("unnamed", 8081)):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/from-cmd", timeout=10) as r:
            result[name] = json.loads(r.read())
    except Exception as e:
        result[name] = type(e).__name__
print("RESULT " + json.dumps(result), flush=True)
time.sleep(300)
"""


def _workload(cluster: Cluster, tmp_path: Path, workload: dict[str, Any]) -> Path:
    """Apply `workload`, wait for its pods to be ready; the user's kubeconfig."""
    replicas = workload["spec"]["replicas"]
    cluster.apply(workload)
    cluster.wait(f"{replicas} app pod(s)",
                 lambda: len(cluster.ready_pods(NAMESPACE, app="api")) == replicas)  # fmt: skip
    return cluster.kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)


def test_cmd_reaches_the_pods_loopback_when_it_names_it(cluster: Cluster, tmp_path: Path) -> None:
    """--remote 127.0.0.1:8080: CMD's request to its 127.0.0.1:8080 is dialed by the
    sidecar inside a pod of the workload and answered by that pod's app; a loopback
    port nobody named stays CMD's own (nothing listens: refused). Stolen requests
    still reach CMD inside its namespace."""
    kubeconfig = _workload(cluster, tmp_path, deployment(replicas=1))
    port = free_port()
    cli = Cli(kubeconfig, "steal", "deploy/api", "--to", str(port), "--path", "^/mine",
              "--image", SIDECAR_IMAGE, "--remote", "127.0.0.1:8080", "--",
              sys.executable, "-c", CMD, str(port))  # fmt: skip
    try:
        line = cli.wait_for("RESULT ")
        result = json.loads(line.split("RESULT ", 1)[1])
        pod = cluster.ready_pods(NAMESPACE, app="api")[0]
        assert result["named"]["pod"] == pod["metadata"]["name"], cli.lines
        assert result["named"]["peer"] == "127.0.0.1"
        assert result["unnamed"] == "URLError", result
        cli.wait_for("open (steal, port 8080")
        mine = get(pod["status"]["podIP"], 8080, "/mine")
        assert mine["served_by"] == "local" and mine["peer"] == "127.0.0.1"
        status = offramp(kubeconfig, "status", "deploy/api").stdout
        assert "outgoing (tcp+udp+dns) by " in status and "1 connection(s) from the pod" in status
        assert "steal by " in status, status
    finally:
        code = cli.stop()
    assert code == 128 + 15, "\n".join(cli.lines)  # CMD ended by offramp's SIGTERM
    assert any("outgoing: 1 connection(s) through the pod" in line for line in cli.lines)


def test_offramp_proxy_for_a_workload(cluster: Cluster, tmp_path: Path) -> None:
    """`offramp proxy deploy/NAME`: injects as steal does, takes no request, and
    serves a proxy whose connections leave from a pod of the workload."""
    import subprocess

    kubeconfig = _workload(cluster, tmp_path, deployment(replicas=1))
    port = free_port()
    cli = Cli(kubeconfig, "proxy", "deploy/api", "--listen", str(port), "--image",
              SIDECAR_IMAGE, "--remote", "127.0.0.1:8080")  # fmt: skip
    try:
        cli.wait_for(f"export HTTP_PROXY=http://127.0.0.1:{port}")
        done = subprocess.run(
            ["curl", "-sS", "-m", "20", "-x", f"socks5h://127.0.0.1:{port}",
             "http://127.0.0.1:8080/via-proxy"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        pod = cluster.ready_pods(NAMESPACE, app="api")[0]
        assert json.loads(done.stdout)["pod"] == pod["metadata"]["name"], done
        assert not any("open (steal" in line for line in cli.lines)
    finally:
        assert cli.stop() == 0, "\n".join(cli.lines)


def test_the_admins_allow_list_annotation_narrows_what_a_session_reaches(
    cluster: Cluster, tmp_path: Path
) -> None:
    """offramp.dev/outgoing-allow on the pod template reaches the injected sidecar
    (a fieldRef env): even a destination the developer names is refused when the
    list does not have it."""
    workload = deployment(replicas=1)
    workload["spec"]["template"]["metadata"]["annotations"] = {
        "offramp.dev/outgoing-allow": "10.0.0.0/8, payment-service"
    }
    kubeconfig = _workload(cluster, tmp_path, workload)
    port = free_port()
    cli = Cli(kubeconfig, "steal", "deploy/api", "--to", str(port), "--path", "^/mine",
              "--image", SIDECAR_IMAGE, "--remote", "127.0.0.1:8080", "--",
              sys.executable, "-c", CMD, str(port))  # fmt: skip
    try:
        line = cli.wait_for("RESULT ")
        result = json.loads(line.split("RESULT ", 1)[1])
        assert result["named"] in ("ConnectionResetError", "RemoteDisconnected"), result
    finally:
        cli.stop()
    assert any("0 connection(s) through the pod" in line and "1 failed" in line
               for line in cli.lines), cli.lines  # fmt: skip
    log = "".join(text for key, text in cluster.logs().items() if "offramp-sidecar" in key)
    assert "is not on this pod's outgoing allow-list (10.0.0.0/8, payment-service)" in log, log


# CMD for the test below: each stolen request makes one outgoing request to the
# pod's app (named with --remote) and answers with the pod that served it.
RELAY_CMD = """
import json, sys, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            with urllib.request.urlopen("http://127.0.0.1:8080/from-cmd", timeout=10) as r:
                via = json.loads(r.read())["pod"]
        except Exception as e:
            via = type(e).__name__
        body = json.dumps({"served_by": "local", "outgoing_via": via})
        data = body.encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data)))
        self.end_headers(); self.wfile.write(data)
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_outgoing_traffic_moves_to_another_pod_when_its_pod_goes(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The session for outgoing traffic runs through one ready pod; when that pod is
    deleted it reconnects through another, and CMD's next connection works."""
    kubeconfig = _workload(cluster, tmp_path, deployment(replicas=2))
    port = free_port()
    cli = Cli(kubeconfig, "steal", "deploy/api", "--to", str(port), "--path", "^/mine",
              "--image", SIDECAR_IMAGE, "--remote", "127.0.0.1:8080", "--",
              sys.executable, "-c", RELAY_CMD, str(port))  # fmt: skip
    try:
        cli.wait_count("open (steal, port 8080", 2)
        pods = cluster.ready_pods(NAMESPACE, app="api")
        first = get(pods[0]["status"]["podIP"], 8080, "/mine")
        via = first["outgoing_via"]
        assert via in {p["metadata"]["name"] for p in pods}, first
        cluster.request("DELETE", f"/api/v1/namespaces/{NAMESPACE}/pods/{via}")
        cluster.wait("the pod gone", lambda: via not in {
            p["metadata"]["name"] for p in cluster.pods(NAMESPACE, app="api")})  # fmt: skip
        survivor = next(p for p in pods if p["metadata"]["name"] != via)
        deadline = time.monotonic() + 60
        while True:
            answer = get(survivor["status"]["podIP"], 8080, "/mine")
            if answer["outgoing_via"] not in (via, "URLError", "RemoteDisconnected",
                                              "ConnectionResetError"):  # fmt: skip
                break
            assert time.monotonic() < deadline, (answer, cli.lines)
            time.sleep(0.5)
        assert answer["outgoing_via"] != via
    finally:
        cli.stop()
