"""The injector webhook, run as its real command over real HTTPS, answering
real AdmissionReview (v1) payloads; every patched pod is checked against the
Kubernetes schemas."""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import kubernetes_validate
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.appenv import PREFIX as APP_ENV_PREFIX
from sidecar.inject.patch import (
    ANNOTATION,
    COPY_ENV_ANNOTATION,
    SIDECAR_NAME,
    InjectOptions,
    inject,
)
from tests.support import free_port

K8S = "1.30"
IMAGE = "registry.example/offramp-sidecar:0.1.0"


def make_certs(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it, as the chart makes them."""
    now = datetime.datetime.now(datetime.UTC)

    def cert(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: Any, ca: bool
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "offramp test CA")])
    ca = cert("offramp test CA", ca_key, ca_name, ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    server = cert("offramp-webhook", key, ca_name, ca_key, False)
    paths = folder / "ca.pem", folder / "tls.crt", folder / "tls.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@dataclass
class Webhook:
    url: str
    ca: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def post(self, scope: str, body: bytes | dict[str, Any]) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(
            f"{self.url}/mutate/{scope}",
            content=content,
            headers={"content-type": "application/json"},
            verify=self.tls(),
            timeout=10,
        )


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[Webhook]:
    ca, crt, key = make_certs(tmp_path)
    port = free_port()
    log = tmp_path / "webhook.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "sidecar", "webhook",
                f"--cert={crt}", f"--key={key}", "--host=127.0.0.1", f"--port={port}",
                f"--image={IMAGE}", "--namespace=offramp-system",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    hook = Webhook(f"https://127.0.0.1:{port}", ca, proc, log)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{hook.url}/healthz", verify=hook.tls(), timeout=1).is_success:
                    break
            assert time.monotonic() < deadline, "the webhook did not start:\n" + log.read_text()
            time.sleep(0.05)
        yield hook
    finally:
        proc.terminate()
        code = proc.wait(10)
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


def pod(namespace: str = "shop", **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "api-", "namespace": namespace, **metadata},
        "spec": {
            "containers": [
                {
                    "name": "api",
                    "image": "registry.example/api:1",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                }
            ]
        },
    }


def admission_review(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": obj["metadata"]["namespace"],
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def answer_of(hook: Webhook, scope: str, obj: dict[str, Any]) -> dict[str, Any]:
    sent = admission_review(obj)
    r = hook.post(scope, sent)
    assert r.status_code == 200, r.text
    review = r.json()
    assert review["apiVersion"] == "admission.k8s.io/v1" and review["kind"] == "AdmissionReview"
    response: dict[str, Any] = review["response"]
    assert response["uid"] == sent["request"]["uid"]
    assert response["allowed"] is True  # failurePolicy aside, offramp never blocks a pod
    return response


def patched(obj: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    out: dict[str, Any] = jsonpatch.apply_patch(copy.deepcopy(obj), patch)
    # generateName stands in for the name the API server gives the pod.
    named = {**out, "metadata": {**out["metadata"], "name": "api-x7k2p"}}
    kubernetes_validate.validate(named, K8S, strict=True)
    return out


def test_an_annotated_pod_gets_the_sidecar(webhook: Webhook) -> None:
    obj = pod(annotations={"offramp.dev/inject": "true"})
    out = patched(obj, answer_of(webhook, "pod", obj))
    names = [c["name"] for c in out["spec"]["containers"]]
    assert names == ["api", SIDECAR_NAME]
    sidecar = out["spec"]["containers"][1]
    assert sidecar["image"] == IMAGE
    assert "--probe-path=/ready" in sidecar["args"]
    assert ANNOTATION in out["metadata"]["annotations"]


def test_a_labelled_pod_gets_the_sidecar_and_its_annotations_choose_the_mode(
    webhook: Webhook,
) -> None:
    obj = pod(
        labels={"offramp.dev/inject": "true"},
        annotations={"offramp.dev/capture": "none", "offramp.dev/named-port": "http"},
    )
    out = patched(obj, answer_of(webhook, "pod", obj))
    sidecar = out["spec"]["containers"][1]
    assert "--capture=none" in sidecar["args"]
    assert {"name": "http", "containerPort": 15080, "protocol": "TCP"} in sidecar["ports"]
    assert out["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] == "app-8080"


def test_a_pod_without_the_opt_in_is_left_alone_unless_its_namespace_opted_in(
    webhook: Webhook,
) -> None:
    obj = pod()
    response = answer_of(webhook, "pod", obj)
    assert "patch" not in response
    # Called through the namespace-selector webhook, every pod there is injected.
    out = patched(obj, answer_of(webhook, "namespace", obj))
    assert out["spec"]["containers"][1]["name"] == SIDECAR_NAME


def test_an_injected_pod_is_left_as_it_is(webhook: Webhook) -> None:
    obj = pod(annotations={"offramp.dev/inject": "true"})
    once = patched(obj, answer_of(webhook, "pod", obj))
    assert "patch" not in answer_of(webhook, "pod", once)


@pytest.mark.parametrize("namespace", ["kube-system", "offramp-system"])
def test_kube_system_and_its_own_namespace_are_never_touched(
    webhook: Webhook, namespace: str
) -> None:
    obj = pod(namespace, annotations={"offramp.dev/inject": "true"})
    assert "patch" not in answer_of(webhook, "namespace", obj)


def test_a_pod_that_cannot_be_injected_is_created_with_a_warning(webhook: Webhook) -> None:
    obj = pod(annotations={"offramp.dev/inject": "true", "offramp.dev/ports": "9999"})
    response = answer_of(webhook, "pod", obj)
    assert "patch" not in response
    assert response["warnings"] == [
        "offramp: not injected: container 'api' declares no port 9999; it declares: 8080"
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "offramp webhook: Expecting property name"),
        (b'{"kind": "Pod"}', "expected an AdmissionReview object"),
        (
            b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}',
            "is not admission.k8s.io/v1",
        ),
        (
            b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}',
            "has no request with a uid",
        ),
    ],
)
def test_a_malformed_review_gets_an_error_answer_and_the_server_stays_up(
    webhook: Webhook, body: bytes, message: str
) -> None:
    r = webhook.post("pod", body)
    assert r.status_code == 400
    assert message in r.json()["error"]
    obj = pod(annotations={"offramp.dev/inject": "true"})
    assert "patch" in answer_of(webhook, "pod", obj)


def test_the_webhook_copies_the_apps_env_as_the_cli_does(webhook: Webhook) -> None:
    """The sidecar of a webhook-injected pod carries the same prefixed copy of the
    app's env and envFrom as `offramp steal`'s injection of the same template; the
    copy-env annotation turns it off for that pod."""
    env = [
        {"name": "PYTHONPATH", "value": "/junk"},
        {"name": "URL", "value": "http://$(HOST):80"},
        {"name": "PASS", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
        {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
    ]
    env_from = [
        {"configMapRef": {"name": "settings"}},
        {"prefix": "S_", "secretRef": {"name": "db"}},
    ]
    obj = pod(annotations={"offramp.dev/inject": "true"})
    obj["spec"]["containers"][0] |= {"env": env, "envFrom": env_from}
    sidecar = patched(obj, answer_of(webhook, "pod", obj))["spec"]["containers"][1]

    template = {"metadata": {}, "spec": copy.deepcopy(obj["spec"])}
    by_cli = jsonpatch.apply_patch(template, inject(template, InjectOptions(image=IMAGE)))
    cli_sidecar = by_cli["spec"]["containers"][1]
    assert sidecar["env"] == cli_sidecar["env"] and sidecar["envFrom"] == cli_sidecar["envFrom"]
    assert [e["name"] for e in sidecar["env"][3:]] == [APP_ENV_PREFIX + e["name"] for e in env]
    assert sidecar["envFrom"][1]["prefix"] == APP_ENV_PREFIX + "S_"

    obj["metadata"]["annotations"][COPY_ENV_ANNOTATION] = "false"
    sidecar = patched(obj, answer_of(webhook, "pod", obj))["spec"]["containers"][1]
    assert [e["name"] for e in sidecar["env"]] == [
        "OFFRAMP_OUTGOING_ALLOW",
        "OFFRAMP_PREVIEW_PREFIX",
        "OFFRAMP_SESSION_IDLE_TIMEOUT",
    ]
    assert "envFrom" not in sidecar
