"""`offramp steal -f mirrord.json -- CMD`: CMD gets the app container's environment
as kubelet resolved it in the pod (ConfigMaps and Secrets by envFrom and by key,
fieldRefs, resourceFieldRefs, `$(VAR)` references), chosen by the file's
feature.env, without offramp reading any Secret but its token; the target comes
from the file too."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from dotenv import dotenv_values

from local_proxy.env import EnvConfig
from tests.e2e.conftest import NAMESPACE, SIDECAR_IMAGE, Cli, deployment, get, offramp
from tests.kube.cluster import Cluster
from tests.support import free_port

pytestmark = pytest.mark.timeout(240)

DEPLOY = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/api"
SECRET = "s3cret-7d1e"

# CMD: prints its environment and network namespace, then serves stolen requests
# until it is ended.
CMD = """
import json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"served_by": "local"}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("RESULT " + json.dumps({"env": dict(os.environ),
                               "netns": os.readlink("/proc/self/ns/net")}), flush=True)
time.sleep(300)
"""

ENV: list[dict[str, Any]] = [
    {"name": "GREETING", "value": "hello"},
    {"name": "DB_USER", "valueFrom": {"secretKeyRef": {"name": "db", "key": "user"}}},
    {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
    {"name": "DB_URL", "value": "postgres://$(DB_USER):$(DB_PASSWORD)@db:5432/$(FEATURE_X)"},
    {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "LOG_LEVEL"}}},
    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    {
        "name": "MEM_MIB",
        "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
    },
    {"name": "LITERAL", "value": "$$(GREETING) and $(UNDEFINED) cost $5"},
    # Junk that would stop the sidecar's Python, were the copy not prefixed.
    {"name": "PYTHONPATH", "value": "/nonexistent/junk"},
    {"name": "PYTHONHOME", "value": "/nonexistent/home"},
    {"name": "AWS_PROFILE", "value": "pod"},
    {"name": "MODE", "value": "pod"},
]
ENV_FROM = [
    {"configMapRef": {"name": "settings"}},
    {"configMapRef": {"name": "extra"}, "prefix": "CFG_"},
    {"secretRef": {"name": "db"}, "prefix": "SECRET_"},
]
FILE_ENV = {"exclude": "LOG_*", "override": {"MODE": "local"}, "unset": ["AWS_PROFILE"]}
RUNTIME = ("HOSTNAME", "PATH", "PYTHONUNBUFFERED")
"""What the emulator's runtime sets in every container, not the pod spec."""


def _apply_app(cluster: Cluster) -> None:
    meta = {"namespace": NAMESPACE}
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "settings", **meta},
            "data": {"FEATURE_X": "on", "LOG_LEVEL": "debug", "1st": "no variable name"},
        }
    )
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "extra", **meta},
            "data": {"A": "1"},
        }
    )
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", **meta},
                   "stringData": {"user": "app", "password": SECRET}})  # fmt: skip
    workload = deployment(replicas=1)
    app = workload["spec"]["template"]["spec"]["containers"][0]
    # -E: the app's own Python ignores PYTHONPATH and PYTHONHOME, as a Go or Java
    # app would; the sidecar's would not.
    app["command"] = [sys.executable, "-E", "-m", "tests.kube.app"]
    app["env"], app["envFrom"] = ENV, ENV_FROM
    app["resources"] = {"limits": {"memory": "128Mi"}}
    cluster.apply(workload)
    cluster.wait("the app pod", lambda: len(cluster.ready_pods(NAMESPACE, app="api")) == 1)


def test_cmd_gets_the_app_containers_environment(cluster: Cluster, tmp_path: Path) -> None:
    _apply_app(cluster)
    original = cluster.request("GET", DEPLOY)["spec"]["template"]
    pod = cluster.ready_pods(NAMESPACE, app="api")[0]
    in_pod = get(pod["status"]["podIP"], 8080, "/__env")["env"]
    assert in_pod.get("DB_URL") == f"postgres://app:{SECRET}@db:5432/on", (pod, in_pod)
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
    config = tmp_path / "mirrord.json"
    config.write_text(json.dumps({
        "target": {"path": "deployment/api", "namespace": NAMESPACE},
        "feature": {"env": FILE_ENV,
                    "network": {"incoming": {"mode": "steal",
                                             "http_filter": {"path_filter": "^/mine"}}}},
    }))  # fmt: skip
    env_file = tmp_path / "api.env"
    port = free_port()
    cli = Cli(kubeconfig, "steal", "-f", str(config), "--to", str(port), "--image", SIDECAR_IMAGE,
              "--env-file", str(env_file), "--", sys.executable, "-c", CMD, str(port))  # fmt: skip
    try:
        result = json.loads(cli.wait_for("RESULT ").split("RESULT ", 1)[1])
        # In a network namespace of its own (outgoing is on): the environment went
        # through the namespace helper.
        assert result["netns"] != os.readlink("/proc/self/ns/net")
        cmd_env = result["env"]
        cli.wait_for("open (steal, port 8080")
        pod = cluster.ready_pods(NAMESPACE, app="api")[0]
        # The injected pod's app: the sidecar's copy did not change what the app sees.
        in_pod = get(pod["status"]["podIP"], 8080, "/__env")["env"]
        from_spec = {k: v for k, v in in_pod.items() if k not in RUNTIME}
        assert from_spec["POD_NAME"] == pod["metadata"]["name"]
        assert from_spec["POD_IP"] == pod["status"]["podIP"]
        assert from_spec["MEM_MIB"] == "128"
        assert from_spec["LITERAL"] == "$(GREETING) and $(UNDEFINED) cost $5"
        assert from_spec["CFG_A"] == "1" and from_spec["SECRET_password"] == SECRET
        assert "1st" not in from_spec, "not a variable name: kubelet skips it"
        # CMD sees each of them as the container does, less what feature.env says.
        wanted = EnvConfig(exclude=("LOG_*",), override={"MODE": "local"}, unset=("AWS_PROFILE",))
        expected = wanted.environment(os.environ, from_spec)
        assert {k: cmd_env.get(k) for k in expected} == expected
        assert "AWS_PROFILE" not in cmd_env and "LOG_LEVEL" not in cmd_env
        assert "1st" not in cmd_env
        assert cmd_env["LEVEL"] == "debug" and cmd_env["MODE"] == "local"
        assert cmd_env.get("PYTHONPATH") == os.environ.get("PYTHONPATH"), "machine paths stay"
        assert cmd_env["PATH"] == os.environ["PATH"]
        # --env-file: the same choice, for an IDE; private.
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        assert dotenv_values(env_file, interpolate=False) == wanted.for_file(from_spec)
        # Stolen requests still reach CMD.
        assert get(pod["status"]["podIP"], 8080, "/mine")["served_by"] == "local"
        # Names, never values, in what offramp prints.
        status = offramp(kubeconfig, "status", "deploy/api").stdout
        assert "the app's environment: " in status and "DB_PASSWORD" in status, status
        own = [line for line in cli.lines if not line.startswith("RESULT ")]
        assert SECRET not in status and SECRET not in "\n".join(own)
    finally:
        code = cli.stop()
    assert code == 128 + 15, "\n".join(cli.lines)  # CMD ended by offramp's SIGTERM
    # offramp read no Secret but its token, and no ConfigMap.
    read = {(r.verb, r.resource, r.name) for user, r in cluster.api.requests
            if user != "admin" and r.resource in ("secrets", "configmaps")}  # fmt: skip
    assert read == {("get", "secrets", "offramp-token-deploy-api"),
                    ("create", "secrets", "")}, read  # fmt: skip
    assert offramp(kubeconfig, "uninject", "deploy/api").returncode == 0
    restored = cluster.request("GET", DEPLOY)["spec"]["template"]
    assert json.dumps(restored, sort_keys=True) == json.dumps(original, sort_keys=True)


def test_env_file_without_cmd_and_a_changed_env_reinjects(cluster: Cluster, tmp_path: Path) -> None:
    """--env-file with no CMD writes the chosen variables and keeps stealing; after
    the app's env is changed (`kubectl set env`), the next steal re-injects so that
    the sidecar's copy follows, and a plain child (--no-outgoing --no-dns) gets the new value."""
    _apply_app(cluster)
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
    env_file = tmp_path / "ide.env"
    port = free_port()
    cli = Cli(kubeconfig, "steal", "deploy/api", "--to", str(port), "--image", SIDECAR_IMAGE,
              "--env-file", str(env_file), "--env-include", "DB_*;GREETING")  # fmt: skip
    try:
        cli.wait_for(f"wrote 4 variables (DB_PASSWORD, DB_URL, DB_USER, GREETING) to {env_file}")
        cli.wait_for("open (steal, port 8080")
        assert dotenv_values(env_file, interpolate=False) == {
            "DB_USER": "app",
            "DB_PASSWORD": SECRET,
            "DB_URL": f"postgres://app:{SECRET}@db:5432/on",
            "GREETING": "hello",
        }
    finally:
        assert cli.stop() == 0, "\n".join(cli.lines)

    cluster.patch(DEPLOY, [{"op": "replace", "value": "bonjour",
                            "path": "/spec/template/spec/containers/0/env/0/value"}])  # fmt: skip
    cli = Cli(kubeconfig, "steal", "deploy/api", "--to", str(port), "--image", SIDECAR_IMAGE,
              "--no-outgoing", "--no-dns", "--", sys.executable, "-c", CMD, str(port))  # fmt: skip
    try:
        cli.wait_for("re-injecting the sidecar (the app container's env changed")
        result = json.loads(cli.wait_for("RESULT ").split("RESULT ", 1)[1])
        assert result["netns"] == os.readlink("/proc/self/ns/net"), "a plain child"
        assert result["env"]["GREETING"] == "bonjour"
        assert result["env"]["DB_URL"] == f"postgres://app:{SECRET}@db:5432/on"
    finally:
        cli.stop()
